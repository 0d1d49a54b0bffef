"""Method registry: recipe steps name a method; the registry gives its options and target models.

Built-in methods register with `@register(...)` when shrink.methods is imported. Third-party
packages plug in through the entry-point group `shrink.methods`: each entry point names a module
that registers its methods on import.

    @register("heads.a_star", options=AStarOptions, target=HeadsTarget, needs_labels=False)
    def a_star(ctx, target, options) -> StepResult: ...
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from .errors import BadInputError


class Strict(BaseModel):
    """Base for option/target models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NoTarget(Strict):
    pass


@dataclass
class Plan:
    """What a method wants removed, in current positions. Only shrink.surgery applies it."""

    heads: dict[int, list[int]] | None = None  # layer -> heads to KEEP
    ffn: dict[int, list[int]] | None = None  # layer -> neurons to KEEP
    drop_layers: list[int] | None = None
    # (kind, spec, state): new word embeddings, built by shrink.surgery.install_word_embeddings
    embedding: tuple[str, dict, dict] | None = None
    # Linear path (from the base model) -> rank, or (rank, (first, second)) with precomputed factors
    low_rank: dict[str, Any] | None = None


@dataclass
class StepResult:
    plan: Plan | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    options: type[Strict]
    target: type[Strict]
    needs_labels: bool
    description: str


METHODS: dict[str, Method] = {}
_loaded = False


def register(name: str, *, options: type[Strict], target: type[Strict] = NoTarget, needs_labels: bool = False):
    def decorate(fn: Callable) -> Callable:
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, options, target, needs_labels, description)
        return fn

    return decorate


def _load_methods() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    importlib.import_module("shrink.methods")
    for entry in entry_points(group="shrink.methods"):
        entry.load()


def get_method(name: str) -> Method:
    _load_methods()
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known methods: {', '.join(sorted(METHODS))}"
        raise BadInputError(f"unknown method {name!r}", hint=hint)
    return METHODS[name]


def all_methods() -> dict[str, Method]:
    _load_methods()
    return dict(METHODS)


@dataclass
class Context:
    """What a method gets: the model being slimmed (mutated only through plans and shrink.surgery),
    the frozen original as teacher, data already tokenized and split, and the objective to minimise."""

    model: Any
    teacher: Any
    tokenizer: Any
    calibration: list  # batches (dicts of tensors) to train on
    calibration_batches: Callable  # (samples, max_length, batch_size) -> batches: a seeded subset to score on
    evaluation: list  # held-out batches; methods never score on them
    objective: Any  # shrink.distill.Objective
    has_labels: bool
    device: str = "cpu"
    seed: int = 0
