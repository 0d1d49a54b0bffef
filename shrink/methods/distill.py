"""Recovery after pruning: distillation from the original model (shrink.train.loop).

With `layerdrop` > 0 it is LayerDrop training (Fan et al. 2020, "Reducing Transformer Depth on Demand
with Structured Dropout"): every forward pass bypasses each layer with that probability (a layer gate
of 0, shrink.surgery.gates, is exactly what removing the layer does), so the model learns to work
without any of them and can later be cut to a smaller depth (`layers.drop`, strategy `every_other`,
which the paper found best) with little loss and no further training.

With `drophead: {p: 0.1, schedule: v}` it is Scheduled DropHead (Zhou et al. 2020, "Scheduled DropHead:
A Regularization Method for Transformer Models"): in every training forward pass each head of each
layer is dropped (gate 0, shrink.surgery.gates) with probability p_t, independently for every sample
of the batch (per-sample gates), and the kept heads of a layer are rescaled by N / kept (N heads, as
the paper's Algorithm 1 does, so the layer's output keeps its scale, like dropout's 1 / (1 - p)); a
sample keeps at least one head per layer. p_t follows the paper's V-shaped schedule: from p at the
first step linearly down to 0 at the middle of training, then linearly back up to p at the last
(`schedule: constant`: p throughout). Only training forward passes are gated: the early-stopping
evaluations and the returned model see every head, and the teacher is never gated. Off by default.
Not reproduced: the paper's runs (machine translation, text classification from scratch or
fine-tuning); here it regularises recovery distillation."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.methods.base import Context, StepResult, Strict, register
from shrink.surgery import encoder_weights, heads_per_layer, layers_of
from shrink.surgery.gates import Gates
from shrink.train.loop import distill, total_steps
from shrink.train.penalties import Penalties, PenaltyOptions


class DropHeadOptions(Strict):
    p: float = Field(0.1, ge=0, lt=1, description="the drop rate of every head (the schedule's highest)")
    schedule: Literal["v", "constant"] = Field("v", description="v: p down to 0 at mid-training and back up to p (Zhou et al.); constant: p")


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
    drophead: DropHeadOptions | None = Field(None, description="Scheduled DropHead (Zhou et al. 2020): drop whole heads per sample while training; unset = off")
    penalties: list[PenaltyOptions] = Field(default_factory=list, description="weight penalties added to the training (shrink.train.penalties): "
                                            "l1, group_lasso, hoyer_square, aligned_cosine, aligned_frobenius, rpp")

    @model_validator(mode="after")
    def drophead_is_distills(self):
        if self.drophead is not None and type(self) is not DistillOptions:
            raise ValueError("drophead applies to the distill step only")
        return self


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
    penalties = Penalties(ctx.model, options.penalties, options.lr, options.warmup) if options.penalties else None
    if penalties is not None:
        hold_zeros = chain_after(penalties.after_step, hold_zeros)
    if options.layerdrop == 0 and options.drophead is None:
        history = run_distill(ctx, options, train, watch, None, hold_zeros, penalties and penalties.extra_loss)
    else:  # gates only when asked for: without LayerDrop or DropHead the training is exactly what it always was
        with Gates(ctx.model) as gates:
            before_step, after_step = None, hold_zeros
            dropper = None
            if options.drophead is not None:
                planned = total_steps(len(train), options.epochs, options.grad_accum, options.max_steps)
                dropper = HeadDropper(ctx.model, gates, options.drophead, ctx.seed, planned, after_step)
                before_step, after_step = dropper.before_step, dropper.after_step
            if options.layerdrop:
                before_step, after_step = layer_dropper(gates, len(layers_of(ctx.model)), options.layerdrop, ctx.seed, after_step, before_step)
            try:
                history = run_distill(ctx, options, train, watch, before_step, after_step, penalties and penalties.extra_loss)
            finally:
                if dropper is not None:
                    dropper.remove()
            if dropper is not None:
                history["drophead"] = dropper.summary()
    ctx.model.eval()
    stats = {"distill": history}
    if penalties is not None:
        stats["penalties"] = penalties.summary()
    return StepResult(plan=None, stats=stats)


def chain_after(first, then):
    """One after_step callback running `first`, then `then` (either may be None)."""
    if first is None or then is None:
        return first or then

    def both(done: int, total: int) -> None:
        first(done, total)
        then(done, total)

    return both


def run_distill(ctx: Context, options: DistillOptions, train, watch, before_step, after_step, extra_loss=None) -> dict:
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
        extra_loss=extra_loss,
    )


def layer_dropper(gates: Gates, layers: int, rate: float, seed: int, after=None, before=None):
    """(before_step, after_step) callbacks for LayerDrop: before each forward pass, bypass each layer
    with probability `rate` (always keeping one); after each optimizer step, all layers again, so
    early-stopping evaluations and the final model see the whole network. `before` (another hook's)
    runs before the sampling, `after` after the restoring."""
    generator = torch.Generator().manual_seed(seed)

    def sample(step: int) -> None:
        if before is not None:
            before(step)
        keep = (torch.rand(layers, generator=generator) >= rate).float()
        if not keep.any():
            keep[torch.randint(layers, (1,), generator=generator)] = 1.0
        gates.layers = keep

    def restore(done: int, total: int) -> None:
        gates.layers = None
        if after is not None:
            after(done, total)

    return sample, restore


def drophead_rate(step: int, total: int, p: float, schedule: str = "v") -> float:
    """DropHead's drop rate at optimizer step `step` (0-based) of `total`: constant p, or V-shaped
    (Zhou et al. 2020): p at the first step, linearly down to 0 at the middle, back up to p at the last."""
    if schedule == "constant" or total <= 1:
        return p
    return p * abs(1 - 2 * step / (total - 1))


class HeadDropper:
    """Scheduled DropHead on `model` through `gates`: before_step arms it with the step's rate, and a
    forward pre-hook on the model then gives every sample of the batch its own random head gates
    (0 for a dropped head, N / kept for a kept one, at least one kept per layer); after_step disarms
    it, so evaluations between steps and after training see every head. Seeded: the same run drops
    the same heads."""

    def __init__(self, model, gates: Gates, options: DropHeadOptions, seed: int, total: int, after=None):
        self.gates, self.p, self.schedule, self.total, self.after = gates, options.p, options.schedule, total, after
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = heads_per_layer(model)
        self.rate = 0.0
        self.armed = False
        self.rates: list[float] = []
        self.dropped = self.gated = 0  # head-samples dropped / gated, over the run
        self.handle = model.register_forward_pre_hook(self.draw, with_kwargs=True)

    def before_step(self, step: int) -> None:
        self.rate = drophead_rate(step, self.total, self.p, self.schedule)
        if len(self.rates) == step:  # once per optimizer step (before_step runs for every micro-batch)
            self.rates.append(round(self.rate, 6))
        self.armed = self.rate > 0  # a rate of 0 gates nothing: the pass is exactly the ungated one

    def after_step(self, done: int, total: int) -> None:
        self.total = total  # a time budget may shorten the run: the V ends with it
        self.armed = False
        self.gates.heads = [None] * len(self.gates.heads)
        if self.after is not None:
            self.after(done, total)

    def draw(self, module, args, kwargs):
        if not self.armed:
            self.gates.heads = [None] * len(self.gates.heads)
            return
        rows = batch_rows(args, kwargs)
        heads = []
        for n in self.counts:
            if not n:
                heads.append(None)
                continue
            keep = (torch.rand(rows, n, generator=self.generator) >= self.rate).float()
            empty = keep.sum(dim=1) == 0
            if empty.any():  # every head of a sample dropped: keep one at random
                keep[empty, torch.randint(n, (int(empty.sum()),), generator=self.generator)] = 1.0
            self.dropped += int((keep == 0).sum())
            self.gated += keep.numel()
            heads.append(keep * (n / keep.sum(dim=1, keepdim=True)))
        self.gates.heads = heads

    def remove(self) -> None:
        self.handle.remove()
        self.gates.heads = [None] * len(self.gates.heads)

    def summary(self) -> dict:
        return {"p": self.p, "schedule": self.schedule, "rate_first": self.rates[0] if self.rates else None,
                "rate_min": min(self.rates) if self.rates else None, "rate_last": self.rates[-1] if self.rates else None,
                "dropped_fraction": round(self.dropped / self.gated, 4) if self.gated else 0.0}


def batch_rows(args, kwargs) -> int:
    """The batch size of a model call (input_ids, inputs_embeds or attention_mask, else the first tensor)."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("DropHead: cannot tell the batch size of this model call")


def sparsity_keeper(model):
    """An on_step callback that re-zeroes the weights an earlier pruning step zeroed, or None."""
    weights = {name: w for name, w in encoder_weights(model).items() if (w == 0).float().mean() >= SPARSE_MATRIX_ZEROS}
    if not weights:
        return None
    masks = {name: w != 0 for name, w in weights.items()}

    @torch.no_grad()
    def hold_zeros(step: int, total: int) -> None:
        for name, w in weights.items():
            w.masked_fill_(~masks[name], 0.0)  # +0.0, as weights.magnitude writes them (a sparse file stores -0.0 apart)

    return hold_zeros
