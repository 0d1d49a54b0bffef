"""Cascade head pruning in a static form, after SpAtten (Wang et al. 2021, "SpAtten: Efficient Sparse
Attention Architecture with Cascade Token and Head Pruning"), method `heads.cascade`.

A head's importance is the magnitude of its output: the sum of |attention output| (its slice of the
context vectors, the input of the attention output projection, real tokens only) over the calibration
set. The layers are pruned one after the other, from the first to the last (a cascade): the heads a
layer loses are gated off (shrink.surgery.gates) for every later measurement, so layer i is scored on
the model as layers 0..i-1 left it, never on the unpruned one. With `cascade: index` (the default, as
SpAtten does) a head is its index h across the layers: its importance at layer i is the magnitude
accumulated over layers 0..i, and a head index removed in layer i is removed from every later layer
too, so the kept sets shrink with depth (layer i keeps a subset of layer i-1's heads). With `cascade:
layer` each layer's heads are ranked by their own magnitude (measured after the earlier layers'
removals) and the index tie is dropped: the kept sets need not nest.

Deeper layers lose more heads: the removals are spread over the layers in proportion to
(depth + 1) ** depth_power (1: a linear ramp; 0: the same count everywhere), capped at a layer's
heads, so that exactly the target count goes (the first layer loses the fewest, the last the most).
The result is one KeepHeads plan.

What of SpAtten is reproduced: the importance measure (cumulative magnitude of the heads' attention
outputs across layers), the cascade (a head pruned stays pruned in every following layer, and
later importances are measured without it), and its progressive shape (later layers keep fewer
heads). What is not: SpAtten is a hardware accelerator that prunes dynamically, per input, at run
time, with top-k engines: it ranks and drops TOKENS by cumulative attention probability (cascade token
pruning, the larger part of its savings), drops heads per input sentence (here once per model, on a
calibration set, a static removal that any runtime then runs faster), and fetches the most
significant bits first with progressive quantization (recomputing with the low bits only when the
attention distribution is flat). None of the token pruning, the per-input decisions, the quantization
or the hardware is here; nor are SpAtten's per-layer pruning ratios (its schedule is set by the
accelerator's design space exploration; here one ramp reaches the target).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from shrink.arch import model_inputs
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.heads.importance import HeadsCountTarget
from shrink.surgery import KeepHeads, adapter_of, heads_per_layer, layers_of, runtime
from shrink.surgery.gates import Gates
from shrink.surgery.ops import head_size
from shrink.train.device import to_device


class CascadeOptions(Strict):
    calibration_samples: int = Field(256, ge=1, description="examples the magnitudes are summed over")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    cascade: Literal["index", "layer"] = Field(
        "index", description="index: a head is its index across layers, importance accumulated over layers, removed from every later layer "
                             "(SpAtten); layer: each layer ranked on its own magnitude (after the earlier removals)")
    depth_power: float = Field(1.0, ge=0, le=8, description="heads removed per layer in proportion to (depth + 1) ** depth_power (0: uniform)")


class _Reached(Exception):
    """Raised by the capture hook once the measured layer has run: deeper layers need not."""


def removal_schedule(counts: list[int], n_remove: int, power: float = 1.0) -> list[int]:
    """Heads to remove per layer: n_remove spread over the layers that have heads in proportion to
    (depth + 1) ** power (depth counted over those layers), capped at each layer's heads (what a
    capped layer cannot take goes to the others, in the same proportions), integer by largest
    remainder with ties to the deeper layer. Sums to n_remove; with equal counts it never decreases
    with depth."""
    if n_remove > sum(counts):
        raise BadInputError(f"cannot remove {n_remove} heads: the model has {sum(counts)}")
    removal = [0] * len(counts)
    weight = {}
    for depth, layer in enumerate(i for i, n in enumerate(counts) if n):
        weight[layer] = float(depth + 1) ** power
    left, active = n_remove, dict(weight)
    while left and active:
        total = sum(active.values())
        ideal = {layer: left * w / total for layer, w in active.items()}
        full = [layer for layer in active if ideal[layer] >= counts[layer] - removal[layer]]
        if full:  # these take all they have; the rest is spread again over the others
            for layer in full:
                left -= counts[layer] - removal[layer]
                removal[layer] = counts[layer]
                del active[layer]
            continue
        floors = {layer: int(v) for layer, v in ideal.items()}
        for layer, v in floors.items():
            removal[layer] += v
        extra = left - sum(floors.values())
        by_remainder = sorted(active, key=lambda layer: (ideal[layer] - floors[layer], layer), reverse=True)
        for layer in by_remainder[:extra]:
            removal[layer] += 1
        left = 0
    return removal


def head_magnitudes(ctx: Context, batches: list[dict], gates: Gates, layer: int) -> torch.Tensor:
    """Sum over `batches` (real tokens) of |head output| of each head of `layer`, with the gates as set."""
    model, size = ctx.model, head_size(ctx.model)
    adapter = adapter_of(model)
    module = runtime.get_module(layers_of(model)[layer], adapter.attention_out)
    device = next(model.parameters()).device
    total = torch.zeros(heads_per_layer(model)[layer], dtype=torch.float64)
    mask: dict = {}

    def capture(module, args):
        x = args[0]
        b, s, width = x.shape
        per_head = x.detach().abs().view(b, s, width // size, size).sum(dim=-1)  # (b, s, heads)
        real = mask["tokens"][:, :s, None].to(per_head.dtype)
        total.add_((per_head * real).sum(dim=(0, 1)).double().cpu())
        raise _Reached

    handle = module.register_forward_pre_hook(capture)  # after the Gates' hooks: it sees the earlier layers' removals
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                mask["tokens"] = batch["attention_mask"] if "attention_mask" in batch else torch.ones_like(batch["input_ids"])
                try:
                    model(**model_inputs(model, batch))
                except _Reached:
                    pass
    finally:
        handle.remove()
    return total


@register("heads.cascade", options=CascadeOptions, target=HeadsCountTarget,
          smoke={"target": {"heads_count": 5}, "options": {"calibration_samples": 4, "max_length": 16}})
def heads_cascade(ctx: Context, target: HeadsCountTarget, options: CascadeOptions) -> StepResult:
    """Remove heads by output magnitude, layer after layer, deeper layers losing more (static SpAtten cascade)."""
    started = time.perf_counter()
    model = ctx.model.eval()
    counts = heads_per_layer(model)
    n_remove = target.count(sum(counts))
    with_heads = [i for i, n in enumerate(counts) if n]
    if options.cascade == "index" and len({counts[i] for i in with_heads}) > 1:
        raise BadInputError(f"heads.cascade: cascade index needs the same number of heads in every layer; this model has {counts}",
                            hint="an earlier step pruned heads unevenly: use cascade: layer")
    removal = removal_schedule(counts, n_remove, options.depth_power)
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)

    kept: dict[int, list[int]] = {}
    magnitude: dict[int, torch.Tensor] = {}
    cumulative = torch.zeros(max(counts, default=0), dtype=torch.float64)
    alive = list(range(max(counts, default=0)))  # index mode: the head indices no layer has removed yet
    with Gates(model) as gates:
        for layer in with_heads:
            k = counts[layer] - removal[layer]
            if options.cascade == "index" and k > len(alive):
                raise BadInputError(f"heads.cascade: layer {layer} would keep {k} heads but only {len(alive)} indices are left")
            scores = head_magnitudes(ctx, batches, gates, layer)
            magnitude[layer] = scores
            if options.cascade == "index":
                cumulative += scores
                candidates, ranking = alive, cumulative
            else:
                candidates, ranking = list(range(counts[layer])), scores
            chosen = sorted(sorted(candidates, key=lambda h: (-float(ranking[h]), h))[:k])
            kept[layer] = chosen
            if options.cascade == "index":
                alive = chosen
            gate = torch.zeros(counts[layer])
            gate[chosen] = 1.0
            gates.heads[layer] = gate  # removed for every later measurement

    plan_keep = {layer: heads for layer, heads in kept.items() if len(heads) < counts[layer]}
    kept_per_layer = [len(kept.get(i, [])) for i in range(len(counts))]
    tokens = max(1, sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches))
    stats = {
        "heads_before": sum(counts),
        "heads_removed": n_remove,
        "cascade": options.cascade,
        "depth_power": options.depth_power,
        "removed_per_layer": removal,
        "kept_per_layer": kept_per_layer,
        "kept": {str(layer): heads for layer, heads in kept.items()},
        # each layer's mean head-output magnitude per real token and channel of a head, to compare the layers' scales
        "magnitude_per_layer": {str(layer): round(float(m.mean()) / (tokens * head_size(model)), 6) for layer, m in magnitude.items()},
        "calibration_samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return StepResult(plan=[KeepHeads(plan_keep)] if plan_keep else [], stats=stats)
