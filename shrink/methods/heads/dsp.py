"""Differentiable subset pruning of heads (after Li, Cotterell and Sachan 2021, "Differentiable Subset
Pruning of Transformer Heads"), method `heads.dsp`.

Every head h gets a learned importance logit w_h. A relaxed k-hot mask over ALL heads (one global
budget: K heads kept, layers compete, a layer may end with none) multiplies the heads' outputs during
training (shrink.surgery.gates), so the number of kept heads is a hard constraint from the first step
instead of a penalty to tune. The relaxation is a Gumbel-soft-top-K by successive softmaxes (the
construction of Xie and Ermon 2019 that the paper builds on; written here from the idea):

    r_h        = w_h + G_h,  G_h ~ Gumbel(0, 1)       (fresh noise every forward pass; `gumbel: false`: none)
    alpha^1    = r
    a^j        = softmax(alpha^j / tau)                j = 1 .. K
    alpha^j+1  = alpha^j + log(1 - a^j)                (the mass already chosen is masked out)
    mask       = sum_j a^j                             sums to K exactly; as tau -> 0 the k-hot of top-K(r)

The temperature tau is annealed per optimizer step from `temperature_start` to `temperature_end`
(`anneal: exponential`, geometric, or `linear`), reaching temperature_end on the last step (also when
a time budget shortens the run). The loss is ctx.objective (the task loss with labels, else
distillation from the original: logits KL with a task head, embedding cosine + relation for an
embedding model). At the end exactly K heads are kept: the global top-K of the logits w (no noise),
`min_heads_per_layer` respected (default 0); the rest becomes a KeepHeads plan. The kept heads are not
rescaled: at a low final temperature the mask is ~1 on them.

Modes, as in the paper: `pipeline` (DSP-pipelined) freezes the model weights and learns only the
logits (then the loop's parameters at `logit_lr`, gradient-clipped); recovery is the recipe's next
step, `distill`. `joint` trains the weights (AdamW at `lr`, word embeddings frozen unless
`train_embeddings`) and the logits (Adam at `logit_lr`) together; both learning rates follow the
loop's warm-up and linear decay.

Reproduced: per-head logits, the Gumbel-soft-top-K mask with a global K, temperature annealing,
pipelined and joint modes, a hard top-K at the end. Not reproduced: the paper's tasks (NLI, MT) and
its training on the task loss alone (here distillation from the original unless the data has labels);
its exact hyper-parameters (logit initialisation, learning rates, temperature range and schedule are
ours: logits 0, tau 1 -> 0.05 geometric); the paper's joint setting, which prunes during fine-tuning
of a model from scratch on the task, is here a short joint phase on the calibration data.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, register
from shrink.methods.heads.gates import (
    GateTraining,
    keep_plan,
    log_every,
    per_layer_summary,
    split_layers,
    stats_of,
    top_k_heads,
    train_with_head_gates,
)
from shrink.methods.heads.importance import HeadsCountTarget
from shrink.surgery import heads_per_layer
from shrink.surgery.gates import Gates
from shrink.train.loop import Hooks, total_steps


class DSPOptions(GateTraining):
    mode: Literal["pipeline", "joint"] = Field("pipeline", description="pipeline: weights frozen, only the logits learn; joint: both")
    logit_lr: float = Field(0.1, gt=0, description="learning rate of the heads' logits")
    logit_init: float = Field(0.0, description="initial logit of every head")
    temperature_start: float = Field(1.0, gt=0, description="temperature of the soft top-K at the first step")
    temperature_end: float = Field(0.05, gt=0, description="temperature at the last step")
    anneal: Literal["exponential", "linear"] = Field("exponential", description="how the temperature goes from start to end")
    gumbel: bool = Field(True, description="Gumbel noise on the logits (false: a deterministic soft top-K)")

    @model_validator(mode="after")
    def cooling(self):
        if self.temperature_end > self.temperature_start:
            raise ValueError("temperature_end must not be above temperature_start (the temperature is annealed down)")
        return self


def temperature_at(step: int, total: int, start: float, end: float, anneal: str = "exponential") -> float:
    """The temperature of optimizer step `step` (0-based) of `total`: start at step 0, end at the last."""
    frac = min(1.0, max(0.0, step / max(1, total - 1)))
    if anneal == "linear":
        return start + (end - start) * frac
    return start * (end / start) ** frac


def soft_top_k(scores: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """The relaxed k-hot of the top-k of `scores` (a flat (N,) tensor): K successive softmaxes, each
    with the mass already chosen masked out (see the module docstring). Sums to k and is
    differentiable; computed in float64 (K rounds over N heads: cheap). An entry may exceed 1 at a high
    temperature (the relaxation allows it: two heads, K = 2, scores log 3 and 0 give 1.25 and 0.75 at
    tau = 1); as tau -> 0 it tends to the k-hot."""
    alpha = scores.double()
    mask = torch.zeros_like(alpha)
    chosen = torch.zeros_like(alpha)
    for _ in range(k):
        # log(1 - a) of the last round, floored where a is 1 in floating point (the head is taken)
        alpha = alpha + torch.log((1 - chosen).clamp_min(FLOOR))
        chosen = torch.softmax(alpha / temperature, dim=0)
        mask = mask + chosen
    return mask.to(scores.dtype)


FLOOR = torch.finfo(torch.float32).tiny  # log(FLOOR) ~ -87: a taken head's key drops far below every other


def gumbel_like(scores: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(scores).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


@register("heads.dsp", options=DSPOptions, target=HeadsCountTarget, trains=True,
          smoke={"target": {"heads_count": 3}, "options": {"max_steps": 3}})
def heads_dsp(ctx: Context, target: HeadsCountTarget, options: DSPOptions) -> StepResult:
    """Learn which K heads to keep with a Gumbel-soft-top-K mask and annealed temperature (Li et al. 2021)."""
    started = time.perf_counter()
    model = ctx.model
    counts = heads_per_layer(model)
    total = sum(counts)
    if total == 0:
        raise BadInputError("heads.dsp: the model has no attention heads left to prune")
    keep = total - target.count(total)
    top_k_heads(torch.zeros(total), counts, keep, options.min_heads_per_layer)  # refuse an impossible floor before training
    device = next(model.parameters()).device
    logits = torch.nn.Parameter(torch.full((total,), float(options.logit_init), device=device))
    now = {"total": total_steps(len(ctx.calibration), options.epochs, max_steps=options.max_steps), "temperature": options.temperature_start}
    log: list = []

    def tau(step: int) -> float:
        return temperature_at(step, now["total"], options.temperature_start, options.temperature_end, options.anneal)

    with Gates(model) as gates:

        def draw(step: int) -> None:
            now["temperature"] = tau(step)
            scores = logits + gumbel_like(logits) if options.gumbel else logits
            gates.heads = split_layers(soft_top_k(scores, keep, now["temperature"]), counts)

        def track(done: int, total_now: int, loss: float) -> None:
            now["total"] = total_now

        def row(step: int, loss: float) -> dict:
            return {"temperature": round(now["temperature"], 5)}

        def status(loss: float) -> str:
            return f"loss {loss:.4f}, temperature {now['temperature']:.3g}, keeping {keep} of {total}"

        hooks = Hooks(before_step=draw, after_step=[track, log_every(log, row)], status=status)
        history = train_with_head_gates(ctx, [logits], options.logit_lr, options.mode == "joint", options, hooks, "heads.dsp")
        gates.clear()

    w = logits.detach().cpu()
    if not math.isfinite(float(w.sum())):
        raise BadInputError("heads.dsp: the logits diverged (not finite)", hint="lower logit_lr or raise temperature_end")
    kept = top_k_heads(w, counts, keep, options.min_heads_per_layer)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    kept_flat = [o + h for o, heads in zip(offsets, kept) for h in heads]
    with torch.no_grad():
        final_mask = soft_top_k(w, keep, options.temperature_end) if keep else torch.zeros_like(w)
    ranked = torch.sort(w, descending=True).values
    kept_per_layer = [len(k) for k in kept]
    stats = {
        "heads_before": total,
        "heads_kept": keep,
        "heads_removed": total - keep,
        "kept_per_layer": kept_per_layer,
        "layers_without_heads": [i for i, (n, k) in enumerate(zip(counts, kept_per_layer)) if n and not k],
        "mode": options.mode,
        "objective": ctx.objective.name,
        "temperature": {"start": options.temperature_start, "end": options.temperature_end, "last_used": round(now["temperature"], 6)},
        "logits": {**stats_of(w), "per_layer_mean": per_layer_summary(w, counts)},
        # the gap between the last kept and the first removed logit: how settled the choice is
        "margin": round(float(ranked[keep - 1] - ranked[keep]), 4) if 0 < keep < total else None,
        # the noise-free soft mask at temperature_end: the share of its mass on the kept heads (1: the hard choice)
        "mask_on_kept": round(float(final_mask[kept_flat].sum()) / keep, 4) if keep else None,
        "mask_per_layer": [round(float(m.sum()), 3) if m is not None else None for m in split_layers(final_mask, counts)],
        "steps": history["steps"],
        "loss_first": history["losses"][0] if history["losses"] else None,
        "loss_last": history["losses"][-1] if history["losses"] else None,
        "log": log,
        **({"budget": history["budget"]} if "budget" in history else {}),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return StepResult(plan=keep_plan(counts, kept), stats=stats)
