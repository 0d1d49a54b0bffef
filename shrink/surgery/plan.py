"""A plan: what a method wants changed, as an ordered list of typed ops in CURRENT positions.

Methods build plans; `apply(model, plan)` carries them out, one op after the other in the order the
method chose (an op sees the shapes the ops before it left). Each op type has exactly one handler
(`@handles(OpType)`), which changes the live model through shrink.surgery.ops and so records the
manifest op that the shipped runtime replays (runtime.REPLAY). A new kind of shape change is an op
class here, a handler, and a replay entry in runtime.py. A weight-only op (ScaleUnits) changes no
shape and records no manifest op: the slim checkpoint stores the weights as it left them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from shrink.errors import BadInputError
from shrink.surgery import ops, runtime


@dataclass(frozen=True)
class KeepHeads:
    """Layer -> the heads to keep (current positions); [] removes the layer's attention."""

    keep: dict[int, list[int]]


@dataclass(frozen=True)
class KeepFFN:
    """Layer -> the FFN neurons to keep (current positions); [] removes the layer's FFN."""

    keep: dict[int, list[int]]


@dataclass(frozen=True)
class DropLayers:
    """Whole layers to remove (current positions)."""

    positions: list[int]


@dataclass(frozen=True)
class KeepHidden:
    """The hidden dims (of the residual stream) to keep, current positions, ascending, non-empty:
    sliced everywhere (CoFi's hidden-dim pruning; see shrink.surgery.ops.prune_hidden)."""

    keep: list[int]


@dataclass(frozen=True)
class KeepVocab:
    """The token ids to keep (current ids, ascending, the padding token among them): new id i is old
    id keep[i] (vocabulary pruning; the method also rewrites the tokenizer, StepResult.tokenizer)."""

    keep: list[int]


@dataclass(frozen=True)
class KeepTokens:
    """Token pruning (PoWER-BERT, drop-and-restore): layer (current position) -> the share of each
    sample's real tokens kept after it, in (0, 1]; layers not listed keep all. No weight changes:
    the encoder ranks tokens by the attention they receive at run time (runtime.TokenPruningEncoder).
    fill: what a dropped token's output position holds, "state" or "kept_mean" (runtime.TOKEN_FILLS).
    thresholds: layer -> LTP threshold on the attention a token receives per head (tokens.ltp)."""

    keep: dict[int, float]
    restore: bool = True
    fill: str = "state"
    thresholds: dict[int, float] | None = None


@dataclass(frozen=True)
class LowRank:
    """The Linear at `path` (from the base model, current layer positions) as a rank-`rank` pair.
    `factors`: precomputed (first, second) or (first, second, bias) for the matrix as it is when this
    op runs; None: the truncated SVD."""

    path: str
    rank: int
    factors: tuple | None = None


@dataclass(frozen=True)
class ReplaceEmbedding:
    """New word embeddings of a runtime.EMBEDDING_BUILDERS `kind`, built from `spec`, filled with `state`."""

    kind: str
    spec: dict
    state: dict


@dataclass(frozen=True)
class ScaleUnits:
    """Layer -> one factor per head (current positions) / per FFN neuron: a unit's output is multiplied
    by its factor, folded into its columns of the attention output projection / the FFN output Linear.
    Weights only (post-training mask tuning), so it records no manifest op; ordered before a KeepHeads
    / KeepFFN of the same plan, it uses the positions those ops see."""

    heads: dict[int, list[float]] = field(default_factory=dict)
    ffn: dict[int, list[float]] = field(default_factory=dict)


HANDLERS: dict[type, Callable[[nn.Module, Any], None]] = {}


def handles(op_type: type):
    """Register the one handler of an op type: fn(model, op), applying it to the live model."""

    def register(fn: Callable[[nn.Module, Any], None]) -> Callable[[nn.Module, Any], None]:
        if op_type in HANDLERS:
            raise ValueError(f"{op_type.__name__} already has a handler")
        HANDLERS[op_type] = fn
        return fn

    return register


@handles(KeepHeads)
def apply_keep_heads(model: nn.Module, op: KeepHeads) -> None:
    ops.prune_heads(model, op.keep)


@handles(KeepFFN)
def apply_keep_ffn(model: nn.Module, op: KeepFFN) -> None:
    ops.prune_ffn(model, op.keep)


@handles(DropLayers)
def apply_drop_layers(model: nn.Module, op: DropLayers) -> None:
    ops.drop_layers(model, op.positions)


@handles(KeepHidden)
def apply_keep_hidden(model: nn.Module, op: KeepHidden) -> None:
    ops.prune_hidden(model, op.keep)


@handles(KeepVocab)
def apply_keep_vocab(model: nn.Module, op: KeepVocab) -> None:
    ops.prune_vocab(model, op.keep)


@handles(KeepTokens)
def apply_keep_tokens(model: nn.Module, op: KeepTokens) -> None:
    ops.prune_tokens(model, op.keep, op.restore, op.fill, op.thresholds)


@handles(LowRank)
def apply_low_rank(model: nn.Module, op: LowRank) -> None:
    ops.factorize_linear(model, op.path, op.rank, op.factors)


@handles(ReplaceEmbedding)
def apply_replace_embedding(model: nn.Module, op: ReplaceEmbedding) -> None:
    ops.install_word_embeddings(model, op.kind, op.spec, op.state)


@handles(ScaleUnits)
def apply_scale_units(model: nn.Module, op: ScaleUnits) -> None:
    adapter, layers = ops.adapter_of(model), ops.layers_of(model)
    counts = {"heads": ops.heads_per_layer(model), "FFN neurons": ops.ffn_per_layer(model)}
    width = {"heads": ops.head_size(model), "FFN neurons": 1}
    for what, scales, path in (("heads", op.heads, adapter.attention_out), ("FFN neurons", op.ffn, adapter.ffn_out)):
        for position, factors in sorted(scales.items()):
            if not 0 <= position < len(layers):
                raise BadInputError(f"ScaleUnits: layer {position} out of range (the model has {len(layers)} layers)")
            if len(factors) != counts[what][position]:
                raise BadInputError(f"ScaleUnits: layer {position} has {counts[what][position]} {what}, got {len(factors)} factors")
            if not factors:
                continue
            linear = runtime.get_module(layers[position], path)
            weight = runtime.kind_of(linear).input_weight(linear)  # one column (block) per unit
            scale = torch.tensor([float(f) for f in factors], dtype=weight.dtype, device=weight.device)
            if not torch.isfinite(scale).all():
                raise BadInputError(f"ScaleUnits: layer {position} has non-finite factors for its {what}")
            with torch.no_grad():
                weight.mul_(scale.repeat_interleave(width[what])[None, :])


def apply(model: nn.Module, plan: list | None) -> None:
    """Apply the ops of `plan` (None or []: nothing) in order. Every op type is checked before the
    first one runs, so an unknown op leaves the model as it was."""
    known = ", ".join(t.__name__ for t in HANDLERS)
    if not isinstance(plan, (list, tuple, type(None))):
        raise BadInputError(f"a plan is a list of ops, not a {type(plan).__name__}", hint=f"shrink.surgery ops: {known}")
    plan = list(plan or [])
    for op in plan:
        if type(op) not in HANDLERS:
            raise BadInputError(f"unknown plan op {type(op).__name__}", hint=f"a plan is a list of shrink.surgery ops: {known}")
    for op in plan:
        HANDLERS[type(op)](model, op)


def legacy_plan(heads: dict[int, list[int]] | None = None, ffn: dict[int, list[int]] | None = None,
                drop_layers: list[int] | None = None, embedding: tuple[str, dict, dict] | None = None,
                low_rank: dict[str, Any] | None = None) -> list:
    """Deprecated: the former `Plan(heads=, ffn=, drop_layers=, embedding=, low_rank=)` of plugins, as
    the op list it meant, in its fixed order: low rank first (precomputed factors were for the matrices
    as planned), then heads, FFN, dropped layers, embedding. `low_rank`: path -> rank or (rank, factors).
    New code returns a list of ops, in the order it wants."""
    warnings.warn("shrink.registry.Plan is deprecated: return a list of shrink.surgery ops", DeprecationWarning, stacklevel=2)
    plan: list = []
    for path, spec in (low_rank or {}).items():
        rank, factors = spec if isinstance(spec, tuple) else (spec, None)
        plan.append(LowRank(path, rank, factors))
    if heads:
        plan.append(KeepHeads(heads))
    if ffn:
        plan.append(KeepFFN(ffn))
    if drop_layers:
        plan.append(DropLayers(drop_layers))
    if embedding:
        plan.append(ReplaceEmbedding(*embedding))
    return plan
