"""One-shot, training-free removal of the same number of heads and FFN neurons in every layer
(method `uniform.importance`, recipe `uniform-importance`): how TextPruner (Yang et al. 2022) prunes
a transformer, here as the baseline that training-free search (posttrain) and trained methods (l0,
layer-drop) must beat at the same measured speedup.

Importance, as in TextPruner and Michel et al. 2019: every head and every FFN neuron gets a gate of 1
(shrink.surgery.gates); the importance of a unit is the sum over calibration batches of |dL/dgate|,
the first-order estimate of the loss change when the unit is removed. Each layer keeps its most
important heads and neurons, the same count in every layer.

Target: explicit counts (`heads_per_layer`, `ffn_per_layer` to keep), or a `speedup` priced by the
measured ONNX latency table (shrink.methods.l0.latency_table): one keep fraction for heads and
neurons alike, the largest whose predicted latency is within 1/speedup of the dense model's.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.latency_table import latency_cost
from shrink.surgery import ffn_per_layer, heads_per_layer
from shrink.surgery.gates import Gates
from shrink.surgery.plan import KeepFFN, KeepHeads


class UniformTarget(Strict):
    heads_per_layer: int | None = Field(None, ge=0, description="heads each layer keeps")
    ffn_per_layer: int | None = Field(None, ge=0, description="FFN neurons each layer keeps")
    speedup: float | None = Field(None, gt=1, description="ONNX Runtime speedup (batch 1, seq_len, one thread) from the measured latency table")

    @model_validator(mode="after")
    def one_kind(self):
        counts = self.heads_per_layer is not None or self.ffn_per_layer is not None
        if counts == (self.speedup is not None):
            raise ValueError("give speedup, or heads_per_layer and/or ffn_per_layer")
        return self


class UniformOptions(Strict):
    calibration_samples: int = Field(512, ge=1, description="examples the gradients are summed over")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8, description="tokens at which the latency table is measured")
    latency_rounds: int = Field(30, ge=3, description="timed rounds per variant for the latency table")


def unit_importance(ctx: Context, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sum over batches of |dL/dgate| for every head and FFN neuron (per layer)."""
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    device = next(ctx.model.parameters()).device
    head_gates = [torch.ones(n, device=device, requires_grad=True) if n else None for n in heads]
    ffn_gates = [torch.ones(n, device=device, requires_grad=True) if n else None for n in ffn]
    live = [g for g in head_gates + ffn_gates if g is not None]
    scores = [torch.zeros(g.numel()) for g in live]
    with Gates(ctx.model) as gates:
        gates.heads, gates.ffn = head_gates, ffn_gates
        for batch in batches:
            with torch.no_grad():
                targets = ctx.objective.targets(batch)
            grads = torch.autograd.grad(ctx.objective(ctx.model, batch, targets), live)
            for score, grad in zip(scores, grads):
                score += grad.detach().abs().cpu()
    it = iter(scores)
    per_layer = [next(it) if g is not None else torch.zeros(0) for g in head_gates + ffn_gates]
    return per_layer[: len(heads)], per_layer[len(heads):]


def counts_for_speedup(ctx: Context, target: UniformTarget, options: UniformOptions) -> tuple[int, int, dict]:
    """Heads and neurons per layer for the largest keep fraction that meets the speedup."""
    cost, table = latency_cost(ctx.model, options.seq_len, threads=1, rounds=options.latency_rounds)
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    n_heads, n_ffn = max(heads), max(ffn)
    budget = cost.of_counts(heads, ffn) / target.speedup
    for kept_heads in range(n_heads, -1, -1):  # fewer heads, then as many neurons as the budget allows
        kept_ffn = round(n_ffn * kept_heads / n_heads)
        predicted = cost.of_counts([min(kept_heads, h) for h in heads], [min(kept_ffn, n) for n in ffn])
        if predicted <= budget:
            return kept_heads, kept_ffn, {"predicted_speedup": round(cost.of_counts(heads, ffn) / predicted, 3), "latency_table": table}
    raise BadInputError(f"uniform.importance cannot reach a {target.speedup}x speedup by thinning every layer",
                        hint="lower target.speedup, or use layers.drop / l0, which remove whole sub-layers")


def keep_top(scores: list[torch.Tensor], keep: int) -> dict[int, list[int]]:
    """Per layer, the positions of its `keep` highest scores (in order)."""
    return {layer: sorted(torch.argsort(s, descending=True)[:keep].tolist()) for layer, s in enumerate(scores) if s.numel() > keep}


@register("uniform.importance", options=UniformOptions, target=UniformTarget,
          smoke={"target": {"heads_per_layer": 2, "ffn_per_layer": 16}, "options": {"calibration_samples": 4, "max_length": 16}})
def uniform_importance(ctx: Context, target: UniformTarget, options: UniformOptions) -> StepResult:
    """Keep the most important heads and FFN neurons, the same count in every layer (TextPruner-style, no training)."""
    stats = {}
    if target.speedup is not None:
        keep_heads, keep_ffn, stats = counts_for_speedup(ctx, target, options)
    else:
        keep_heads, keep_ffn = target.heads_per_layer, target.ffn_per_layer
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    head_scores, ffn_scores = unit_importance(ctx, batches)
    plan = []
    if keep_heads is not None:
        plan.append(KeepHeads(keep_top(head_scores, keep_heads)))
    if keep_ffn is not None:
        plan.append(KeepFFN(keep_top(ffn_scores, keep_ffn)))
    stats.update({"heads_per_layer": keep_heads, "ffn_per_layer": keep_ffn,
                  "calibration_samples": sum(b["input_ids"].shape[0] for b in batches)})
    return StepResult(plan=[op for op in plan if op.keep], stats=stats)
