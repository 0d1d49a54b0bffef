"""One-shot, training-free removal of the same number of heads and FFN neurons in every layer
(method `uniform.importance`, recipe `uniform-importance`): how TextPruner (Yang et al. 2022) prunes
a transformer, here as the baseline that training-free search (posttrain) and trained methods (l0,
layer-drop) must beat at the same measured speedup.

Importance, as in TextPruner and Michel et al. 2019: every head and every FFN neuron gets a gate of 1
(shrink.surgery.gates); the importance of a unit is the sum over calibration examples of |dL_x/dgate|,
the first-order estimate of the loss change when the unit is removed. Each layer keeps its most
important heads and neurons, the same count in every layer.

Target: explicit counts (`heads_per_layer`, `ffn_per_layer` to keep), or a `speedup` priced by the
measured ONNX latency table (shrink.methods.l0.latency_table): one keep fraction for heads and
neurons alike, the largest whose predicted latency is within 1/speedup of the dense model's.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.latency_table import latency_cost
from shrink.methods.posttrain import example_losses
from shrink.methods.taylor import taylor_importance
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
    score: Literal["gradient", "taylor"] = Field(
        "gradient", description="gradient: per-example |dL/dgate| of every head and neuron (TextPruner); taylor: the squared "
                                "first-order Taylor change of removing each unit's weights, per batch, with the run's objective (shrink.methods.taylor)")


def unit_importance(ctx: Context, batches: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the sum over calibration examples of |dL_x/dgate| for every head and FFN neuron.

    Each example gets its own row of gates (shrink.surgery.gates takes (batch, units)), so one backward
    pass gives every example's gradient: a gradient summed over a batch before the absolute value would
    let examples cancel (Michel et al. take the expectation of the absolute value). Without labels the
    per-example loss is posttrain's random projection of the output: a distillation loss has zero
    gradient at the original model."""
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    device = next(ctx.model.parameters()).device
    scores = [torch.zeros(n) for n in heads + ffn]
    generator = torch.Generator().manual_seed(ctx.seed)
    with Gates(ctx.model) as gates:
        for batch in batches:
            rows = batch["input_ids"].shape[0]
            unit_gates = [torch.ones(rows, n, device=device, requires_grad=True) if n else None for n in heads + ffn]
            gates.heads, gates.ffn = unit_gates[: len(heads)], unit_gates[len(heads):]
            live = [g for g in unit_gates if g is not None]
            grads = iter(torch.autograd.grad(example_losses(ctx, batch, generator).sum(), live))
            for score, gate in zip(scores, unit_gates):
                if gate is not None:
                    score += next(grads).detach().abs().sum(0).cpu()
    return scores[: len(heads)], scores[len(heads):]


def counts_for_speedup(ctx: Context, target: UniformTarget, options: UniformOptions) -> tuple[int, int, dict]:
    """Heads and neurons per layer for the largest keep fraction that meets the speedup."""
    cost, table = latency_cost(ctx.model, options.seq_len, threads=1, rounds=options.latency_rounds)
    heads, ffn = heads_per_layer(ctx.model), ffn_per_layer(ctx.model)
    n_heads, n_ffn = max(heads), max(ffn)
    budget = cost.of_counts(heads, ffn) / target.speedup
    for kept_ffn in range(n_ffn, -1, -1):  # one keep fraction, in steps of one neuron so the target is met closely
        kept_heads = round(n_heads * kept_ffn / n_ffn)
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
    if options.score == "taylor":
        generator = torch.Generator().manual_seed(ctx.seed)
        head_scores, ffn_scores = taylor_importance(ctx, batches, lambda batch: example_losses(ctx, batch, generator).sum())
    else:
        head_scores, ffn_scores = unit_importance(ctx, batches)
    plan = []
    if keep_heads is not None:
        plan.append(KeepHeads(keep_top(head_scores, keep_heads)))
    if keep_ffn is not None:
        plan.append(KeepFFN(keep_top(ffn_scores, keep_ffn)))
    stats.update({"heads_per_layer": keep_heads, "ffn_per_layer": keep_ffn,
                  "calibration_samples": sum(b["input_ids"].shape[0] for b in batches)})
    return StepResult(plan=[op for op in plan if op.keep], stats=stats)
