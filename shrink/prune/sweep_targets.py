"""The targets of `shrink sweep` and the points they make: which recipe step gets which target.

A plain number S is a speedup. The recipe's first step whose method has a target gets `speedup: S`
when its method takes one, else the key it already uses (or the first one the rule knows) mapped by
SPEEDUP_RULE: flops_fraction = params_fraction = hidden_fraction = 1/S (the share kept),
heads_fraction = layers_fraction = sparsity = 1 - 1/S (the share removed). `KEY=VALUE` sets that key
of that step (the target becomes {KEY: VALUE}); a recipe whose method lacks KEY skips it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from shrink.console import note
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.prune.recipe import load_recipe

AS_WRITTEN = "as written"
# speedup S -> the value of a target key, for methods that take no `speedup`
SPEEDUP_RULE = {
    "flops_fraction": lambda s: 1 / s,  # kept
    "params_fraction": lambda s: 1 / s,  # kept
    "hidden_fraction": lambda s: 1 / s,  # kept
    "heads_fraction": lambda s: 1 - 1 / s,  # removed
    "layers_fraction": lambda s: 1 - 1 / s,  # removed
    "sparsity": lambda s: 1 - 1 / s,  # zeroed (makes nothing faster on dense runtimes)
}
_KEY = re.compile(r"[A-Za-z_]\w*\Z")


@dataclass(frozen=True)
class Target:
    label: str  # "1.5x", "heads_fraction=0.3", "as written"
    speedup: float | None = None
    key: str | None = None
    value: float | int | None = None


@dataclass
class PointPlan:
    recipe: str  # the recipe's name
    target: Target
    ref: str = ""  # what --recipe said
    overrides: tuple = ()  # the --set of this point (the user's for this recipe, then the target's)
    target_set: dict | None = None  # {"step": i, KEY: VALUE}: what the target changed
    steps: list | None = None  # the recipe's steps as they will run
    skip: str | None = None  # why this recipe does not take this target

    @property
    def name(self) -> str:
        return self.recipe if self.target.label == AS_WRITTEN else f"{self.recipe}-{self.target.label}"


def parse_targets(text: str | None) -> list[Target]:
    """`1.5,2,heads_fraction=0.3` -> targets; None or empty: each recipe once, as written."""
    if text is None or not text.strip():
        return [Target(AS_WRITTEN)]
    targets = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        try:
            number = float(raw if sep else part)
        except ValueError:
            raise BadInputError(f"--targets {part!r}: expected a speedup (1.5) or KEY=VALUE (heads_fraction=0.3)") from None
        if not math.isfinite(number):
            raise BadInputError(f"--targets {part!r}: must be a finite number")
        if sep:
            key = key.strip()
            if not _KEY.match(key):
                raise BadInputError(f"--targets {part!r}: {key!r} is not a target key (e.g. heads_fraction, flops_fraction, speedup)")
            value = int(number) if number.is_integer() and "." not in raw and "e" not in raw.lower() else number
            target = Target(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}", key=key, value=value)
        else:
            if number <= 1:
                raise BadInputError(f"--targets {part}: a plain number is a speedup and must be above 1", hint="or give KEY=VALUE, e.g. heads_fraction=0.3")
            target = Target(f"{number:g}x", speedup=number)
        if target.label not in [t.label for t in targets]:
            targets.append(target)
    if not targets:
        raise BadInputError(f"--targets {text!r}: no target given")
    return targets


def split_overrides(refs: list[str], overrides: list[str]) -> dict[str, list[str]]:
    """The --set of each recipe: as prune takes them (with several recipes, KEY starts with a recipe name)."""
    if len(refs) == 1:
        return {refs[0]: list(overrides)}
    names = [Path(r).stem for r in refs]
    for override in overrides:
        if "." not in override.partition("=")[0] or override.split(".", 1)[0] not in names:
            raise BadInputError(f"--set {override[:100]}: with several recipes, start the key with a recipe name ({', '.join(names)})")
    return {ref: [o.split(".", 1)[1] for o in overrides if o.split(".", 1)[0] == name] for ref, name in zip(refs, names)}


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


def target_for(step_method, current: dict, target: Target) -> tuple[dict | None, str | None]:
    """(the step's new target, None) or (None, why the method does not take it)."""
    fields = list(step_method.target.model_fields)
    if target.key is not None:
        if target.key not in fields:
            return None, f"{step_method.name} has no target {target.key} (it takes {', '.join(fields)})"
        return {target.key: target.value}, None
    if "speedup" in fields:
        return {"speedup": target.speedup}, None
    used = [k for k, v in current.items() if v is not None and k in SPEEDUP_RULE]
    known = used or [k for k in fields if k in SPEEDUP_RULE]
    if not known:
        return None, f"{step_method.name} takes no speedup and none of {', '.join(SPEEDUP_RULE)} (it takes {', '.join(fields)})"
    return {known[0]: round(SPEEDUP_RULE[known[0]](target.speedup), 4)}, None


def plan_points(recipe_refs: list[str], overrides: list[str], targets: list[Target]) -> list[PointPlan]:
    """Every (recipe, target) point, validated now (a bad recipe or target is exit 2 before any work)."""
    if not recipe_refs:
        raise BadInputError("no recipe given", hint="pass --recipe NAME (see `shrink recipes`)")
    per_recipe, plans, names = split_overrides(recipe_refs, overrides), [], []
    for ref in recipe_refs:
        base = load_recipe(ref, per_recipe[ref])
        if base.name in names:
            raise BadInputError(f"recipe {base.name} is given twice", hint="a sweep runs each recipe once per target")
        names.append(base.name)
        index = next((i for i, s in enumerate(base.steps) if get_method(s.method).target.model_fields), None)
        for target in targets:
            if index is None or target.label == AS_WRITTEN:
                if target.label != AS_WRITTEN and any(p.recipe == base.name for p in plans):
                    continue
                if target.label != AS_WRITTEN:
                    note(f"recipe {base.name} has no step with a target: it runs once, as written")
                plans.append(PointPlan(base.name, Target(AS_WRITTEN), ref, tuple(per_recipe[ref]), None, _steps(base)))
                continue
            new, why = target_for(get_method(base.steps[index].method), base.steps[index].target, target)
            if new is None:
                plans.append(PointPlan(base.name, target, ref, skip=why))
                continue
            extra = f"steps.{index}.target={json.dumps(new)}"
            try:
                recipe = load_recipe(ref, [*per_recipe[ref], extra])
            except BadInputError as exc:
                problem = exc.message.replace(f"--set {extra}: ", "").removesuffix(" (the value came from --set)")
                raise BadInputError(f"--targets {target.label}: recipe {base.name}: {problem}") from None
            plans.append(PointPlan(base.name, target, ref, (*per_recipe[ref], extra), {"step": index, **new}, _steps(recipe)))
    for target in targets:
        reasons = [p.skip for p in plans if p.target == target]
        if target.key is not None and all(reasons):
            raise BadInputError(f"--targets {target.label}: no recipe takes it ({reasons[0] if reasons else 'no recipe has a step with a target'})")
    if all(p.skip for p in plans):
        raise BadInputError(f"no recipe takes any of the targets ({plans[0].skip})")
    return plans


def _steps(recipe) -> list:
    return jsonable([s.model_dump() for s in recipe.steps])
