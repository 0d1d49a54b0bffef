"""Head pruning with learned stochastic gates (after Voita et al. 2019, "Analyzing Multi-Head
Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned"), method `heads.gates`.

Every head h gets a scalar gate g_h that multiplies its output (its slice of the attention context
before the output projection; shrink.surgery.gates). The gate is hard concrete (Louizos et al. 2018;
shrink.methods.l0.hard_concrete): a learned log_alpha_h, a fresh stochastic draw before every forward
pass, exact 0s and 1s much of the time, and a differentiable probability of being open:

    L = objective(model with gates g ~ HardConcrete(log_alpha)) + penalty * sum_h P(g_h != 0)

The objective is ctx.objective: the task loss with labels, else distillation from the original (logits
KL with a task head, embedding cosine + relation for an embedding model). `penalty` is the paper's
lambda; with no target the heads whose deterministic (test-time) gate is above 0.5 are kept.

With a target (`heads_fraction` / `heads_count`: heads to REMOVE, as for every heads.* method) exactly
that many go: after training the heads with the smallest log_alpha (equivalently P(g != 0)) are
removed, `min_heads_per_layer` respected. With a target and no penalty, the penalty is a Lagrangian
(as in the `l0` method, Wang et al. 2020) that drives the expected fraction of open heads
s = sum_h P(g_h != 0) / N to the kept fraction t, annealed from s at the start over the first
`target_warmup` of the steps:

    L = objective + lambda1 * (s - t) + lambda2 * (s - t)^2      (lambda1, lambda2 by gradient ascent)

so the final top-K agrees with what the gates learned instead of overriding it. With a target and a
penalty, the fixed penalty trains the gates and the top-K decides.

`train_model` (default true): Voita et al. fine-tune the converged model jointly with the gates; so
does this by default (AdamW at `lr` on the weights, word embeddings frozen unless `train_embeddings`;
Adam at `gate_lr` on the gates, both with the loop's warm-up and linear decay). false: the weights
stay frozen and only the gates learn (then they are the loop's parameters, gradient-clipped).

At the end the removed heads become a KeepHeads plan (a layer may lose every head: shrink.surgery
leaves it LayerNorm(residual + output bias)) and the kept heads stay whole: the gates are dropped, as
Voita et al. evaluate the pruned model. `fold_gates: true` instead folds the kept heads' test-time
gate values into the columns of the attention output projection, so the slim model equals the model
at its test-time gates (a head the target keeps although its gate is closed, value 0, is kept at 1:
`stats.reopened`). On MiniLM (256 examples, 48 steps, a Lagrangian pushed harder with lambda_lr 0.3,
so that many kept gates were partly closed) folding cost 0.06 of held-out embedding cosine after
recovery (0.839 against 0.899 unfolded), hence off by default; at the defaults the two agree
(0.9014, 0.9016). The recipe `heads-gates` recovers with `distill`.

Reproduced: one hard-concrete gate per head, Louizos et al.'s parameters (beta 2/3, stretch to
(-0.1, 1.1)), the penalty lambda * sum P(g != 0), joint fine-tuning from the trained model, test-time
gates. Not reproduced: Voita et al. train machine translation on the task cross-entropy (here the
objective is distillation from the original unless the data has labels); the Lagrangian controller
for an exact head count and the final top-K are ours (the paper sweeps lambda to reach a count); the
paper's gate initialisation and learning rates are not known here, the defaults are ours
(log_alpha 2.0: every gate open with P ~ 0.97).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.hard_concrete import deterministic, keep_probability, sample
from shrink.surgery import KeepHeads, adapter_of, heads_per_layer, layers_of, runtime, word_embeddings_of
from shrink.surgery.gates import Gates
from shrink.surgery.ops import head_size
from shrink.train.loop import Hooks, WarmupDecay, total_steps, train


class GatesTarget(Strict):
    heads_fraction: float | None = Field(None, gt=0, le=1, description="fraction of all heads to remove")
    heads_count: int | None = Field(None, ge=1, description="number of heads to remove")

    @model_validator(mode="after")
    def at_most_one(self):
        if self.heads_fraction is not None and self.heads_count is not None:
            raise ValueError("give at most one of heads_fraction, heads_count (none: options.penalty decides)")
        return self

    def count(self, total: int) -> int | None:
        """Heads to remove, or None when no target is given."""
        if self.heads_count is not None:
            if self.heads_count > total:
                raise BadInputError(f"heads_count {self.heads_count} is more than the {total} heads the model has")
            return self.heads_count
        if self.heads_fraction is not None:
            return max(1, round(self.heads_fraction * total))
        return None


class GateTraining(Strict):
    """Training options shared by heads.gates and heads.dsp."""

    epochs: float = Field(1, gt=0, description="passes over the calibration split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(5e-5, gt=0, description="learning rate of the model weights (when they are trained)")
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up (weights and gates)")
    grad_clip: float = Field(1.0, gt=0)
    dropout: bool = Field(True, description="train with the model's dropout")
    train_embeddings: bool = Field(False, description="also train the word embeddings when the weights train (slow on CPU)")
    min_heads_per_layer: int = Field(0, ge=0, description="heads every layer keeps at least (0: a layer may lose all its heads)")


class GatesOptions(GateTraining):
    penalty: float | None = Field(None, ge=0, description="Voita's lambda: the loss adds penalty * sum of P(gate open); "
                                  "required without a target; with a target and none, a Lagrangian reaches the count")
    train_model: bool = Field(True, description="fine-tune the weights jointly with the gates (Voita et al.); false: weights frozen")
    gate_lr: float = Field(0.2, gt=0, description="learning rate of the gates' log_alpha")
    lambda_lr: float = Field(0.05, gt=0, description="learning rate (ascent) of the Lagrange multipliers (target without penalty)")
    target_warmup: float = Field(0.5, ge=0, lt=1, description="fraction of steps over which the kept fraction is annealed to the target")
    log_alpha_init: float = Field(2.0, description="initial log_alpha (2.0: every gate open with P ~ 0.97)")
    fold_gates: bool = Field(False, description="fold the kept heads' test-time gate values (< 1 where a gate is partly closed) "
                             "into the output projection; false (default): kept heads are kept whole")


# --- shared by heads.gates and heads.dsp ----------------------------------------------------------


def split_layers(values: torch.Tensor, counts: list[int]) -> list[torch.Tensor | None]:
    """A flat (N,) tensor over all heads -> one tensor per layer (None where the layer has no heads)."""
    parts = torch.split(values, counts)
    return [part if n else None for part, n in zip(parts, counts)]


def top_k_heads(scores: torch.Tensor, counts: list[int], keep: int, min_per_layer: int = 0) -> list[list[int]]:
    """The `keep` heads with the largest scores over all layers (a flat (N,) tensor), at least
    `min_per_layer` in every layer that has heads (fewer where it has fewer). Ties: lower layer and
    head first. Returns the kept head positions per layer."""
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    ranked = sorted(((-float(scores[o + h]), i, h) for i, (o, n) in enumerate(zip(offsets, counts)) for h in range(n)))
    floor = [min(min_per_layer, n) for n in counts]
    if sum(floor) > keep:
        raise BadInputError(f"min_heads_per_layer {min_per_layer} needs {sum(floor)} heads but only {keep} are kept",
                            hint="lower min_heads_per_layer or remove fewer heads")
    kept: list[set[int]] = [set() for _ in counts]
    for _, i, h in ranked:  # each layer's best heads first, up to its floor
        if len(kept[i]) < floor[i]:
            kept[i].add(h)
    left = keep - sum(floor)
    for _, i, h in ranked:
        if left <= 0:
            break
        if h not in kept[i]:
            kept[i].add(h)
            left -= 1
    return [sorted(k) for k in kept]


def keep_plan(counts: list[int], kept: list[list[int]]) -> list:
    """KeepHeads for the layers that lose heads ([] when none does)."""
    keep = {i: k for i, (n, k) in enumerate(zip(counts, kept)) if n and len(k) < n}
    return [KeepHeads(keep)] if keep else []


def per_layer_summary(values: torch.Tensor, counts: list[int]) -> list[float | None]:
    return [round(float(v.mean()), 4) if v is not None else None for v in split_layers(values, counts)]


def train_with_head_gates(ctx: Context, gate_params: Sequence[torch.nn.Parameter], gate_lr: float, train_model: bool,
                          options: GateTraining, hooks: Hooks, label: str, extra_optimizers: Sequence[torch.optim.Optimizer] = ()) -> dict:
    """Train on ctx.calibration with ctx.objective through shrink.train.loop.train, the head gates'
    parameters learned beside (train_model) or instead of (frozen weights) the model's. The gates'
    learning rate follows the loop's warm-up and linear decay either way. Requires_grad is restored
    afterwards; returns the loop's history."""
    model = ctx.model
    if not ctx.calibration:
        raise BadInputError(f"{label}: no training batches", hint="the calibration split is empty")
    if train_model:
        frozen = [] if options.train_embeddings else list(word_embeddings_of(model).parameters())
    else:
        frozen = list(model.parameters())
    frozen = [p for p in frozen if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    extra = list(extra_optimizers)
    after = list(hooks.after_step)
    if train_model:
        gate_optimizer = torch.optim.Adam(gate_params, lr=gate_lr)
        steps = total_steps(len(ctx.calibration), options.epochs, max_steps=options.max_steps)
        factor = WarmupDecay(steps, options.warmup)
        for group in gate_optimizer.param_groups:
            group["lr"] = gate_lr * factor(0)

        def gate_schedule(done: int, total: int, loss: float) -> None:
            factor.total = total  # a time budget may shorten the run: the decay ends with it
            for group in gate_optimizer.param_groups:
                group["lr"] = gate_lr * factor(done)

        extra.insert(0, gate_optimizer)
        after.insert(0, gate_schedule)
    hooks = Hooks(before_step=hooks.before_step, extra_loss=hooks.extra_loss, after_step=after, status=hooks.status, stop=hooks.stop)
    try:
        return train(
            model, ctx.calibration, ctx.objective, epochs=options.epochs, max_steps=options.max_steps,
            lr=options.lr if train_model else gate_lr, warmup=options.warmup, grad_clip=options.grad_clip, seed=ctx.seed,
            params=None if train_model else list(gate_params), extra_optimizers=extra, hooks=hooks,
            dropout=options.dropout, label=label,
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()


def log_every(history: list, row: Callable[[int, float], dict]):
    """An after_step hook appending row(step, loss) to history about 20 times a run (and the last step)."""

    def log(done: int, total: int, loss: float) -> None:
        every = max(1, total // 20)
        if (done - 1) % every == 0 or done == total:
            history.append({"step": done - 1, "loss": round(loss, 6), **row(done - 1, loss)})

    return log


def stats_of(values: torch.Tensor) -> dict:
    return {"min": round(float(values.min()), 4), "mean": round(float(values.mean()), 4), "max": round(float(values.max()), 4)}


# --- heads.gates ----------------------------------------------------------------------------------


@torch.no_grad()
def fold_head_values(model, values: list[torch.Tensor | None]) -> None:
    """Scale each head's columns of the attention output projection by its value (1: unchanged)."""
    adapter, size = adapter_of(model), head_size(model)
    for layer, gate in zip(layers_of(model), values):
        if gate is None or not gate.numel() or bool((gate == 1).all()):
            continue
        linear = runtime.get_module(layer, adapter.attention_out)
        weight = runtime.kind_of(linear).input_weight(linear)  # its columns are the heads' outputs
        weight.mul_(gate.to(weight).repeat_interleave(size)[None, :])


@register("heads.gates", options=GatesOptions, target=GatesTarget, trains=True,
          smoke={"target": {"heads_count": 3}, "options": {"max_steps": 3}})
def heads_gates(ctx: Context, target: GatesTarget, options: GatesOptions) -> StepResult:
    """Learn a stochastic hard-concrete gate per head with an L0 penalty and distillation (Voita et al. 2019)."""
    started = time.perf_counter()
    model = ctx.model
    counts = heads_per_layer(model)
    total = sum(counts)
    if total == 0:
        raise BadInputError("heads.gates: the model has no attention heads left to prune")
    remove = target.count(total)
    if remove is None and options.penalty is None:
        raise BadInputError("heads.gates: nothing says how many heads to remove",
                            hint="give a target (heads_fraction or heads_count) or options.penalty (Voita's lambda)")
    keep = None if remove is None else total - remove
    if keep is not None:
        top_k_heads(torch.zeros(total), counts, keep, options.min_heads_per_layer)  # refuse an impossible floor before training
    controlled = keep is not None and options.penalty is None
    device = next(model.parameters()).device
    log_alpha = torch.nn.Parameter(torch.full((total,), float(options.log_alpha_init), device=device))
    multipliers = torch.zeros(2, device=device, requires_grad=True)
    extra = [torch.optim.Adam([multipliers], lr=options.lambda_lr, maximize=True)] if controlled else []
    with torch.no_grad():
        start = float(keep_probability(log_alpha).mean())
    goal = keep / total if keep is not None else None
    now = {"total": total_steps(len(ctx.calibration), options.epochs, max_steps=options.max_steps), "expected": start * total}
    log: list = []

    with Gates(model) as gates:

        def draw(step: int) -> None:
            gates.heads = split_layers(sample(log_alpha), counts)

        def penalty(step: int) -> torch.Tensor:
            expected = keep_probability(log_alpha).sum()
            now["expected"] = float(expected.detach())
            term = torch.zeros((), device=device)
            if options.penalty:
                term = term + options.penalty * expected
            if controlled:
                warm = max(1, int(options.target_warmup * now["total"]))
                now["target"] = goal + (start - goal) * max(0.0, 1 - step / warm)
                gap = expected / total - now["target"]
                term = term + multipliers[0] * gap + multipliers[1] * gap**2
            return term

        def track(done: int, total_now: int, loss: float) -> None:
            now["total"] = total_now

        def row(step: int, loss: float) -> dict:
            extra_row = {"target_heads": round(now["target"] * total, 2), "lambda1": round(float(multipliers[0].detach()), 4),
                         "lambda2": round(float(multipliers[1].detach()), 4)} if controlled else {}
            return {"expected_open_heads": round(now["expected"], 2), **extra_row}

        def status(loss: float) -> str:
            aim = f" -> {now['target'] * total:.1f}" if controlled and "target" in now else ""
            return f"loss {loss:.4f}, open heads ~{now['expected']:.1f}{aim} of {total}"

        hooks = Hooks(before_step=draw, extra_loss=penalty, after_step=[track, log_every(log, row)], status=status)
        history = train_with_head_gates(ctx, [log_alpha], options.gate_lr, options.train_model, options, hooks, "heads.gates", extra)
        gates.clear()

    alpha = log_alpha.detach().cpu()
    probability, value = keep_probability(alpha), deterministic(alpha)
    opened = value > 0.5
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    if keep is None:  # the penalty alone decides: the heads open at test time, each layer's floor kept
        kept = []
        for o, n in zip(offsets, counts):
            heads = [h for h in range(n) if bool(opened[o + h])]
            short = min(options.min_heads_per_layer, n) - len(heads)
            if short > 0:  # the layer's best closed heads up to its floor
                closed = sorted((h for h in range(n) if h not in heads), key=lambda h: (-float(alpha[o + h]), h))
                heads = sorted(heads + closed[:short])
            kept.append(heads)
    else:
        kept = top_k_heads(alpha, counts, keep, options.min_heads_per_layer)

    kept_mask = torch.zeros(total, dtype=torch.bool)
    for o, heads in zip(offsets, kept):
        for h in heads:
            kept_mask[o + h] = True
    reopened = int((kept_mask & (value == 0)).sum())
    if options.fold_gates:
        folded = torch.where(kept_mask & (value > 0), value, torch.ones_like(value))
        fold_head_values(model, split_layers(folded, counts))

    kept_per_layer = [len(k) for k in kept]
    stats = {
        "heads_before": total,
        "heads_kept": int(kept_mask.sum()),
        "heads_removed": total - int(kept_mask.sum()),
        "kept_per_layer": kept_per_layer,
        "layers_without_heads": [i for i, (n, k) in enumerate(zip(counts, kept_per_layer)) if n and not k],
        "decided_by": "penalty (test-time gate > 0.5)" if keep is None else ("penalty + top-K" if options.penalty is not None else "Lagrangian + top-K"),
        "penalty": options.penalty,
        "train_model": options.train_model,
        "objective": ctx.objective.name,
        "gate_probability": {**stats_of(probability), "per_layer_mean": per_layer_summary(probability, counts)},
        "expected_open_heads": {"start": round(start * total, 2), "end": round(float(probability.sum()), 2)},
        "open_at_test_values": int(opened.sum()),
        "closed_at_test_values": int((value == 0).sum()),
        # the target's top-K against the gates' own decision
        "removed_although_open": int((~kept_mask & opened).sum()),
        "kept_although_closed": int((kept_mask & ~opened).sum()),
        "reopened": reopened,
        "gates_folded": options.fold_gates,
        "steps": history["steps"],
        "loss_first": history["losses"][0] if history["losses"] else None,
        "loss_last": history["losses"][-1] if history["losses"] else None,
        "log": log,
        **({"budget": history["budget"]} if "budget" in history else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if controlled:
        stats["lambda"] = [round(float(m), 5) for m in multipliers.detach()]
    return StepResult(plan=keep_plan(counts, kept), stats=stats)
