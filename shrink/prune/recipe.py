"""Recipes: YAML files validated by pydantic. Built-ins live in shrink/recipes/ (also `recipes/`).

    name: heads-a-star
    description: ...
    steps:
      - method: heads.a_star
        target: {heads_fraction: 0.5}
        options: {calibration_samples: 64}

Errors name the file, the key and its line: `my.yaml:7: steps.0.options.beam: ...`.
`--set steps.0.target.heads_fraction=0.33` overrides a value before validation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shrink.errors import BadInputError
from shrink.methods.catalog import get_method

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    target: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    steps: list[Step] = Field(min_length=1)
    source: str = Field(default="", exclude=True)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise BadInputError(f"recipe file {name_or_path} does not exist")
        return path
    builtins = builtin_recipes()
    if name_or_path in builtins:
        return builtins[name_or_path]
    close = difflib.get_close_matches(name_or_path, builtins, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"built-in recipes: {', '.join(builtins) or 'none'}"
    raise BadInputError(f"unknown recipe {name_or_path!r}", hint=hint)


def _line_of(node: yaml.Node | None, location: tuple) -> int | None:
    """1-based line of the YAML node at a pydantic error location (deepest node that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                return line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _fail(path: Path, node, location: tuple, message: str) -> BadInputError:
    where = ".".join(str(part) for part in location)
    line = _line_of(node, location)
    prefix = f"{path}:{line}" if line else str(path)
    return BadInputError(f"{prefix}: {where + ': ' if where else ''}{message}")


def set_override(data: dict, assignment: str) -> None:
    """Apply `a.b.0.c=value` (value parsed as YAML: numbers, booleans, lists) to nested data."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise BadInputError(f"--set {assignment!r} is not KEY=VALUE", hint="e.g. --set steps.0.target.heads_fraction=0.4")
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = int(part) if isinstance(node, list) and part.isdigit() else part
        try:
            node = node[nxt] if isinstance(node, list) else node.setdefault(nxt, {})
        except (IndexError, TypeError, AttributeError):
            raise BadInputError(f"--set {key}: {'.'.join(parts[: i + 1])} does not exist in the recipe") from None
    last = parts[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise BadInputError(f"--set {key}: cannot set {last} there")


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInputError(f"{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a recipe is a mapping with name, description and steps")
    data.setdefault("name", path.stem)
    for assignment in overrides:
        set_override(data, assignment)
    try:
        recipe = Recipe(**data, source=str(path))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(path, node, tuple(first["loc"]), _message(first)) from None
    for i, step in enumerate(recipe.steps):
        method = get_method(step.method)  # unknown method -> clear error
        for part, model in (("options", method.options), ("target", method.target)):
            try:
                validated = model(**getattr(step, part))
            except ValidationError as exc:
                first = exc.errors()[0]
                raise _fail(path, node, ("steps", i, part, *first["loc"]), _message(first)) from None
            setattr(step, part, validated.model_dump())
    return recipe


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    return error["msg"]


def validated(step: Step):
    """(method, options model, target model) of a step loaded by load_recipe."""
    method = get_method(step.method)
    return method, method.options(**step.options), method.target(**step.target)
