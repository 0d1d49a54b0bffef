"""One-shot pruning of the hidden dims (method `hidden.importance`, recipe `hidden-importance`): the
residual stream loses its least important dims everywhere (shrink.surgery.KeepHidden), as CoFi
(Xia et al. 2022) prunes its hidden dims, here scored once instead of learned.

Importance: a gate g of ones, one per hidden dim (and per example), multiplies the stream wherever it
is written: the embeddings' output (ELECTRA: embeddings_project's) and every LayerNorm output inside
the layers (CoFi's hidden_z sits at the same places; the hooks: shrink.methods.stream). A dim's
score is the sum over calibration examples of |dL_x/dg| (`score: abs`, Michel et al.'s first-order
estimate of the loss change when the dim is zeroed) or of (dL_x/dg)^2 (`fisher`). The loss per example is posttrain's: the objective
where it has a task part, else a random projection of the output (a distillation loss has zero
gradient at the original). The top dims are kept; the LayerNorms then normalise over fewer dims, so
the pruned model is not exactly the gated one: follow with `distill`.

An embedding (base) model's output would get narrower, which breaks its users and the embedding
objectives against the original: refused unless `allow_embedding_width_change: true`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.arch import task_head
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.posttrain import example_losses
from shrink.methods.stream import gate_stream
from shrink.models.sentence import check_hidden_pruning
from shrink.surgery import hidden_size
from shrink.surgery.plan import KeepHidden


class HiddenTarget(Strict):
    hidden_fraction: float | None = Field(None, gt=0, le=1, description="fraction of the hidden dims to keep (0.75 when no count is given)")
    hidden_count: int | None = Field(None, ge=1, description="hidden dims to keep")

    @model_validator(mode="after")
    def at_most_one(self):
        if self.hidden_fraction is not None and self.hidden_count is not None:
            raise ValueError("give hidden_fraction or hidden_count, not both")
        return self

    def count(self, total: int) -> int:
        if self.hidden_count is not None:
            if self.hidden_count > total:
                raise BadInputError(f"hidden.importance: cannot keep {self.hidden_count} of the model's {total} hidden dims")
            return self.hidden_count
        return max(1, round((self.hidden_fraction or 0.75) * total))


class HiddenOptions(Strict):
    calibration_samples: int = Field(256, ge=1, description="examples the gradients are summed over")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    score: Literal["abs", "fisher"] = Field("abs", description="abs: sum of |dL/dg| per example; fisher: sum of (dL/dg)^2")
    allow_embedding_width_change: bool = Field(False, description="let a base (embedding) model's output lose dims too")


def hidden_importance(ctx: Context, batches: list[dict], score: str) -> torch.Tensor:
    """[hidden] the summed per-example importance of each hidden dim (see the module docstring)."""
    width, device = hidden_size(ctx.model), next(ctx.model.parameters()).device
    scores, gate = torch.zeros(width, dtype=torch.float64), {}
    handles = gate_stream(ctx.model, lambda: gate["g"])
    generator = torch.Generator().manual_seed(ctx.seed)
    was_training = ctx.model.training
    ctx.model.eval()
    try:
        for batch in batches:
            gate["g"] = torch.ones(batch["input_ids"].shape[0], width, device=device, requires_grad=True)
            (grad,) = torch.autograd.grad(example_losses(ctx, batch, generator).sum(), [gate["g"]])
            scores += (grad.abs() if score == "abs" else grad.square()).sum(0).double().cpu()
    finally:
        for handle in handles:
            handle.remove()
        ctx.model.train(was_training)
    return scores


@register("hidden.importance", options=HiddenOptions, target=HiddenTarget,
          smoke={"target": {"hidden_fraction": 0.75},
                 "options": {"calibration_samples": 4, "max_length": 16, "allow_embedding_width_change": True}})
def prune_hidden_dims(ctx: Context, target: HiddenTarget, options: HiddenOptions) -> StepResult:
    """Keep the most important hidden dims of the residual stream, everywhere (CoFi's hidden dims, scored once; then distill)."""
    if task_head(ctx.model) is None and not options.allow_embedding_width_change:
        raise BadInputError("hidden.importance would make this embedding model's output narrower",
                            hint="use a task model, or set options.allow_embedding_width_change: true")
    check_hidden_pruning(ctx.model)
    total = hidden_size(ctx.model)
    keep = target.count(total)
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    scores = hidden_importance(ctx, batches, options.score)
    kept = sorted(torch.argsort(scores, descending=True)[:keep].tolist())
    stats = {"hidden_before": total, "hidden_after": keep, "calibration_samples": sum(b["input_ids"].shape[0] for b in batches)}
    return StepResult(plan=[KeepHidden(kept)] if keep < total else [], stats=stats)
