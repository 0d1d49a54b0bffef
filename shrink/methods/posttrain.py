"""Post-training pruning of heads and FFN neurons with no weight training (method `posttrain`, recipes
`posttrain`, `posttrain-1.5x`), after Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers" (NeurIPS). Four phases, all on the calibration split:

1. Fisher: every head and FFN neuron gets a mask variable of 1 (shrink.surgery.gates, one row per
   example), so ONE backward pass of the summed per-example losses gives every example's own gate
   gradient g_i exactly (example i only sees row i). Diagonal Fisher F_u = sum_i g_iu^2; per layer
   the block sum_i g_i g_i^T (for phase 3).
2. Mask search (Kwon §4.1): the loss increase of a mask is ~ the Fisher of the removed units, and a
   head / a neuron costs a constant latency from the measured table (LinearCost, ms). Heads and
   neurons are ranked globally by Fisher; for every total n of kept heads (the top n) keep the most
   top neurons the budget (dense latency / speedup) allows, and take the n with the most kept Fisher.
   A layer may lose every head or neuron (the sub-layer then goes, and its fixed cost with it).
3. Mask rearrangement (Kwon §4.2), per layer and unit kind, counts fixed: greedy best swap of a kept
   and a removed unit while it lowers z^T F_block z (z: removed units), the within-layer Fisher.
4. Mask tuning (Kwon §4.3), bottom layer first: per sub-layer, least squares for one scale per kept
   unit so that residual + sum_u m_u * unit_u(x) (the input of the sub-layer's LayerNorm, the pruned
   model's own input x, earlier layers already tuned) matches the dense model's, on the real tokens;
   ridge 1e-4 * mean diagonal, scales clamped to [-10, 10] (all 1 where that fits the calibration data
   worse than no tuning: the ridge, where nothing needed fixing). The scales are folded into the weights by
   a plan.ScaleUnits op (a head's columns of the attention output projection, a neuron's column of
   the FFN output Linear), ordered before KeepHeads / KeepFFN so it uses the full model's positions.

Approximations, where this differs from the paper:
- Unlabeled data: a distillation objective is at its minimum when every mask is 1, so its gradients
  vanish and carry no Fisher. Without labels the per-example loss is a random projection
  <v_i, f(x_i)>, v_i ~ N(0, I), of the model's output f (logits, or the sentence embedding of a
  base model): E[g g^T] is then the Gauss-Newton matrix J^T J, the Fisher of a unit-variance
  Gaussian on f. With labels it is Kwon's empirical Fisher of the task loss.
- The least-squares systems are built from their normal equations (k x k per sub-layer), streamed
  over batches, so nothing of size tokens x hidden x units is held; passes stop at the layer tuned.
  Tuning fits on the first `tuning_samples` examples (default all 1024): it costs about one forward
  pass per sub-layer (the dense and the pruned model up to it), so fewer make it faster.

Measured (bible-teacher, a 6-layer MiniLM classifier, 2x, 1024 examples, 2 CPU cores): accuracy
0.930 dense; 0.648 search only, 0.766 with rearrangement, 0.695 with rearrangement and tuning
(0.553 tuning on 256 examples). Tuning lowers every sub-layer's reconstruction error a little but
lowered accuracy there, so the built-in recipes turn it off (`tune: false`); it stays on by default
as the paper's method. Time: ~27 s without tuning, ~135 s with it (the latency table cached).
- The latency model is the LinearCost of shrink.methods.l0.latency_table (a fixed cost per live
  sub-layer plus a cost per head / neuron), not Kwon's per-layer lookup table.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field, model_validator

from shrink.arch import logits_of, task_head
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.hard_concrete import LinearCost
from shrink.methods.l0.latency_table import latency_cost
from shrink.methods.l0.method import params_cost
from shrink.surgery import ffn_per_layer, heads_per_layer, runtime
from shrink.surgery.gates import Gates
from shrink.surgery.ops import adapter_of, head_size, layers_of
from shrink.surgery.plan import KeepFFN, KeepHeads, ScaleUnits
from shrink.train.objectives import forward, sentence_embedding

RIDGE = 1e-4  # times the mean diagonal of the normal equations
CLAMP = 10.0  # Kwon's bound on a tuned scale


class PosttrainTarget(Strict):
    speedup: float | None = Field(None, gt=1, description="ONNX Runtime speedup (batch 1, seq_len, one thread) from the measured latency table")
    params_fraction: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the encoder layers' prunable parameters instead")

    @model_validator(mode="after")
    def exactly_one(self):
        if (self.speedup is None) == (self.params_fraction is None):
            raise ValueError("give exactly one of speedup, params_fraction")
        return self


class PosttrainOptions(Strict):
    calibration_samples: int = Field(1024, ge=1, description="examples for the Fisher and the mask tuning")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8, description="tokens at which the latency table is measured")
    latency_rounds: int = Field(30, ge=3, description="timed rounds per variant for the latency table")
    rearrange: bool = Field(True, description="refine each layer's kept units with its block Fisher (Kwon §4.2)")
    max_swaps: int = Field(200, ge=0, description="most swaps per layer and unit kind in the rearrangement")
    tune: bool = Field(True, description="least-squares scales of the kept units, folded into the weights (Kwon §4.3)")
    tuning_samples: int = Field(1024, ge=1, description="the first examples of the calibration set the tuning fits on (about a forward pass per sub-layer)")


# --- 1. Fisher ------------------------------------------------------------------------------------


def informative(objective) -> bool:
    """Whether the objective has a part that does not compare with the teacher (a task loss): only
    that part has gradients when every mask is 1."""
    parts = getattr(objective, "parts", [objective])
    return any(not part.uses_teacher for part in parts)


def model_output(model, batch: dict) -> torch.Tensor:
    """[batch, ...] what the surrogate loss projects: logits (padding zeroed), or the sentence
    embedding of a base model (its own pooling)."""
    output = forward(model, batch)
    if task_head(model) is None:
        return sentence_embedding(model, output, batch)
    logits = logits_of(output)
    if logits.dim() == 3 and logits.shape[1] == batch["attention_mask"].shape[1]:  # one row per token
        logits = logits * batch["attention_mask"][:, :, None].to(logits.dtype)
    return logits


def example_losses(ctx: Context, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """[batch] each example's own loss: the objective where it is informative, else a random
    projection of the output (see the module docstring)."""
    if informative(ctx.objective):
        with torch.no_grad():
            targets = ctx.objective.targets(batch)
        return ctx.objective.per_sample(ctx.model, batch, targets)
    out = model_output(ctx.model, batch)
    probe = torch.randn(out.shape, generator=generator).to(out)
    return (probe * out).flatten(1).sum(dim=1)


def fisher(ctx: Context, batches: list[dict], blocks: bool = True) -> dict:
    """Per layer: "heads" / "ffn" diagonal Fisher (units,), and with `blocks` the within-layer
    matrices "head_blocks" / "ffn_blocks" (units x units); empty where a layer has none."""
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    sizes = heads + ffn
    blocks_of = [torch.zeros(n, n, dtype=torch.float64) for n in sizes] if blocks else None
    diag = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    device = next(ctx.model.parameters()).device
    generator = torch.Generator().manual_seed(ctx.seed)
    with Gates(ctx.model) as gates:
        for batch in batches:
            b = batch["input_ids"].shape[0]
            gate = [torch.ones(b, n, device=device, requires_grad=True) if n else None for n in sizes]
            gates.heads, gates.ffn = gate[: len(heads)], gate[len(heads):]
            live = [g for g in gate if g is not None]
            grads = iter(torch.autograd.grad(example_losses(ctx, batch, generator).sum(), live))
            for k, g in enumerate(gate):
                if g is None:
                    continue
                per_example = next(grads).detach().double().cpu()  # row i: dL_i / dgate
                diag[k] += (per_example**2).sum(dim=0)
                if blocks:
                    blocks_of[k] += per_example.T @ per_example
    out = {"heads": diag[: len(heads)], "ffn": diag[len(heads):]}
    if blocks:
        out["head_blocks"], out["ffn_blocks"] = blocks_of[: len(heads)], blocks_of[len(heads):]
    return out


# --- 2. mask search -------------------------------------------------------------------------------


def _prefix_counts(scores: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Units of all layers (concatenated) ranked by score, descending: (the order, the sorted scores,
    [units + 1, layers] live units per layer when the top k are kept)."""
    layer = torch.cat([torch.full((s.numel(),), i, dtype=torch.long) for i, s in enumerate(scores)])
    flat = torch.cat([s.double() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    order = torch.sort(flat, descending=True, stable=True).indices
    onehot = torch.nn.functional.one_hot(layer[order], len(scores)) if len(flat) else torch.zeros(0, len(scores), dtype=torch.long)
    counts = torch.cat([torch.zeros(1, len(scores), dtype=torch.long), onehot.cumsum(0)])
    return order, flat[order], counts


def search(head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor], cost: LinearCost, budget: float) -> dict:
    """Kwon's search: for every n, the top-n heads and as many top neurons as fit the budget (cost
    grows with each neuron, so a binary search); the n keeping the most Fisher wins. Returns the kept
    mask per layer ("heads", "ffn": bool tensors), the counts, the kept Fisher and the cost, or None
    when even removing everything misses the budget."""
    layers = len(head_scores)
    h_order, h_sorted, h_counts = _prefix_counts(head_scores)
    f_order, f_sorted, f_counts = _prefix_counts(ffn_scores)
    h_gain = torch.cat([torch.zeros(1, dtype=torch.float64), h_sorted.cumsum(0)])
    f_gain = torch.cat([torch.zeros(1, dtype=torch.float64), f_sorted.cumsum(0)])

    def price(n: int, k: int) -> float:
        return cost.of_counts(h_counts[n].tolist(), f_counts[k].tolist())

    best = None
    for n in range(len(h_sorted) + 1):
        if price(n, 0) > budget:
            break  # more heads only cost more
        lo, hi = 0, len(f_sorted)  # the largest k with price(n, k) <= budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if price(n, mid) <= budget else (lo, mid - 1)
        gain = float(h_gain[n] + f_gain[lo])
        if best is None or gain > best[0] + 1e-15:
            best = (gain, n, lo)
    if best is None:
        return None
    gain, n, k = best

    def masks(scores, order, kept):
        flat = torch.zeros(sum(s.numel() for s in scores), dtype=torch.bool)
        flat[order[:kept]] = True
        return list(torch.split(flat, [s.numel() for s in scores]))

    return {
        "heads": masks(head_scores, h_order, n), "ffn": masks(ffn_scores, f_order, k),
        "kept_heads": n, "kept_neurons": k, "kept_fisher": gain,
        "total_fisher": float(h_gain[-1] + f_gain[-1]), "cost": price(n, k), "layers": layers,
    }


# --- 3. mask rearrangement --------------------------------------------------------------------------


def rearrange(mask: torch.Tensor, block: torch.Tensor, max_swaps: int) -> tuple[torch.Tensor, int, float, float]:
    """Greedy best swaps (one kept unit out, one removed unit in) while z^T F z drops, z = removed
    indicator. Returns (mask, swaps, loss before, loss after)."""
    mask = mask.clone()
    z = (~mask).double()
    fz = block @ z
    before = float(z @ fz)
    diag = block.diagonal()
    swaps = 0
    while swaps < max_swaps and 0 < int(mask.sum()) < mask.numel():
        kept, removed = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
        # removed unit i comes back, kept unit j goes: z' = z - e_i + e_j
        delta = (-2 * fz[removed][:, None] + 2 * fz[kept][None, :] + diag[removed][:, None] + diag[kept][None, :]
                 - 2 * block[removed][:, kept])
        flat = int(torch.argmin(delta))
        i, j = removed[flat // kept.numel()], kept[flat % kept.numel()]
        if float(delta.flatten()[flat]) >= -1e-12 * max(abs(before), 1e-30):
            break
        mask[i], mask[j] = True, False
        fz += block[:, j] - block[:, i]
        z[i], z[j] = 0.0, 1.0
        swaps += 1
    return mask, swaps, before, float(z @ (block @ z))


# --- 4. mask tuning ----------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook once the layer being tuned is captured: the rest of the forward is not needed."""


def _run_until(model, batch: dict, stop_module, handles: list) -> None:
    def stop(module, args, output):
        raise _Stop

    handles.append(stop_module.register_forward_hook(stop))
    try:
        with torch.no_grad():
            forward(model, batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _capture(module, store: dict, key: str, output: bool = False):
    """A hook storing a module's first input (before any other pre-hook: the ungated units) or output."""
    if output:
        return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))
    return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0]), prepend=True)


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[real tokens, features] float32 on the CPU: the per-batch products are float32 (fast), their
    sums over batches float64."""
    return x[mask.bool()].float().cpu()


class Normal:
    """Streamed normal equations of min ||A m - b||^2: G = A^T A, r = A^T b, bb = b^T b, and the
    energy of the dense sub-layer's output, which the reported errors are relative to."""

    def __init__(self, k: int):
        self.G, self.r = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        self.bb = self.energy = 0.0

    def error(self, m: torch.Tensor) -> float:
        return float(m @ self.G @ m - 2 * m @ self.r + self.bb) / max(self.energy, 1e-30)

    def solve(self) -> torch.Tensor:
        k = self.r.numel()
        ridge = RIDGE * float(self.G.diagonal().mean()) if k else 0.0
        m = torch.linalg.lstsq(self.G + ridge * torch.eye(k, dtype=torch.float64), self.r[:, None]).solution[:, 0]
        return m.clamp(-CLAMP, CLAMP)


def tune(ctx: Context, batches: list[dict], head_masks: list[torch.Tensor], ffn_masks: list[torch.Tensor]) -> tuple[list, list, list]:
    """Scales of the kept units, layer by layer from the bottom (see the module docstring). Returns
    per layer the head and FFN gate values (mask times scale; None where the layer has no such
    units) and each sub-layer's relative error before / after."""
    model, adapter, size = ctx.model, adapter_of(ctx.model), head_size(ctx.model)
    layers = layers_of(model)
    head_values = [m.double() if m.numel() else None for m in head_masks]
    ffn_values = [m.double() if m.numel() else None for m in ffn_masks]
    report = []
    device = next(model.parameters()).device

    def gate(values):
        return [v.to(device=device, dtype=torch.float32) if v is not None else None for v in values]

    with Gates(model) as gates:
        for i, layer in enumerate(layers):
            sublayers = []
            if head_values[i] is not None and head_masks[i].any():
                sublayers.append(("attention", adapter.query, adapter.attention_out, head_masks[i], head_values))
            if ffn_values[i] is not None and ffn_masks[i].any():
                sublayers.append(("ffn", adapter.ffn_in, adapter.ffn_out, ffn_masks[i], ffn_values))
            if not sublayers:
                report.append({"layer": i})
                continue
            # the dense model's LayerNorm inputs at layer i (real tokens only), one pass for both
            targets = []
            for batch in batches:
                store, handles = {}, []
                for kind, inp, out, _, _ in sublayers:
                    handles.append(_capture(runtime.get_module(layer, inp), store, kind + ".in"))
                    handles.append(_capture(runtime.get_module(layer, out), store, kind + ".out", output=True))
                gates.clear()
                _run_until(model, batch, layer, handles)
                targets.append({kind: (_tokens(store[kind + ".in"] + store[kind + ".out"], batch["attention_mask"]),
                                       float((_tokens(store[kind + ".out"], batch["attention_mask"]) ** 2).sum()))
                               for kind, *_ in sublayers})
            entry = {"layer": i}
            for kind, inp, out, mask, values in sublayers:
                linear = runtime.get_module(layer, out)
                module_kind = runtime.kind_of(linear)
                weight = module_kind.dense_weight(linear).float().cpu()  # hidden x units * width
                bias = module_kind.output_bias(linear)
                bias = bias.detach().float().cpu() if bias is not None else torch.zeros(weight.shape[0])
                kept = mask.nonzero().squeeze(1)
                k, width = kept.numel(), size if kind == "attention" else 1
                w = weight.view(weight.shape[0], -1, width)[:, kept].reshape(weight.shape[0], -1)  # hidden x kept * width
                # unit u's output is its slice c_u of the input times W_u^T, so
                # G[u, v] = sum_t c_u W_u^T W_v c_v^T = block sums of (C^T C) * (W^T W), r[u] = sum of C * (b W) over u's slice
                gram_w = w.T @ w
                normal = Normal(k)
                for batch, goal in zip(batches, targets):
                    store, handles = {}, []
                    handles.append(_capture(runtime.get_module(layer, inp), store, "in"))
                    handles.append(_capture(linear, store, "units"))
                    gates.heads, gates.ffn = gate(head_values[:i] + [None] * (len(layers) - i)), gate(ffn_values[:i] + [None] * (len(layers) - i))
                    if kind == "ffn":
                        gates.heads[i] = gate([head_values[i]])[0]
                    _run_until(model, batch, linear, handles)
                    mask_tokens = batch["attention_mask"]
                    units = _tokens(store["units"], mask_tokens)
                    dense, energy = goal[kind]
                    b = dense - _tokens(store["in"], mask_tokens) - bias
                    c = units.view(units.shape[0], -1, width)[:, kept].reshape(units.shape[0], -1)  # tokens x kept * width
                    normal.G += ((c.T @ c) * gram_w).view(k, width, k, width).sum(dim=(1, 3)).double()
                    normal.r += (c * (b @ w)).view(-1, k, width).sum(dim=(0, 2)).double()
                    normal.bb += float((b.double() ** 2).sum())
                    normal.energy += energy
                ones = torch.ones(kept.numel(), dtype=torch.float64)
                scales = normal.solve()
                if normal.error(scales) > normal.error(ones):  # the ridge can only hurt where nothing needs fixing
                    scales = ones
                values[i] = torch.zeros(mask.numel(), dtype=torch.float64)
                values[i][kept] = scales
                entry[kind] = {"error_before": round(normal.error(ones), 6),
                               "error_after": round(normal.error(scales), 6)}
            report.append(entry)
    return head_values, ffn_values, report


def first_examples(batches: list[dict], samples: int) -> list[dict]:
    """The batches holding the first `samples` examples (the last one cut to fit)."""
    out, left = [], samples
    for batch in batches:
        if left <= 0:
            break
        n = batch["input_ids"].shape[0]
        out.append(batch if n <= left else {k: v[:left] for k, v in batch.items()})
        left -= n
    return out


# --- the method --------------------------------------------------------------------------------------


def budget_of(ctx: Context, target: PosttrainTarget, options: PosttrainOptions) -> tuple[LinearCost, float, dict]:
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    if target.params_fraction is not None:
        cost = params_cost(ctx.model)
        return cost, cost.of_counts(heads, ffn) * target.params_fraction, {}
    cost, table = latency_cost(ctx.model, options.seq_len, threads=1, rounds=options.latency_rounds)
    return cost, cost.of_counts(heads, ffn) / target.speedup, {"latency_table": {k: table[k] for k in ("coefficients_ms", "p50_ms", "cached") if k in table}}


@register("posttrain", options=PosttrainOptions, target=PosttrainTarget,
          smoke={"target": {"params_fraction": 0.5}, "options": {"calibration_samples": 8, "max_length": 16, "batch_size": 4}})
def posttrain(ctx: Context, target: PosttrainTarget, options: PosttrainOptions) -> StepResult:
    """Kwon et al. 2022 post-training pruning: Fisher mask search to a speedup, rearrangement, least-squares mask tuning (no training)."""
    started = time.perf_counter()
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    cost, budget, cost_info = budget_of(ctx, target, options)
    dense = cost.of_counts(heads, ffn)
    floor = cost.of_counts([0] * len(heads), [0] * len(ffn))
    what = f"a {target.speedup}x speedup" if target.speedup is not None else f"a params fraction of {target.params_fraction}"
    if floor > budget:
        reach = f"{dense / floor:.2f}x" if target.speedup is not None else f"{floor / dense:.3f}"
        raise BadInputError(f"posttrain cannot reach {what}: removing every head and FFN neuron leaves {reach}",
                            hint="aim lower, or drop whole layers first (layers.drop) or shrink the embeddings")
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)

    t = time.perf_counter()
    info = fisher(ctx, batches, blocks=options.rearrange)
    fisher_seconds = time.perf_counter() - t

    t = time.perf_counter()
    found = search(info["heads"], info["ffn"], cost, budget)
    search_seconds = time.perf_counter() - t
    head_masks, ffn_masks = found["heads"], found["ffn"]

    rearranged = []
    if options.rearrange:
        for kind, masks, blocks in (("heads", head_masks, info["head_blocks"]), ("ffn", ffn_masks, info["ffn_blocks"])):
            for i, (mask, block) in enumerate(zip(masks, blocks)):
                if 0 < int(mask.sum()) < mask.numel():
                    masks[i], swaps, before, after = rearrange(mask, block, options.max_swaps)
                    if swaps:
                        rearranged.append({"layer": i, "kind": kind, "swaps": swaps, "fisher_loss_before": before, "fisher_loss_after": after})

    t = time.perf_counter()
    tuning = []
    if options.tune:
        head_values, ffn_values, tuning = tune(ctx, first_examples(batches, options.tuning_samples), head_masks, ffn_masks)
    tune_seconds = time.perf_counter() - t

    kept_heads = [int(m.sum()) for m in head_masks]
    kept_ffn = [int(m.sum()) for m in ffn_masks]
    plan = []
    if options.tune:
        scale_heads = {i: [float(x) if keep else 1.0 for x, keep in zip(v.tolist(), head_masks[i].tolist())]
                       for i, v in enumerate(head_values) if v is not None and head_masks[i].any()}
        scale_ffn = {i: [float(x) if keep else 1.0 for x, keep in zip(v.tolist(), ffn_masks[i].tolist())]
                     for i, v in enumerate(ffn_values) if v is not None and ffn_masks[i].any()}
        plan.append(ScaleUnits(heads=scale_heads, ffn=scale_ffn))  # full-model positions: before the removals
    keep_heads = {i: m.nonzero().squeeze(1).tolist() for i, m in enumerate(head_masks) if kept_heads[i] < heads[i]}
    keep_ffn = {i: m.nonzero().squeeze(1).tolist() for i, m in enumerate(ffn_masks) if kept_ffn[i] < ffn[i]}
    plan += ([KeepHeads(keep_heads)] if keep_heads else []) + ([KeepFFN(keep_ffn)] if keep_ffn else [])

    achieved = cost.of_counts(kept_heads, kept_ffn)
    stats = {
        "target": {k: v for k, v in target.model_dump().items() if v is not None},
        "cost_kind": cost.name,
        "budget": round(budget, 6),
        "achieved_cost": round(achieved, 6),
        "heads_per_layer": kept_heads,
        "ffn_per_layer": kept_ffn,
        "calibration_samples": sum(b["input_ids"].shape[0] for b in batches),
        "fisher": "task loss" if informative(ctx.objective) else "output projection (no labels)",
        "fisher_seconds": round(fisher_seconds, 2),
        "search": {"kept_heads": found["kept_heads"], "kept_neurons": found["kept_neurons"],
                   "kept_fisher_fraction": round(found["kept_fisher"] / max(found["total_fisher"], 1e-300), 4),
                   "seconds": round(search_seconds, 3)},
        "rearrangement": rearranged,
        "tuning": tuning,
        "tuning_samples": sum(b["input_ids"].shape[0] for b in first_examples(batches, options.tuning_samples)) if options.tune else 0,
        "tuning_seconds": round(tune_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        **cost_info,
    }
    if target.speedup is not None:
        stats["predicted_speedup"] = round(dense / achieved, 3)
    return StepResult(plan=plan, stats=stats)
