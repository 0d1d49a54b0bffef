"""Whole-layer removal (method `layers.drop`, recipe `layer-drop`): the trivial baseline every
finer-grained method must beat, and often a strong one.

Which layers go:
- `top`: the top-most layers (Sajjad et al. 2023, "On the effect of dropping layers of pre-trained
  transformer models", the "poor man's BERT": top-layer dropping is the best of their simple strategies).
- `every_other`: alternate layers from the top down (6 layers, 2 removed: 5 and 3), then the rest
  from the top; what Fan et al. 2020 found best for cutting a LayerDrop-trained model (`distill` with
  `layerdrop`), which needs no recovery afterwards.
- `importance`: greedy by measured damage. Each round bypasses, one at a time, every layer still
  present (a layer gate of 0 passes the residual stream through, exactly what removal does) and
  removes the one whose bypass raises the calibration objective least, measured exactly on the
  calibration subset; then the next round starts from the model without it.

The plan is one DropLayers op; recovery is the `distill` step that follows in the recipe.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.console import progress
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.l0.latency_table import latency_cost
from shrink.surgery import ffn_per_layer, heads_per_layer, layers_of
from shrink.surgery.gates import Gates
from shrink.surgery.plan import DropLayers


class LayersTarget(Strict):
    layers_count: int | None = Field(None, ge=1, description="number of layers to remove")
    layers_fraction: float | None = Field(None, gt=0, lt=1, description="fraction of the layers to remove")
    speedup: float | None = Field(None, gt=1, description="ONNX Runtime speedup (batch 1, 128 tokens, one thread) from the measured latency table: the fewest layers that reach it")

    @model_validator(mode="after")
    def exactly_one(self):
        if sum(v is not None for v in (self.layers_count, self.layers_fraction, self.speedup)) != 1:
            raise ValueError("give exactly one of layers_count, layers_fraction, speedup")
        return self

    def count(self, total: int) -> int:
        """Layers to remove for a count or fraction target (a speedup is priced by count_for_speedup)."""
        count = self.layers_count if self.layers_count is not None else round(self.layers_fraction * total)
        if count >= total:
            raise BadInputError(f"removing {count} of the model's {total} layers would leave none", hint="keep at least one layer")
        return max(1, count)


class LayerDropOptions(Strict):
    strategy: Literal["top", "every_other", "importance"] = Field(
        "top", description="top: the top-most layers; every_other: alternate layers from the top; importance: greedy, least measured damage first")
    calibration_samples: int = Field(64, ge=1, description="examples the importance strategy scores on")
    max_length: int = Field(64, ge=8, description="tokens per scored example")
    batch_size: int = Field(32, ge=1)


@torch.no_grad()
def bypass_losses(ctx: Context, batches: list[dict], present: list[int], total: int) -> dict[int, float]:
    """Mean objective with each layer in `present` bypassed (the others in `present` kept, the rest
    already bypassed), one layer at a time."""
    losses = {}
    targets = [ctx.objective.targets(batch) for batch in batches]
    with Gates(ctx.model) as gates:
        for layer in present:
            gate = torch.zeros(total)
            gate[[i for i in present if i != layer]] = 1.0
            gates.layers = gate
            scored = [ctx.objective.per_sample(ctx.model, b, t) for b, t in zip(batches, targets)]
            losses[layer] = float(torch.cat(scored).mean())
    return losses


def greedy_by_importance(ctx: Context, count: int, options: LayerDropOptions) -> tuple[list[int], list[dict]]:
    """Layers (current positions) to remove, chosen greedily; and the loss after each removal."""
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    total = len(layers_of(ctx.model))
    present, removed, rounds = list(range(total)), [], []
    was_training = ctx.model.training
    ctx.model.eval()
    with progress() as bar:
        task = bar.add_task("layers.drop", total=count, status="")
        for _ in range(count):
            losses = bypass_losses(ctx, batches, present, total)
            best = min(losses, key=losses.get)
            present.remove(best)
            removed.append(best)
            rounds.append({"removed": best, "loss": round(losses[best], 6)})
            bar.update(task, advance=1, status=f"layer {best}, loss {losses[best]:.4f}")
    ctx.model.train(was_training)
    return sorted(removed), rounds


def count_for_speedup(model, speedup: float) -> tuple[int, dict]:
    """The fewest layers whose removal the measured latency table predicts reaches `speedup`."""
    cost, table = latency_cost(model)
    heads, ffn = heads_per_layer(model), ffn_per_layer(model)
    dense = cost.of_counts(heads, ffn)
    for count in range(1, len(heads)):
        kept = len(heads) - count  # every layer costs about the same; which ones go does not change the price
        predicted = cost.of_counts(heads[:kept], ffn[:kept])
        if predicted <= dense / speedup:
            return count, {"predicted_speedup": round(dense / predicted, 3), "latency_table": table}
    raise BadInputError(f"layers.drop cannot reach a {speedup}x speedup and keep a layer",
                        hint="lower target.speedup")


@register("layers.drop", options=LayerDropOptions, target=LayersTarget,
          smoke={"target": {"layers_count": 1}, "options": {"strategy": "importance", "calibration_samples": 4, "max_length": 16}})
def drop_layers(ctx: Context, target: LayersTarget, options: LayerDropOptions) -> StepResult:
    """Remove whole layers: the top ones, or greedily the least important (then distill)."""
    total = len(layers_of(ctx.model))
    priced = {}
    if target.speedup is not None:
        count, priced = count_for_speedup(ctx.model, target.speedup)
    else:
        count = target.count(total)
    if options.strategy == "top":
        positions, rounds = list(range(total - count, total)), []
    elif options.strategy == "every_other":
        order = list(range(total - 1, -1, -2)) + list(range(total - 2, -1, -2))
        positions, rounds = sorted(order[:count]), []
    else:
        positions, rounds = greedy_by_importance(ctx, count, options)
    return StepResult(
        plan=[DropLayers(positions)],
        stats={"strategy": options.strategy, "removed_layers": positions, "rounds": rounds, **priced},
    )
