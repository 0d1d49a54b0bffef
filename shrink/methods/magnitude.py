"""Gradual magnitude pruning of individual weights during distillation (Zhu & Gupta 2017, "To prune,
or not to prune"; the weight-pruning half of LadaBERT, Mao et al. 2020).

The step distills the model from the original (shrink.train.loop, same options as the `distill` step)
and, every `prune_every` optimizer steps between `start` and `end` (fractions of the run), zeroes the
smallest-magnitude weights of the encoder's attention and FFN matrices (the factors of a
LowRankLinear included) up to the cubic schedule

    s(t) = s_final + (s_initial - s_final) * (1 - p)^3,   p = (t - t_start) / (t_end - t_start) in [0, 1]

which prunes fast while there are many redundant weights and slowly near the end. Between updates
the zeros are held (re-applied after every optimizer step); after `end` the survivors recover at the
final sparsity. The final model has exactly round(s_final x n) zeros in each pruned matrix (or over
all of them with scope: global).

What it buys, honestly: unstructured zeros do not make dense kernels (PyTorch, ONNX Runtime) any
faster, so no speedup is claimed. The step reports nonzero parameters and the deflate-compressed
size of the weights (zeros compress), next to the dense size. A later `distill` step keeps the zeros
(it re-zeroes matrices that are already sparse after every optimizer step); a later `lowrank.svd`
re-factorizes them densely, so put factorization first.
"""

from __future__ import annotations

import time
import zlib
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.distill import DistillOptions, chain_after
from shrink.surgery import encoder_weights
from shrink.surgery.ops import ENCODER_MODULES as MODULES
from shrink.train.loop import distill
from shrink.train.penalties import Penalties


class SparsityTarget(Strict):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the pruned matrices' weights that end up zero")


class MagnitudeOptions(DistillOptions):
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="sparsity of the first pruning update")
    start: float = Field(0.0, ge=0, lt=1, description="fraction of the training steps before pruning starts")
    end: float = Field(0.7, gt=0, le=1, description="fraction of the training steps when the final sparsity is reached")
    prune_every: int = Field(10, ge=1, description="optimizer steps between mask updates")
    scope: Literal["per_matrix", "global"] = Field("per_matrix", description="rank magnitudes within each matrix or across all")
    modules: list[str] = Field(default_factory=lambda: list(MODULES), description=f"which matrices of each layer: {', '.join(MODULES)}")

    @model_validator(mode="after")
    def consistent(self):
        if self.end <= self.start:
            raise ValueError("end must come after start")
        if self.early_stop_patience is not None:
            raise ValueError("early_stop_patience does not apply: the sparsity schedule needs every step")
        if self.layerdrop:
            raise ValueError("layerdrop applies to the distill step only")
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty list of {', '.join(MODULES)}; unknown: {unknown}")
        return self


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0, start: float = 0.0, end: float = 1.0) -> float:
    """Zhu & Gupta's schedule at optimizer step `step` of `total`."""
    t0, t1 = start * total, end * total
    progress = min(1.0, max(0.0, (step - t0) / max(t1 - t0, 1e-9)))
    return final + (initial - final) * (1 - progress) ** 3


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing exactly round(sparsity x n) smallest |w| (per matrix or over all)."""
    if scope == "per_matrix":
        return {name: _keep_largest(w.abs().flatten(), sparsity).view_as(w) for name, w in weights.items()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep, masks, offset = _keep_largest(flat, sparsity), {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return masks


def _keep_largest(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    drop = round(sparsity * values.numel())
    keep = torch.ones_like(values, dtype=torch.bool)
    if drop:
        keep[torch.topk(values, drop, largest=False, sorted=False).indices] = False
    return keep


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, w in weights.items():
        w.masked_fill_(~masks[name], 0.0)  # +0.0 (w * 0 leaves -0.0, which a sparse file stores apart)


def nonzero_stats(model, weights: dict[str, torch.Tensor]) -> dict:
    unique = {id(p): p for p in model.parameters()}.values()  # tied parameters once
    pruned_total = sum(w.numel() for w in weights.values())
    pruned_nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
    return {
        "pruned_weights": pruned_total,
        "pruned_weights_nonzero": pruned_nonzero,
        "sparsity": round(1 - pruned_nonzero / max(pruned_total, 1), 5),
        "params_total": sum(p.numel() for p in unique),
        "params_nonzero": sum(int(torch.count_nonzero(p)) for p in unique),
    }


def weights_bytes(model) -> bytes:
    """The model's weights as safetensors bytes (what a checkpoint stores; shared tensors once)."""
    from safetensors.torch import save

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().cpu().contiguous()
    return save(tensors)


def compressed_size(model, level: int = 6) -> dict:
    """Dense safetensors bytes and their deflate (zlib) size: what zeros save on disk or the wire."""
    raw = weights_bytes(model)
    return {"dense_bytes": len(raw), "deflate_bytes": len(zlib.compress(raw, level))}


@register("weights.magnitude", options=MagnitudeOptions, target=SparsityTarget, trains=True,
          smoke={"target": {"sparsity": 0.5}, "options": {"max_steps": 2, "prune_every": 1}})
def gradual_magnitude(ctx: Context, target: SparsityTarget, options: MagnitudeOptions) -> StepResult:
    """Distill while zeroing the smallest weights on a cubic schedule (unstructured: no speedup)."""

    if options.initial_sparsity > target.sparsity:
        raise BadInputError(f"initial_sparsity {options.initial_sparsity} is above the target sparsity {target.sparsity}")
    started = time.perf_counter()
    weights = encoder_weights(ctx.model, options.modules)
    if not weights:
        raise BadInputError("no attention or FFN matrix left to prune")
    before = nonzero_stats(ctx.model, weights)
    state = {"masks": None, "schedule": []}

    def on_step(step: int, total: int) -> None:
        due = step % options.prune_every == 0 or step == total
        if due and step >= options.start * total and (not state["schedule"] or state["schedule"][-1][1] < target.sparsity):
            sparsity = cubic_sparsity(step, total, target.sparsity, options.initial_sparsity, options.start, options.end)
            state["masks"] = magnitude_masks(weights, sparsity, options.scope)
            state["schedule"].append((step, round(sparsity, 4)))
        if state["masks"] is not None:
            apply_masks(weights, state["masks"])

    penalties = Penalties(ctx.model, options.penalties, options.lr, options.warmup) if options.penalties else None
    history = distill(
        ctx.model, ctx.teacher, ctx.calibration, eval_batches=None, epochs=options.epochs, max_steps=options.max_steps,
        lr=options.lr, warmup=options.warmup, grad_clip=options.grad_clip, grad_accum=options.grad_accum,
        loss=tuple(options.loss), device=ctx.device, seed=ctx.seed,
        on_step=chain_after(penalties and penalties.after_step, on_step),  # the schedule's zeros last
        extra_loss=penalties and penalties.extra_loss,
    )
    # exactly the target at the end, whatever the schedule's last update was
    apply_masks(weights, magnitude_masks(weights, target.sparsity, options.scope))
    ctx.model.eval()
    after = nonzero_stats(ctx.model, weights)
    stats = {
        "target_sparsity": target.sparsity,
        "scope": options.scope,
        **after,
        "params_nonzero_before": before["params_nonzero"],
        "schedule": state["schedule"],
        **compressed_size(ctx.model),
        "distill": history,
        "seconds": round(time.perf_counter() - started, 2),
        "note": "unstructured zeros: dense runtimes run no faster; sizes are dense vs deflate-compressed",
    }
    if penalties is not None:
        stats["penalties"] = penalties.summary()
    return StepResult(plan=None, stats=stats)
