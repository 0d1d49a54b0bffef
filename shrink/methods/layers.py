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
- `similarity`: greedy by representation similarity, adapted to whole layers from Fan et al. 2021
  ("Layer-wise Model Pruning based on Mutual Information": a layer's units go by their mutual
  information with what the layer above kept, from the top layer down); linear CKA (Kornblith et al.
  2019) stands in for their MI estimate, and the final hidden states for the layer above. The reference is the
  top layer's output (the final hidden states) of the model as this step gets it, on the calibration
  subset. Each round bypasses, one at a time and from the top down, every layer still present, and
  removes the one whose bypass leaves the final hidden states most similar to the reference (highest
  CKA; a tie goes to the higher layer). Needs no labels and no teacher, only the model itself.

  Linear CKA of n feature rows X (reference) and Y (candidate), both centred per column:
      CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F)
  streamed over batches from the sums X^T X, Y^T Y, Y^T X, sum X, sum Y and n (Xc^T Xc = X^T X - n mx mx^T,
  and so on), in float64. The rows are every unpadded token's hidden state (features `tokens`), or each
  example's mean over its unpadded tokens (`mean`); padding never enters.

The plan is one DropLayers op; recovery is the `distill` step that follows in the recipe.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.arch import model_inputs
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
    strategy: Literal["top", "every_other", "importance", "similarity"] = Field(
        "top", description="top: the top-most layers; every_other: alternate layers from the top; importance: greedy, least measured "
                           "damage first; similarity: greedy, the final hidden states most like the model's own (linear CKA) first")
    calibration_samples: int = Field(64, ge=1, description="examples the importance and similarity strategies score on")
    max_length: int = Field(64, ge=8, description="tokens per scored example")
    batch_size: int = Field(32, ge=1)
    features: Literal["tokens", "mean"] = Field(
        "tokens", description="similarity: CKA over every unpadded token's final hidden state, or over each example's mean of them")


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


class StreamingCKA:
    """Linear CKA (Kornblith et al. 2019) of a fixed reference X and a candidate Y, accumulated batch by
    batch from uncentred sums in float64 (centring is folded in at the end)."""

    def __init__(self, width: int):
        self.n, self.yx, self.yy = 0, torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
        self.xx, self.sum_x, self.sum_y = torch.zeros_like(self.yy), torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.yx += y.T @ x
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)

    def value(self) -> float:
        mx, my = self.sum_x / self.n, self.sum_y / self.n
        xx = self.xx - self.n * torch.outer(mx, mx)
        yy = self.yy - self.n * torch.outer(my, my)
        yx = self.yx - self.n * torch.outer(my, mx)
        return float(yx.square().sum() / (xx.norm() * yy.norm()).clamp(min=1e-30))


def final_features(model, batches: list[dict], features: str) -> list[torch.Tensor]:
    """Per batch, the rows CKA compares: the top layer's output (after the layer gates, so a bypassed
    top layer passes its input through) at every unpadded token, or each example's mean of them."""
    captured = []
    hook = layers_of(model)[-1].register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:  # registered after any Gates' hooks, so it sees the gated output
        rows = []
        for batch in batches:
            captured.clear()
            model(**model_inputs(model, batch))
            hidden, mask = captured[-1], batch["attention_mask"].bool()
            if features == "tokens":
                rows.append(hidden[mask])
            else:
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                rows.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1))
        return rows
    finally:
        hook.remove()


@torch.no_grad()
def bypass_similarities(ctx: Context, batches: list[dict], reference: list[torch.Tensor], present: list[int], total: int,
                        features: str) -> dict[int, float]:
    """CKA between `reference` and the final hidden states with each layer in `present` bypassed (the
    others in `present` kept, the rest already bypassed), one layer at a time, top layer first."""
    similarities = {}
    with Gates(ctx.model) as gates:
        for layer in reversed(present):
            gate = torch.zeros(total)
            gate[[i for i in present if i != layer]] = 1.0
            gates.layers = gate
            cka = StreamingCKA(reference[0].shape[-1])
            for x, y in zip(reference, final_features(ctx.model, batches, features)):
                cka.add(x, y)
            similarities[layer] = cka.value()
    return similarities


def greedy_removal(ctx: Context, count: int, options: LayerDropOptions) -> tuple[list[int], list[dict]]:
    """Layers (current positions) to remove, chosen greedily: by least loss (importance) or most
    similar final hidden states (similarity); and the score after each removal."""
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    total = len(layers_of(ctx.model))
    present, removed, rounds = list(range(total)), [], []
    was_training = ctx.model.training
    ctx.model.eval()
    if options.strategy == "importance":
        name, pick = "loss", min
        score = lambda: bypass_losses(ctx, batches, present, total)
    else:
        name, pick = "cka", max  # max keeps the first best, and bypass_similarities goes top-down
        with torch.no_grad():
            reference = final_features(ctx.model, batches, options.features)
        score = lambda: bypass_similarities(ctx, batches, reference, present, total, options.features)
    with progress() as bar:
        task = bar.add_task("layers.drop", total=count, status="")
        for _ in range(count):
            scores = score()
            best = pick(scores, key=scores.get)
            present.remove(best)
            removed.append(best)
            rounds.append({"removed": best, name: round(scores[best], 6)})
            bar.update(task, advance=1, status=f"layer {best}, {name} {scores[best]:.4f}")
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
    """Remove whole layers: the top ones, alternate ones, or greedily by measured damage or by representation similarity (then distill)."""
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
        positions, rounds = greedy_removal(ctx, count, options)
    return StepResult(
        plan=[DropLayers(positions)],
        stats={"strategy": options.strategy, "removed_layers": positions, "rounds": rounds, **priced},
    )
