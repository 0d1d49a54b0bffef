"""Recovery after pruning: distillation from the original model (shrink.train.loop).

With `layerdrop` > 0 it is LayerDrop training (Fan et al. 2020, "Reducing Transformer Depth on Demand
with Structured Dropout"): every forward pass bypasses each layer with that probability (a layer gate
of 0, shrink.surgery.gates, is exactly what removing the layer does), so the model learns to work
without any of them and can later be cut to a smaller depth (`layers.drop`, strategy `every_other`,
which the paper found best) with little loss and no further training."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from shrink.methods.base import Context, StepResult, Strict, register
from shrink.surgery import encoder_weights, layers_of
from shrink.surgery.gates import Gates
from shrink.train.loop import distill


class DistillOptions(Strict):
    epochs: float = Field(1, gt=0, description="passes over the calibration split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(5e-5, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up")
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    early_stop_patience: int | None = Field(None, ge=1, description="evaluations without improvement before stopping")
    loss: list[Literal["auto", "task", "logits_kl", "hidden_mse", "embedding_cosine", "embedding_relation", "teacher"]] = Field(default_factory=lambda: ["auto"])
    dropout: bool = Field(True, description="train with the model's dropout; false for near-lossless recovery, where its noise exceeds the gap")
    layerdrop: float = Field(0.0, ge=0, lt=1, description="LayerDrop: probability that a layer is bypassed in a training step (Fan et al. 2020); 0 = off")


# A matrix with at least this share of exact zeros was pruned (weights.magnitude): trained dense
# weights are practically never exactly zero, so recovery keeps those zeros instead of refilling them.
SPARSE_MATRIX_ZEROS = 0.05


@register("distill", options=DistillOptions, trains=True,
          smoke={"options": {"max_steps": 2}})
def distill_step(ctx: Context, target, options: DistillOptions) -> StepResult:
    """Recover quality by distilling the original model into the slim one."""

    # Early stopping watches every tenth calibration batch, never the report's held-out split.
    train, watch = ctx.calibration, None
    if options.early_stop_patience and len(ctx.calibration) >= 2:
        watch = ctx.calibration[::10]
        train = [b for i, b in enumerate(ctx.calibration) if i % 10]
    hold_zeros = sparsity_keeper(ctx.model)
    if options.layerdrop == 0:
        history = run_distill(ctx, options, train, watch, None, hold_zeros)
    else:  # gates only when asked for: without LayerDrop the training is exactly what it always was
        with Gates(ctx.model) as gates:
            before_step, after_step = layer_dropper(gates, len(layers_of(ctx.model)), options.layerdrop, ctx.seed, hold_zeros)
            history = run_distill(ctx, options, train, watch, before_step, after_step)
    ctx.model.eval()
    return StepResult(plan=None, stats={"distill": history})


def run_distill(ctx: Context, options: DistillOptions, train, watch, before_step, after_step) -> dict:
    return distill(
        ctx.model,
        ctx.teacher,
        train,
        eval_batches=watch,
        epochs=options.epochs,
        max_steps=options.max_steps,
        lr=options.lr,
        warmup=options.warmup,
        grad_clip=options.grad_clip,
        grad_accum=options.grad_accum,
        early_stop_patience=options.early_stop_patience,
        loss=tuple(options.loss),
        dropout=options.dropout,
        device=ctx.device,
        before_step=before_step,
        on_step=after_step,  # runs before any early-stop snapshot, so restored weights keep the zeros too
    )


def layer_dropper(gates: Gates, layers: int, rate: float, seed: int, after=None):
    """(before_step, after_step) callbacks for LayerDrop: before each forward pass, bypass each layer
    with probability `rate` (always keeping one); after each optimizer step, all layers again, so
    early-stopping evaluations and the final model see the whole network."""
    generator = torch.Generator().manual_seed(seed)

    def sample(step: int) -> None:
        keep = (torch.rand(layers, generator=generator) >= rate).float()
        if not keep.any():
            keep[torch.randint(layers, (1,), generator=generator)] = 1.0
        gates.layers = keep

    def restore(done: int, total: int) -> None:
        gates.layers = None
        if after is not None:
            after(done, total)

    return sample, restore


def sparsity_keeper(model):
    """An on_step callback that re-zeroes the weights an earlier pruning step zeroed, or None."""
    weights = {name: w for name, w in encoder_weights(model).items() if (w == 0).float().mean() >= SPARSE_MATRIX_ZEROS}
    if not weights:
        return None
    masks = {name: w != 0 for name, w in weights.items()}

    @torch.no_grad()
    def hold_zeros(step: int, total: int) -> None:
        for name, w in weights.items():
            w.mul_(masks[name])

    return hold_zeros
