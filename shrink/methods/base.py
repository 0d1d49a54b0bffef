"""What a method is made of: the leaf API every method file imports (and nothing of the orchestration).

A method is one function registered with its pydantic option and target models; it gets a Context
and returns a StepResult whose plan (a list of shrink.surgery ops, in the order they are to run)
shrink.surgery.apply carries out. shrink.methods.catalog finds the built-in methods (every module
of this package) and the plugins (entry-point group `shrink.methods`).

    @register("heads.a_star", options=AStarOptions, target=HeadsTarget, needs_labels=False)
    def a_star(ctx, target, options) -> StepResult: ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from shrink.surgery.plan import legacy_plan


class Strict(BaseModel):
    """Base for option/target models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NoTarget(Strict):
    pass


# Deprecated, for plugins written before plans were op lists: Plan(heads=..., ffn=..., ...) returns
# the equivalent list of shrink.surgery ops.
Plan = legacy_plan


@dataclass
class StepResult:
    # shrink.surgery ops (KeepHeads, KeepFFN, DropLayers, LowRank, ReplaceEmbedding), applied in this
    # order; None or []: the step changes no shape
    plan: list | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # a rewritten tokenizer the plan's new token ids need (embedding.vocab): the pipeline saves it and
    # re-tokenizes the student's data with it (shrink.prune.pipeline.follow_vocabulary)
    tokenizer: Any = None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    options: type[Strict]
    target: type[Strict]
    needs_labels: bool
    description: str
    # cheap {"target": {...}, "options": {...}} for tiny models: the contract test runs every method with it
    smoke: dict | None = None
    # the step trains (shrink.train.loop.train): `shrink prune --budget` gives it a share of the time
    trains: bool = False
    # options -> the fraction of its planned steps a budget may never cut it below (None: any)
    min_train_fraction: Callable[[Any], float] | None = None


METHODS: dict[str, Method] = {}  # filled by @register; read through shrink.methods.catalog


def register(name: str, *, options: type[Strict], target: type[Strict] = NoTarget, needs_labels: bool = False, smoke: dict | None = None,
             trains: bool = False, min_train_fraction: Callable[[Any], float] | None = None):
    """Register a method. `smoke`: cheap settings for tiny models ({"target": ..., "options": ...});
    with them tests/contract runs the method on every family (plan applies, exact reload, ONNX parity).
    `trains`: the method trains with shrink.train.loop.train, so `shrink prune --budget` shares the
    training time among such steps; `min_train_fraction(options)`: the share of its planned steps a
    budget must leave it (e.g. l0's target warm-up), even when that overruns the budget."""

    def decorate(fn: Callable) -> Callable:
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = Method(name, fn, options, target, needs_labels, description, smoke, trains, min_train_fraction)
        return fn

    return decorate


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
    objective: Any  # shrink.train.objectives.Objective
    has_labels: bool
    device: str = "cpu"
    seed: int = 0
    # the pipeline's (tokenizer) -> (calibration, calibration_batches, evaluation, held-out stats): the
    # same data tokenized anew for the student, each batch with the teacher's tokenization of its rows
    # under batch["teacher"]; None where the data are ids only (a vocabulary step renumbers them)
    retokenize: Callable | None = None
