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
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shrink.errors import BadInputError
from shrink.methods.catalog import get_method

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
MAX_VALUES = 100_000  # a recipe is small; more values than this (after aliases) is an alias bomb
MAX_INT = 2**63 - 1  # what torch and numpy take; a larger integer is a typo or an attack
_INDEX = re.compile(r"[0-9]{1,9}\Z")
_NAME = re.compile(r"\w[\w .+-]*\Z")  # it names the default output directory: no / .. or markup


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str
    target: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    # what a run costs, as measured by the benchmark that set the defaults (shown by `shrink recipes NAME`)
    expected_time: str = ""
    steps: list[Step] = Field(min_length=1)
    source: str = Field(default="", exclude=True)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if len(name) > 100 or not _NAME.match(name):
            raise ValueError("use letters, digits, spaces and . _ + - (the name becomes the default output directory)")
        return name


# what a recipe file may say at the top: Recipe's own fields, less `source` (ours: the file it came from)
TOP_LEVEL_KEYS = tuple(name for name in Recipe.model_fields if name != "source")


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
            match = [v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value in (key, str(key))]
            if not match:
                return line
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _fail(path: Path, node, location: tuple, message: str, overrides: list[tuple[tuple, str]] = ()) -> BadInputError:
    """The one-line error for a bad value: `file:line: key: message`, or `--set KEY=VALUE: key:
    message` when the value (or a mapping above it) came from --set."""
    where = ".".join(str(part) for part in location)
    location = tuple(location)
    # the deepest --set that covers the location; of two at the same place, the later (it won)
    for _, (set_location, assignment) in sorted(enumerate(overrides), key=lambda o: (-len(o[1][0]), -o[0])):
        n = min(len(location), len(set_location))
        if n and location[:n] == set_location[:n]:  # the value, inside it, or a mapping it made
            return BadInputError(f"--set {_short(assignment)}: {where + ': ' if where else ''}{message} (the value came from --set)")
    line = _line_of(node, location)
    prefix = f"{path}:{line}" if line else str(path)
    return BadInputError(f"{prefix}: {where + ': ' if where else ''}{message}")


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _char(exc) -> str:
    return chr(exc.character) if isinstance(exc.character, int) else str(exc.character)


def _value_problem(exc: ValueError) -> str:
    if "integer string conversion" in str(exc):
        return f"a number has too many digits (a recipe value is at most {MAX_INT})"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def parse_set_value(assignment: str, raw: str):
    """The VALUE of --set KEY=VALUE as one YAML value, with the safe loader: numbers, booleans,
    lists, `{heads_count: 20}`. Tags, anchors and aliases are refused; every problem is one line."""
    hint = "quote text values, e.g. --set 'KEY=\"a value\"'"
    assignment = _short(assignment)
    try:
        tokens = list(yaml.scan(raw, Loader=yaml.SafeLoader))
        tags = ["".join(part or "" for part in t.value) for t in tokens if isinstance(t, yaml.TagToken)]
        if tags:
            raise BadInputError(f"--set {assignment}: tags are not allowed in --set (the value has {_short(tags[0], 60)})", hint="give a plain value")
        if any(isinstance(t, (yaml.AnchorToken, yaml.AliasToken)) for t in tokens):
            raise BadInputError(f"--set {assignment}: anchors and aliases (& and *) are not allowed in --set", hint=hint)
        return yaml.safe_load(raw)
    except yaml.reader.ReaderError as exc:
        raise BadInputError(f"--set {assignment}: the value has an unacceptable character {_char(exc)!r}", hint=hint) from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"--set {assignment}: the value is not valid YAML: {problem}", hint=hint) from None
    except RecursionError:
        raise BadInputError(f"--set {assignment}: the value is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise BadInputError(f"--set {assignment}: {_value_problem(exc)}") from None


def set_override(data: dict, assignment: str) -> tuple:
    """Apply `a.b.0.c=value` (value parsed as YAML: numbers, booleans, lists) to nested data.
    Returns the location it set, so errors about that value can say it came from --set."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise BadInputError(f"--set {_short(assignment)!r} is not KEY=VALUE", hint="e.g. --set steps.0.target.heads_fraction=0.4")
    value = parse_set_value(assignment, raw)
    parts = key.split(".")
    key = _short(key)
    node: Any = data
    location: list = []
    for i, part in enumerate(parts):
        here = _short(".".join(parts[: i + 1]))
        if isinstance(node, list):
            if not _INDEX.match(part) or int(part) >= len(node):
                raise BadInputError(f"--set {key}: {here} does not exist in the recipe (it has {len(node)} items, numbered from 0)")
            part = int(part)
        elif not isinstance(node, dict):
            raise BadInputError(f"--set {key}: {_short('.'.join(parts[:i]))} is a single value, so it has no {_short(part)}")
        location.append(part)
        if i == len(parts) - 1:
            node[part] = value
        elif isinstance(node, dict):
            if node.get(part) is None:  # absent, or `options:` left empty in the file
                node[part] = {}
            node = node[part]
        else:
            node = node[part]
    return tuple(location)


def _bad_value(data) -> tuple[tuple, str] | None:
    """The first value no recipe may hold: NaN or infinity, an integer beyond int64, or more values
    than a recipe has (aliases expand a few lines into billions). Iterative: nesting cannot overflow."""
    stack, seen = [((), data)], 0
    while stack:
        location, value = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return (), f"holds more than {MAX_VALUES} values once its aliases are expanded; a recipe is a few dozen"
        if isinstance(value, float) and not math.isfinite(value):
            return location, "must be a finite number"
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return location, f"is too large (at most {MAX_INT})"
        if isinstance(value, dict):
            stack.extend((location + (k,), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((location + (i,), v) for i, v in reversed(list(enumerate(value))))
    return None


def _read(path: Path):
    """(node, data) of a recipe file; every problem with the text is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
        loader = yaml.SafeLoader(text)  # parsed once: the nodes (for line numbers), then the data
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise BadInputError(f"cannot read the recipe {path}: {exc.strerror or exc}") from None
    except yaml.reader.ReaderError as exc:
        raise BadInputError(f"{path}: malformed YAML: unacceptable character {_char(exc)!r} (position {exc.position})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"{where}: malformed YAML: {problem}") from None
    except RecursionError:
        raise BadInputError(f"{path}: nested too deeply to be a recipe") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise BadInputError(f"{path}: {_value_problem(exc)}") from None
    return node, data


def _check_top_level(path: Path, node, data: dict, overrides=()) -> None:
    """Only name, description and steps, as strings; checked before anything else reads the data."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:  # also every non-string key (1:, null:, [a]:)
            shown = key if isinstance(key, str) else repr(key)
            raise _fail(path, node, (shown,), f"unknown key (a recipe has {', '.join(TOP_LEVEL_KEYS)})", overrides)


def _default_name(stem: str) -> str:
    name = re.sub(r"[^\w.+-]", "_", stem)[:100]
    return name if _NAME.match(name) else "recipe"


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    path = recipe_path(name_or_path)
    node, data = _read(path)
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a recipe is a mapping with name, description and steps")
    _check_top_level(path, node, data)
    data.setdefault("name", _default_name(path.stem))
    applied = [(set_override(data, assignment), assignment) for assignment in overrides]
    _check_top_level(path, node, data, applied)
    bad = _bad_value(data)
    if bad is not None:
        raise _fail(path, node, *bad, applied)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise _fail(path, node, tuple(first["loc"]), _message(first), applied) from None
    recipe.source = str(path)
    for i, step in enumerate(recipe.steps):
        method = get_method(step.method)  # unknown method -> clear error
        for part, model in (("options", method.options), ("target", method.target)):
            try:
                validated = model(**getattr(step, part))
            except ValidationError as exc:
                first = exc.errors()[0]
                raise _fail(path, node, ("steps", i, part, *first["loc"]), _message(first), applied) from None
            values = validated.model_dump()
            bad = _bad_value(values)  # "nan" or "1e400" as text, read by pydantic as a float
            if bad is not None:
                raise _fail(path, node, ("steps", i, part, *bad[0]), bad[1], applied)
            setattr(step, part, values)
    return recipe


def _non_finite(value) -> bool:
    """NaN or infinity, also as the text pydantic reads as one ("nan", "1e400")."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and not math.isfinite(value)


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if _non_finite(error.get("input")) and error["type"] not in ("string_type", "literal_error"):
        return "must be a finite number"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return error["msg"]


def validated(step: Step):
    """(method, options model, target model) of a step loaded by load_recipe."""
    method = get_method(step.method)
    return method, method.options(**step.options), method.target(**step.target)
