"""Structured pruning with hard-concrete L0 gates and a Lagrangian controller (method `l0`).

After McCarley et al. 2019 and Wang et al. 2020 (L0 gates on structures, an augmented Lagrangian
that hits an exact size) and CoFi (Xia et al. 2022: heads, FFN neurons, whole sub-layers and, opt-in
here, the hidden dims gated together, with layer-wise distillation). The gates, their distribution
and the expected-size model are in shrink.methods.l0.hard_concrete; the measured latency model in
shrink.methods.l0.latency_table.

Training, jointly for the model weights theta, the gates' log_alpha and two multipliers:

    s(alpha)  expected cost / cost of the unpruned model       (params, FLOPs or latency)
    t         the target fraction, annealed linearly from s at the start to the final value over
              the first `target_warmup` of the steps (a gentle start keeps the model intact)
    L         loss(theta, z ~ hard concrete(alpha)) + lambda1 * (s - t) + lambda2 * (s - t)^2
    theta, alpha descend on L; lambda1, lambda2 ascend on it (gradient ascent: a growing price
    on being above the target; lambda1 may go negative and give size back when below it)

loss = task loss (labels) + distillation from the original: logits KL (temperature T, a task head)
or the mean-pooled embedding cosine (a base model, e.g. minilm; unlabeled data trains on this alone)
+ hidden_weight * hidden-state MSE of every layer against the teacher layer it comes from (all from
shrink.train.objectives, trained on the shared loop shrink.train.loop.train).

Targets (exactly one): params_fraction (of the encoder layers' prunable parameters: attention
projections and FFN weights; the embeddings, which only the hidden kind narrows, are left out),
flops_fraction (of the whole model's analytic FLOPs at seq_len tokens, shrink.models.flops'
convention), or speedup (ONNX Runtime, batch 1, seq_len tokens, one thread, from the latency table:
fraction = 1 / speedup).
Cost coefficients per unit, with hidden size H, H_kept = r * H of its dims kept (H_kept = H unless
`hidden` is pruned; during training r is the expected kept fraction), head size d and s tokens:

    params   per head 4*H_kept*d + 3*d (q, k, v, out weights; q, k, v biases)   per neuron 2*H_kept + 1
    FLOPs    per head 8*s*H_kept*d + 4*s^2*d                                     per neuron 4*s*H_kept
             base = FLOPs outside the layers (embedding projections, pooler, task head), not scaled
    latency  measured: see shrink.methods.l0.latency_table; per head and per neuron scaled by r (an
             approximation: the table measures the full width); base and sub-layer costs not scaled

The unscaled terms (FLOPs base, latency base and sub-layer fixed costs; the params target never counts
the embeddings) make the fraction with hidden dims pruned an overestimate: the model is a bit smaller
than the target says.

The `hidden` kind (opt-in, not in the default `prune`): one gate per `hidden_block` dims of the
residual stream, shared by all layers, multiplied into the stream wherever it is written (the
embeddings' output, ELECTRA's embeddings_project, every LayerNorm in the layers; the hooks of
shrink.methods.stream.gate_stream). An embedding (base) model's output would get narrower: refused
unless `allow_embedding_width_change: true`.

At the end the gates are made deterministic (hard_concrete.L0Gates.final_values: the test-time values,
then the lowest-log_alpha heads / FFN blocks / hidden blocks go until the target holds; the stats
count what this correction removed per kind), the
deterministic gate values of the kept units are folded into the weights (a head's value scales its
columns of the attention output projection, a neuron's its column of the FFN output projection, a
hidden dim's value the weight and bias of every LayerNorm writing the stream, and ELECTRA's
embeddings_project rows: LN(x) * z = LN with weight * z and bias * z), and the zero units form the
plan that shrink.surgery removes (KeepHeads, KeepFFN, KeepHidden). Without hidden dims removed the
slim model equals the gated model exactly; a layer left with no heads keeps only LayerNorm(residual +
output bias), as with prune_heads([]). Removing hidden dims is NOT exact (as in CoFi): the gated model's
LayerNorms normalise over all H dims (the dims with z = 0 still carry the sub-layers' outputs before
the LayerNorm), the slim model's over H_kept; the outputs are close, not equal.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.arch import task_head
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.hard_concrete import DEFAULT_KINDS, L0Gates, LinearCost
from shrink.methods.l0.latency_table import latency_cost
from shrink.methods.stream import gate_stream, stream_writers
from shrink.models.flops import model_flops
from shrink.models.sentence import check_hidden_pruning
from shrink.surgery import KeepFFN, KeepHeads, KeepHidden, ffn_per_layer, heads_per_layer, runtime, word_embeddings_of
from shrink.surgery.gates import Gates
from shrink.surgery.ops import adapter_of, head_size, hidden_size, layers_of
from shrink.train import distributed
from shrink.train.loop import Hooks, total_steps, train
from shrink.train.objectives import Objective, SumObjective, choose_objective

Kind = Literal["heads", "ffn", "attention_layers", "ffn_layers", "hidden"]
LossKind = Literal["auto", "task", "distill", "hidden_mse"]


class L0Target(Strict):
    params_fraction: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the encoder layers' parameters")
    flops_fraction: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the analytic FLOPs at seq_len")
    speedup: float | None = Field(None, gt=1, description="ONNX Runtime speedup to reach (batch 1, seq_len, one thread), from a measured latency table")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("params_fraction", "flops_fraction", "speedup") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of params_fraction, flops_fraction, speedup")
        return self


class L0Options(Strict):
    prune: list[Kind] = Field(default_factory=lambda: list(DEFAULT_KINDS), min_length=1,
                              description="what the gates may remove (hidden: opt-in, not in the default)")
    ffn_block: int = Field(1, ge=1, description="FFN neurons per gate")
    hidden_block: int = Field(1, ge=1, description="hidden dims per gate (kind hidden)")
    allow_embedding_width_change: bool = Field(False, description="let the hidden kind narrow a base (embedding) model's output")
    epochs: float = Field(1, gt=0, description="passes over the calibration split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    lr: float = Field(5e-5, gt=0, description="learning rate of the model weights")
    train_embeddings: bool = Field(False, description="also train the word embeddings (slow on CPU: a vocab x hidden AdamW update per step)")
    gate_lr: float = Field(0.05, gt=0, description="learning rate of the gates' log_alpha")
    lambda_lr: float = Field(0.05, gt=0, description="learning rate (ascent) of the Lagrange multipliers")
    target_warmup: float = Field(0.5, ge=0, lt=1, description="fraction of steps over which the target is annealed")
    log_alpha_init: float = Field(2.0, description="initial log_alpha (2.0: every gate open with P ~ 0.97)")
    loss: list[LossKind] = Field(default_factory=lambda: ["auto", "distill", "hidden_mse"], min_length=1)
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE")
    temperature: float = Field(2.0, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    seq_len: int = Field(128, ge=8, description="tokens at which FLOPs and latency are counted")
    latency_rounds: int = Field(30, ge=3, description="timed rounds per variant for the latency table")


# --- costs ----------------------------------------------------------------------------------------


def _dims(model) -> tuple[int, int]:
    return hidden_size(model), head_size(model)  # the stream's width now (a KeepHidden narrows it)


def params_cost(model) -> LinearCost:
    hidden, d = _dims(model)
    return LinearCost("params", 0.0, 0.0, 4 * hidden * d + 3 * d, 0.0, 2 * hidden + 1,
                      per_head_hidden=4 * hidden * d, per_neuron_hidden=2 * hidden)


def flops_cost(model, seq_len: int) -> LinearCost:
    hidden, d = _dims(model)
    outside = model_flops(model, seq_len)
    base = outside["embeddings"] + outside["head"]
    return LinearCost("flops", float(base), 0.0, 8 * seq_len * hidden * d + 4 * seq_len**2 * d, 0.0, 4 * seq_len * hidden,
                      per_head_hidden=8 * seq_len * hidden * d, per_neuron_hidden=4 * seq_len * hidden)


def target_cost(model, target: L0Target, options: L0Options) -> tuple[LinearCost, float, dict]:
    """The cost kind the target names, the fraction to reach, and how the costs were obtained."""
    if target.params_fraction is not None:
        return params_cost(model), target.params_fraction, {}
    if target.flops_fraction is not None:
        return flops_cost(model, options.seq_len), target.flops_fraction, {}

    # timed once, on the main process: processes timing their own would train to different targets
    cost, table = distributed.on_main(lambda: latency_cost(model, options.seq_len, threads=1, rounds=options.latency_rounds))
    return cost, 1.0 / target.speedup, {"latency_table": table}


def _floor(gates: L0Gates, cost: LinearCost, kinds) -> float:
    """The smallest fraction these gates can reach (every learned unit removed)."""
    heads = [0 if ("heads" in kinds or "attention_layers" in kinds) else n for n in gates.heads]
    ffn = [0 if ("ffn" in kinds or "ffn_layers" in kinds) else n for n in gates.ffn]
    hidden = float(gates.hidden_sizes.min()) / gates.hidden if "hidden" in kinds else 1.0  # one block stays
    return cost.of_counts(heads, ffn, hidden) / gates.full_cost(cost)


# --- loss -----------------------------------------------------------------------------------------


def loss_terms(kinds, model, has_labels: bool) -> list[str]:
    head = task_head(model)
    terms = []
    for kind in kinds:
        if kind == "auto":
            kind = "task" if has_labels and head == "sequence" else "distill"
        if kind == "task" and not (has_labels and head == "sequence"):
            raise BadInputError("l0: the task loss needs labeled data and a sequence classification head", hint="use loss: [distill, hidden_mse]")
        if kind not in terms:
            terms.append(kind)
    return terms


def l0_objective(model, teacher, terms: list[str], options: L0Options) -> Objective:
    """The training loss of `terms` from shrink.train.objectives, one forward pass per model for all:
    "distill" is the logits KL with a task head, embedding cosine + relation without one."""
    distill = "teacher"  # logits KL with a task head, embedding cosine + relation without
    parts, weights = [], []
    for term in terms:
        if term == "hidden_mse" and options.hidden_weight == 0:
            continue
        kind = {"distill": distill}.get(term, term)
        parts.append(choose_objective(model, teacher, term == "task", kind, options.temperature, training=True))
        weights.append(options.hidden_weight if term == "hidden_mse" else 1.0)
    if not parts:
        raise BadInputError("l0: no loss left to train on (hidden_weight 0 and loss [hidden_mse])", hint="add distill or task to loss")
    return SumObjective(parts, weights)


# --- training -------------------------------------------------------------------------------------


def train_gates(model, teacher, batches: list[dict], gates: L0Gates, cost: LinearCost, target: float,
                options: L0Options, terms: list[str], seed: int = 0, progress: bool = True) -> dict:
    """Joint training of weights, gates and multipliers (see the module docstring) on the shared loop:
    gates sampled before each forward pass, the Lagrangian as an extra loss, the gates' and the
    multipliers' optimizers stepped with the weights'. Returns the history."""
    steps = total_steps(len(batches), options.epochs, max_steps=options.max_steps)
    # frozen for the run (no gradient computed at all), restored afterwards
    frozen = [] if options.train_embeddings else [p for p in word_embeddings_of(model).parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    gate_optimizer = torch.optim.Adam(gates.learned(), lr=options.gate_lr, foreach=True)
    multipliers = torch.zeros(2, requires_grad=True)
    lambda_optimizer = torch.optim.Adam([multipliers], lr=options.lambda_lr, maximize=True)
    full = gates.full_cost(cost)
    with torch.no_grad():
        start = float(gates.expected_cost(cost)) / full
    warm = max(1, int(options.target_warmup * steps))
    history = {"steps": steps, "start_fraction": round(start, 4), "log": []}
    every = max(1, steps // 20)
    device = next(model.parameters()).device
    hooks = Gates(model)
    now = {}  # this step's annealed target and expected fraction, for the log and the progress bar
    stream = gate_stream(model, lambda: now.get("hidden")) if gates.hidden_alpha.numel() else []

    def sample(step: int) -> None:
        now["target"] = target + (start - target) * max(0.0, 1 - step / warm)  # annealed target
        hooks.heads, hooks.ffn = gates.values("sample")
        now["hidden"] = gates.hidden_values("sample")

    def lagrangian(step: int) -> torch.Tensor:
        fraction = gates.expected_cost(cost) / full
        gap = fraction - now["target"]  # on the CPU, with the gates
        now["fraction"] = fraction.item()
        return (multipliers[0] * gap + multipliers[1] * gap**2).to(device)

    def log(done: int, total: int, loss: float) -> None:
        step = done - 1
        if step % every == 0 or step == steps - 1:
            history["log"].append({
                "step": step, "loss": round(loss, 5), "expected_fraction": round(now["fraction"], 4),
                "target": round(now["target"], 4), "lambda1": round(multipliers[0].item(), 4), "lambda2": round(multipliers[1].item(), 4),
            })

    def status(loss: float) -> str:
        return f"loss {loss:.4f}, expected {now['fraction']:.3f} -> {now['target']:.3f}"

    try:
        train(
            model, batches, l0_objective(model, teacher, terms, options), max_steps=steps, epochs=options.epochs,
            lr=options.lr, warmup=0.1, grad_clip=options.grad_clip, seed=seed, foreach=True,
            extra_optimizers=[gate_optimizer, lambda_optimizer], progress=progress, label="l0 gates",
            hooks=Hooks(before_step=sample, extra_loss=lagrangian, after_step=[log], status=status),
        )
    finally:
        hooks.remove()
        for handle in stream:
            handle.remove()
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        history["end_fraction"] = round(float(gates.expected_cost(cost)) / full, 4)
    return history


# --- deterministic gates -> weights + plan -----------------------------------------------------------


@torch.no_grad()
def fold_gates(model, heads: list[torch.Tensor | None], ffn: list[torch.Tensor | None], hidden: torch.Tensor | None = None) -> list:
    """Multiply the kept units' gate values into the weights and return the plan removing the zeros.
    After shrink.surgery applies the plan the model equals the gated one exactly, except that removed
    hidden dims change the LayerNorms' statistics (see the module docstring)."""
    adapter, size = adapter_of(model), head_size(model)
    keep_heads, keep_ffn = {}, {}
    for i, layer in enumerate(layers_of(model)):
        for gate, path, unit, keep in ((heads[i], adapter.attention_out, size, keep_heads), (ffn[i], adapter.ffn_out, 1, keep_ffn)):
            if gate is None or not gate.numel():
                continue
            linear = runtime.get_module(layer, path)
            weight = runtime.kind_of(linear).input_weight(linear)  # its columns are the heads' / neurons' outputs
            weight.mul_(gate.to(weight).repeat_interleave(unit)[None, :])
            kept = [j for j in range(gate.numel()) if gate[j] > 0]
            if len(kept) < gate.numel():
                keep[i] = kept
    plan = ([KeepHeads(keep_heads)] if keep_heads else []) + ([KeepFFN(keep_ffn)] if keep_ffn else [])
    if hidden is None:
        return plan
    for writer in stream_writers(model):  # LN(x) * z = LN with weight * z, bias * z; a Linear: rows * z
        out = writer.second if isinstance(writer, runtime.LowRankLinear) else writer
        z = hidden.to(out.weight)
        out.weight.mul_(z if isinstance(writer, torch.nn.LayerNorm) else z[:, None])
        if out.bias is not None:
            out.bias.mul_(z)
    kept = [j for j in range(hidden.numel()) if hidden[j] > 0]
    return plan + ([KeepHidden(kept)] if len(kept) < hidden.numel() else [])


def _counts(heads, ffn) -> tuple[list[int], list[int]]:
    return ([int((h > 0).sum()) if h is not None else 0 for h in heads],
            [int((f > 0).sum()) if f is not None else 0 for f in ffn])


@register("l0", options=L0Options, target=L0Target, trains=True, min_train_fraction=lambda options: options.target_warmup,
          smoke={"target": {"params_fraction": 0.5}, "options": {"max_steps": 3}})
def l0(ctx: Context, target: L0Target, options: L0Options) -> StepResult:
    """Learn hard-concrete L0 gates on heads, FFN neurons, sub-layers (opt-in: hidden dims) to a size/FLOPs/speed target."""

    started = time.perf_counter()
    model = ctx.model
    if "hidden" in options.prune and task_head(model) is None and not options.allow_embedding_width_change:
        raise BadInputError("l0: pruning the hidden dims would make this embedding model's output narrower",
                            hint="use a task model, drop hidden from prune, or set options.allow_embedding_width_change: true")
    if "hidden" in options.prune:
        check_hidden_pruning(model)
    heads, ffn, width = heads_per_layer(model), ffn_per_layer(model), hidden_size(model)
    cost, wanted, cost_info = target_cost(model, target, options)
    gates = L0Gates(heads, ffn, options.prune, options.ffn_block, options.log_alpha_init, width, options.hidden_block)
    floor = _floor(gates, cost, options.prune)
    if wanted <= floor + 1e-6:
        what = f"speedup {target.speedup}" if target.speedup else f"{cost.name} fraction {wanted}"
        reach = f"{1 / floor:.2f}x" if target.speedup else f"{floor:.3f}"
        raise BadInputError(
            f"l0: {what} is out of reach: removing every unit of {', '.join(options.prune)} leaves {reach}",
            hint="prune more kinds (heads, ffn, attention_layers, ffn_layers, hidden) or aim lower",
        )
    terms = loss_terms(options.loss, model, ctx.has_labels)
    history = train_gates(model, ctx.teacher, ctx.calibration, gates, cost, wanted, options, terms, seed=ctx.seed)
    head_values, blocks, hidden_values, snap = gates.final_values(cost, wanted)
    ffn_values = gates.expand(blocks)
    head_values = [h if n else None for h, n in zip(head_values, heads)]
    ffn_values = [f if n else None for f, n in zip(ffn_values, ffn)]
    plan = fold_gates(model, head_values, ffn_values, hidden_values)

    kept_heads, kept_ffn = _counts(head_values, ffn_values)
    hidden_kept = int((hidden_values > 0).sum()) if hidden_values is not None else width
    r = hidden_kept / width
    achieved = cost.of_counts(kept_heads, kept_ffn, r) / gates.full_cost(cost)
    p_cost, f_cost = params_cost(model), flops_cost(model, options.seq_len)
    stats = {
        "target": {k: v for k, v in target.model_dump().items() if v is not None},
        "cost_kind": cost.name,
        "target_fraction": round(wanted, 4),
        "achieved_fraction": round(achieved, 4),
        "params_fraction": round(p_cost.of_counts(kept_heads, kept_ffn, r) / p_cost.of_counts(heads, ffn), 4),
        "flops_fraction": round(f_cost.of_counts(kept_heads, kept_ffn, r) / f_cost.of_counts(heads, ffn), 4),
        "heads_per_layer": kept_heads,
        "ffn_per_layer": kept_ffn,
        "hidden_kept": hidden_kept,
        "hidden_before": width,
        "attention_layers_removed": [i for i, (a, b) in enumerate(zip(heads, kept_heads)) if a and not b],
        "ffn_layers_removed": [i for i, (a, b) in enumerate(zip(ffn, kept_ffn)) if a and not b],
        "loss": terms,
        **snap,
        "training": history,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if target.speedup is not None:
        stats["predicted_speedup"] = round(1 / achieved, 3)
        table = cost_info["latency_table"]
        stats["latency_table"] = {k: table[k] for k in ("coefficients_ms", "p50_ms", "cached")}
    return StepResult(plan=plan, stats=stats)
