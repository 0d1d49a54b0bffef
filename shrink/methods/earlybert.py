"""EarlyBERT structured tickets (Chen et al. 2021, "EarlyBERT: Efficient BERT Training via Early-bird
Lottery Tickets"), method `structured.earlybert`, recipe `earlybert`.

Every head and every FFN neuron gets a learnable slimming coefficient c (a gate on its output,
shrink.surgery.gates, started at 1), trained with the weights on the run's objective plus an L1
penalty that pushes the unimportant coefficients down (network slimming, Liu et al. 2017):

    L = objective + head_penalty * sum_h |c_h| + ffn_penalty * sum_n |c_n|

Every `check_every` steps the ticket is drawn: in each layer (scope: layer, the paper's) or over all
layers (scope: global) the units with the largest |c| are kept, at the target's fractions. The
"early bird" is found when two successive tickets differ in fewer than `tolerance` of the units
(normalised mask distance; the paper uses 0.1 over its last checks): the search stops there, long
before the coefficients converge, which is the method's point (cheap). Then the ticket's removed
heads and neurons go physically (KeepHeads, KeepFFN), and the recipe's `distill` step trains it.

`rewind` (default true): the ticket keeps the weights from before the search, as EarlyBERT re-trains
the drawn ticket from the pre-trained weights; false keeps the searched weights. The coefficients
are dropped either way (they only rank units).

Reproduced: slimming coefficients on heads and FFN neurons with an L1 penalty, the mask-distance
early stop, layer-wise pruning ratios, rewinding. Ours: distillation from the original as the
objective when the data has no labels; a separate Adam learning rate for the coefficients (at the
weights' 5e-5 they would not move in a short search); the `global` scope. Not reproduced: the
pre-training half of the paper (tickets drawn during BERT pre-training).
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.heads.gates import GateTraining, split_layers, stats_of, train_with_head_gates
from shrink.surgery import KeepFFN, KeepHeads, ffn_per_layer, heads_per_layer
from shrink.surgery.gates import Gates
from shrink.train.loop import Hooks


class EarlyBertTarget(Strict):
    heads_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of the heads to remove (of each layer's, with scope: layer)")
    ffn_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of the FFN neurons to remove")

    @model_validator(mode="after")
    def something_goes(self):
        if self.heads_fraction == 0 and self.ffn_fraction == 0:
            raise ValueError("give heads_fraction and/or ffn_fraction above 0")
        return self


class EarlyBertOptions(GateTraining):
    max_steps: int | None = Field(300, ge=1, description="the longest search; the early-bird test usually stops it sooner")
    coefficient_lr: float = Field(0.01, gt=0, description="Adam learning rate of the slimming coefficients")
    head_penalty: float = Field(1e-4, ge=0, description="L1 factor on the heads' coefficients (the paper's lambda)")
    ffn_penalty: float = Field(1e-4, ge=0, description="L1 factor on the FFN neurons' coefficients")
    check_every: int = Field(10, ge=1, description="optimizer steps between ticket draws")
    tolerance: float = Field(0.1, gt=0, lt=1, description="stop when two successive tickets differ in fewer than this share of the units")
    scope: Literal["layer", "global"] = Field("layer", description="rank units within each layer (the paper) or over all layers")
    rewind: bool = Field(True, description="the ticket keeps the weights from before the search (EarlyBERT); false: the searched weights")


def ticket(values: list[torch.Tensor | None], fraction: float, scope: str) -> list[list[int]]:
    """Per layer, the positions kept: the largest |c|, `fraction` of the units removed per layer
    (scope layer) or over all layers (scope global); every layer keeps at least one unit."""
    sizes = [0 if v is None else v.numel() for v in values]
    if scope == "layer":
        return [sorted(torch.argsort(v.abs(), descending=True)[: max(1, n - round(fraction * n))].tolist()) if n else []
                for v, n in zip(values, sizes)]
    flat = torch.cat([v.abs() for v in values if v is not None])
    keep_total = flat.numel() - round(fraction * flat.numel())
    threshold_order = torch.argsort(flat, descending=True)[:keep_total]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[threshold_order] = True
    kept, offset = [], 0
    for v, n in zip(values, sizes):
        if not n:
            kept.append([])
            continue
        part = mask[offset: offset + n]
        positions = part.nonzero().flatten().tolist() or [int(v.abs().argmax())]
        kept.append(sorted(positions))
        offset += n
    return kept


def mask_distance(a: list[list[int]], b: list[list[int]], sizes: list[int]) -> float:
    """The share of units kept by exactly one of two tickets."""
    differ = sum(len(set(x) ^ set(y)) for x, y in zip(a, b))
    return differ / max(1, sum(sizes))


@register("structured.earlybert", options=EarlyBertOptions, target=EarlyBertTarget, trains=True,
          smoke={"target": {"heads_fraction": 0.25, "ffn_fraction": 0.25}, "options": {"max_steps": 3, "check_every": 1}})
def earlybert(ctx: Context, target: EarlyBertTarget, options: EarlyBertOptions) -> StepResult:
    """Slimming coefficients on heads and FFN neurons with L1, stopped at the early-bird ticket (Chen et al. 2021)."""
    started = time.perf_counter()
    model = ctx.model
    heads, ffn = heads_per_layer(model), ffn_per_layer(model)
    if (target.heads_fraction and not sum(heads)) or (target.ffn_fraction and not sum(ffn)):
        raise BadInputError("structured.earlybert: the model has no heads or FFN neurons left of the kind the target removes")
    original = copy.deepcopy(model.state_dict()) if options.rewind else None
    device = next(model.parameters()).device
    head_c = torch.nn.Parameter(torch.ones(sum(heads), device=device))
    ffn_c = torch.nn.Parameter(torch.ones(sum(ffn), device=device))
    draws: list[dict] = []
    state = {"previous": None, "found": None}

    def tickets() -> tuple[list[list[int]], list[list[int]]]:
        with torch.no_grad():
            return (ticket(split_layers(head_c.detach().cpu(), heads), target.heads_fraction, options.scope),
                    ticket(split_layers(ffn_c.detach().cpu(), ffn), target.ffn_fraction, options.scope))

    with Gates(model) as gates:

        def attach(step: int) -> None:  # fresh views every pass: the optimizer updates the coefficients in place
            gates.heads = split_layers(head_c, heads)
            gates.ffn = split_layers(ffn_c, ffn)

        def penalty(step: int) -> torch.Tensor:
            return options.head_penalty * head_c.abs().sum() + options.ffn_penalty * ffn_c.abs().sum()

        def stop(done: int) -> bool:
            if done % options.check_every:
                return False
            now = tickets()
            if state["previous"] is None:
                draws.append({"step": done, "distance": None})
                state["previous"] = now
                return False
            distance = mask_distance(state["previous"][0] + state["previous"][1], now[0] + now[1], heads + ffn)
            draws.append({"step": done, "distance": round(distance, 4)})
            state["previous"] = now
            if distance < options.tolerance:
                state["found"] = done
                return True
            return False

        def status(loss: float) -> str:
            last = draws[-1]["distance"] if draws and draws[-1]["distance"] is not None else None
            return f"loss {loss:.4f}" + (f", ticket distance {last:.3f} (stop < {options.tolerance})" if last is not None else "")

        hooks = Hooks(before_step=attach, extra_loss=penalty, status=status, stop=stop)
        history = train_with_head_gates(ctx, [head_c, ffn_c], options.coefficient_lr, True, options, hooks, "structured.earlybert")
        gates.clear()

    kept_heads, kept_ffn = tickets()
    if original is not None:
        model.load_state_dict(original)
    plan = []
    if target.heads_fraction:
        keep = {i: k for i, (n, k) in enumerate(zip(heads, kept_heads)) if n and len(k) < n}
        plan += [KeepHeads(keep)] if keep else []
    if target.ffn_fraction:
        keep = {i: k for i, (n, k) in enumerate(zip(ffn, kept_ffn)) if n and len(k) < n}
        plan += [KeepFFN(keep)] if keep else []
    stats = {
        "early_bird_step": state["found"],
        "searched_steps": history["steps"],
        "draws": draws,
        "heads_kept_per_layer": [len(k) for k in kept_heads] if target.heads_fraction else heads,
        "ffn_kept_per_layer": [len(k) for k in kept_ffn] if target.ffn_fraction else ffn,
        "head_coefficients": stats_of(head_c.detach().cpu()) if head_c.numel() else None,
        "ffn_coefficients": stats_of(ffn_c.detach().cpu()) if ffn_c.numel() else None,
        "rewound": options.rewind,
        "objective": ctx.objective.name,
        "loss_first": history["losses"][0] if history["losses"] else None,
        "loss_last": history["losses"][-1] if history["losses"] else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return StepResult(plan=plan, stats=stats)
