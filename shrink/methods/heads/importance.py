"""One-shot head removal baselines: gradient importance (Michel et al. 2019, "Are Sixteen Heads Really
Better than One?") and random removal. Both remove a fixed number of heads in one go; they are what
heads.a_star is measured against.

Gradient importance of head h: I_h = | sum over calibration tokens of dL/dg_h | at gates g = 1, where
the gate g_h scales the head's output (shrink.surgery.gates). As in the paper, importances are normalised by
their L2 norm within each layer before the global ranking, and the lowest-ranked heads go.
"""

from __future__ import annotations

import random

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.surgery import KeepHeads, heads_per_layer
from shrink.surgery.gates import Gates


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
    normalize_per_layer: bool = Field(True, description="L2-normalise importances within each layer (Michel et al.)")


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


@register("heads.importance", options=ImportanceOptions, target=HeadsCountTarget,
          smoke={"target": {"heads_count": 3}, "options": {"calibration_samples": 4, "max_length": 16}})
def heads_importance(ctx: Context, target: HeadsCountTarget, options: ImportanceOptions) -> StepResult:
    """Remove the heads with the lowest gradient importance, in one shot (Michel et al. 2019)."""
    counts = heads_per_layer(ctx.model)
    n_remove = target.count(sum(counts))
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    scores = gradient_importance(ctx, batches)
    if options.normalize_per_layer:
        scores = [s / s.norm().clamp_min(1e-12) if s.numel() else s for s in scores]
    ranked = sorted(((s.item(), layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row)))
    removed = [(layer, h) for _, layer, h in ranked[:n_remove]]
    stats = {"heads_before": sum(counts), "heads_removed": n_remove, "calibration_samples": sum(b["input_ids"].shape[0] for b in batches)}
    return StepResult(plan=plan_without(counts, removed), stats=stats)


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
