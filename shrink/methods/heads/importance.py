"""Head removal baselines: gradient importance (Michel et al. 2019, "Are Sixteen Heads Really Better
than One?"), one-shot or iterative, and random removal; they are what heads.a_star is measured against.

Gradient importance of head h: I_h = | sum over calibration tokens of dL/dg_h | at gates g = 1, where
the gate g_h scales the head's output (shrink.surgery.gates). As in the paper, importances are normalised by
their L2 norm within each layer before the global ranking (`normalize: layer`, the default; `none`
ranks the raw scores), and the lowest-ranked heads go.

`iterations: N` (default 1: one shot) is the paper's iterative pruning: the target's heads go in N
rounds of about equal size, the importances re-estimated after each round on the model as that round
left it: the round's heads are physically removed from ctx.model (shrink.surgery.apply, KeepHeads),
so the next round's gradients are those of the smaller model, never of a gated copy. With
`recovery_steps: M` each round but the last is followed by M optimizer steps of training on the
calibration split with ctx.objective (shrink.train.loop.train; Michel et al. do not fine-tune between
rounds, this is an option, off by default). The last round's removal is the step's plan (current
positions); the earlier rounds are already in the model and its manifest, so the slim checkpoint
replays every round. stats["rounds"] lists each round's heads in ORIGINAL positions (layer, head).

Not reproduced: the paper prunes 10% of the heads per round until the accuracy drops (here a fixed
target in N equal rounds) and estimates importance on the task loss with labels (here ctx.objective:
the task loss where labels are given, else distillation from the original, whose gradient at the
unpruned model is ~0, so a first round on unlabeled data ranks on numerical noise; the later rounds,
on a model that already differs from the original, have real gradients).
"""

from __future__ import annotations

import math
import random
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.posttrain import example_losses
from shrink.methods.taylor import taylor_importance
from shrink.surgery import KeepHeads, apply, heads_per_layer
from shrink.surgery.gates import Gates
from shrink.train.loop import train


class HeadsCountTarget(Strict):
    heads_fraction: float | None = Field(None, gt=0, le=1, description="fraction of all heads to remove")
    heads_count: int | None = Field(None, ge=1, description="number of heads to remove")

    @model_validator(mode="after")
    def exactly_one(self):
        if (self.heads_fraction is None) == (self.heads_count is None):
            raise ValueError("give exactly one of heads_fraction, heads_count")
        return self

    def count(self, total: int) -> int:
        if self.heads_count is not None:
            if self.heads_count > total:
                raise BadInputError(f"heads_count {self.heads_count} is more than the {total} heads the model has")
            return self.heads_count
        return max(1, round(self.heads_fraction * total))


class ImportanceOptions(Strict):
    calibration_samples: int = Field(256, ge=1, description="examples the gradients are summed over")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    normalize_per_layer: bool = Field(True, description="L2-normalise importances within each layer (Michel et al.); `normalize` says the same")
    normalize: Literal["layer", "none"] | None = Field(
        None, description="layer: L2-normalise importances within each layer before the global ranking (Michel et al.); none: raw scores; "
                          "unset: normalize_per_layer decides (true: layer)")
    iterations: int = Field(1, ge=1, description="remove the target's heads in this many rounds, importance re-estimated on the pruned model after each (1: one shot)")
    recovery_steps: int = Field(0, ge=0, description="optimizer steps of training with the run's objective after every round but the last (0: none)")
    recovery_lr: float = Field(5e-5, gt=0, description="learning rate of those steps (AdamW, linear warm-up and decay within each recovery)")
    score: Literal["gradient", "taylor"] = Field(
        "gradient", description="gradient: |dL/dgate| of a gate on each head's output (Michel et al.); taylor: the squared first-order "
                                "Taylor change of removing the head's weights, Q/K/V rows and output columns, per batch (shrink.methods.taylor)")

    @model_validator(mode="after")
    def one_normalisation(self):
        if self.normalize is not None and "normalize_per_layer" in self.model_fields_set and self.normalize_per_layer != (self.normalize == "layer"):
            raise ValueError(f"normalize {self.normalize!r} contradicts normalize_per_layer {self.normalize_per_layer}: give one of them")
        return self

    def per_layer(self) -> bool:
        return self.normalize == "layer" if self.normalize is not None else self.normalize_per_layer


class RandomOptions(Strict):
    seed: int | None = Field(None, description="defaults to the run's --seed")


def plan_without(counts: list[int], removed: list[tuple[int, int]]) -> list:
    """Plan keeping every head except the (layer, head) pairs in `removed`."""
    keep = {}
    for layer, n in enumerate(counts):
        gone = {h for l, h in removed if l == layer}
        if gone:
            keep[layer] = [h for h in range(n) if h not in gone]
    return [KeepHeads(keep)] if keep else []


def gradient_importance(ctx: Context, batches: list[dict]) -> list[torch.Tensor]:
    """|dL/dgate| summed over the batches, one tensor per layer."""
    model, counts = ctx.model, heads_per_layer(ctx.model)
    scores = [torch.zeros(n) for n in counts]
    with Gates(model) as gates:
        device = next(model.parameters()).device
        gate_params = [torch.ones(n, device=device, requires_grad=True) if n else None for n in counts]
        gates.heads = gate_params
        for batch in batches:
            with torch.no_grad():
                targets = ctx.objective.targets(batch)
            loss = ctx.objective(model, batch, targets)
            grads = torch.autograd.grad(loss, [g for g in gate_params if g is not None])
            for layer, grad in zip([i for i, g in enumerate(gate_params) if g is not None], grads):
                scores[layer] += grad.detach().cpu() * batch["input_ids"].shape[0]
    return [s.abs() for s in scores]


def head_scores(ctx: Context, batches: list[dict], options: ImportanceOptions) -> list[torch.Tensor]:
    if options.score == "taylor":  # the objective where it has a gradient, else posttrain's per-example probe
        generator = torch.Generator().manual_seed(ctx.seed)
        return taylor_importance(ctx, batches, lambda batch: example_losses(ctx, batch, generator).sum())[0]
    return gradient_importance(ctx, batches)


def normalised(scores: list[torch.Tensor], per_layer: bool) -> list[torch.Tensor]:
    if not per_layer:
        return scores
    return [s / s.norm().clamp_min(1e-12) if s.numel() else s for s in scores]


def lowest(scores: list[torch.Tensor], n: int) -> list[tuple[int, int]]:
    """The n (layer, head) pairs with the lowest scores (ties: the lower layer, then head, first)."""
    ranked = sorted(((s.item(), layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row)))
    return [(layer, h) for _, layer, h in ranked[:n]]


def round_sizes(n_remove: int, iterations: int) -> list[int]:
    """n_remove heads in min(iterations, n_remove) rounds of about equal size, the larger ones first."""
    rounds = max(1, min(iterations, n_remove))
    return [n_remove // rounds + (1 if r < n_remove % rounds else 0) for r in range(rounds)]


@register("heads.importance", options=ImportanceOptions, target=HeadsCountTarget,
          smoke={"target": {"heads_count": 3}, "options": {"calibration_samples": 4, "max_length": 16, "iterations": 2, "recovery_steps": 1}})
def heads_importance(ctx: Context, target: HeadsCountTarget, options: ImportanceOptions) -> StepResult:
    """Remove the heads with the lowest gradient importance, in one shot or in rounds (Michel et al. 2019)."""
    started = time.perf_counter()
    counts = heads_per_layer(ctx.model)
    n_remove = target.count(sum(counts))
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    stats = {"heads_before": sum(counts), "heads_removed": n_remove, "calibration_samples": sum(b["input_ids"].shape[0] for b in batches)}
    if options.iterations == 1:  # one shot: exactly what it always was
        removed = lowest(normalised(head_scores(ctx, batches, options), options.per_layer()), n_remove)
        return StepResult(plan=plan_without(counts, removed), stats=stats)

    sizes = round_sizes(n_remove, options.iterations)
    alive = [list(range(n)) for n in counts]  # per layer: the original position of each current head
    rounds, plan = [], []
    for index, size in enumerate(sizes):
        current = heads_per_layer(ctx.model)
        removed = lowest(normalised(head_scores(ctx, batches, options), options.per_layer()), size)
        plan = plan_without(current, removed)
        record = {"removed": sorted([layer, alive[layer][h]] for layer, h in removed)}
        for layer, h in sorted(removed, reverse=True):
            del alive[layer][h]
        last = index == len(sizes) - 1
        if not last:  # the next round scores the smaller model: remove the heads now
            apply(ctx.model, plan)
            if options.recovery_steps:
                record["recovery"] = recover(ctx, options, index, batches)
        rounds.append(record)
    stats.update({
        "iterations": len(sizes),
        "round_sizes": sizes,
        "normalize": "layer" if options.per_layer() else "none",
        "recovery_steps": options.recovery_steps,
        "rounds": rounds,
        "kept_per_layer": [len(a) for a in alive],
        "seconds": round(time.perf_counter() - started, 2),
    })
    return StepResult(plan=plan, stats=stats)  # the last round; the earlier ones are in the model already


def recover(ctx: Context, options: ImportanceOptions, index: int, batches: list[dict]) -> dict:
    """options.recovery_steps steps of training with ctx.objective after round `index`, on the same
    calibration_samples the importance is scored on (a scoring method never reads the whole split)."""
    if not batches:
        raise BadInputError("heads.importance: recovery_steps needs calibration batches", hint="the calibration split is empty; set recovery_steps: 0")
    steps = options.recovery_steps
    history = train(ctx.model, batches, ctx.objective, epochs=math.ceil(steps / len(batches)), max_steps=steps,
                    lr=options.recovery_lr, seed=ctx.seed + index, label=f"heads.importance recovery {index + 1}")
    ctx.model.eval()
    losses = history["losses"]
    return {"steps": history["steps"], "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


@register("heads.random", options=RandomOptions, target=HeadsCountTarget,
          smoke={"target": {"heads_count": 3}})
def heads_random(ctx: Context, target: HeadsCountTarget, options: RandomOptions) -> StepResult:
    """Remove randomly chosen heads (a baseline)."""
    counts = heads_per_layer(ctx.model)
    all_heads = [(layer, h) for layer, n in enumerate(counts) for h in range(n)]
    n_remove = target.count(len(all_heads))
    rng = random.Random(ctx.seed if options.seed is None else options.seed)
    removed = rng.sample(all_heads, n_remove)
    return StepResult(plan=plan_without(counts, removed), stats={"heads_before": len(all_heads), "heads_removed": n_remove})
