"""Recovery after pruning: distillation from the original model (shrink.distill)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..registry import Context, StepResult, Strict, register


class DistillOptions(Strict):
    epochs: float = Field(1, gt=0, description="passes over the calibration split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    lr: float = Field(5e-5, gt=0)
    warmup: float = Field(0.1, ge=0, lt=1, description="fraction of steps with linear warm-up")
    grad_clip: float = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    early_stop_patience: int | None = Field(None, ge=1, description="evaluations without improvement before stopping")
    loss: list[Literal["auto", "task", "logits_kl", "hidden_mse", "embedding_cosine"]] = Field(default_factory=lambda: ["auto"])


@register("distill", options=DistillOptions)
def distill_step(ctx: Context, target, options: DistillOptions) -> StepResult:
    """Recover quality by distilling the original model into the slim one."""
    from ..distill import distill

    history = distill(
        ctx.model,
        ctx.teacher,
        ctx.calibration,
        eval_batches=None,  # never the report's held-out split
        epochs=options.epochs,
        max_steps=options.max_steps,
        lr=options.lr,
        warmup=options.warmup,
        grad_clip=options.grad_clip,
        grad_accum=options.grad_accum,
        early_stop_patience=options.early_stop_patience,
        loss=tuple(options.loss),
        device=ctx.device,
    )
    ctx.model.eval()
    return StepResult(plan=None, stats={"distill": history})
