"""Property-based fuzzing of recipe documents and --set strings (issue 15).

Random recipe documents (mutated from the built-in recipes: values replaced by random unicode,
control characters, huge and non-finite numbers, deep nesting, keys added and removed, the text
itself cut, spliced and tagged) and random --set strings go through `shrink recipes FILE --json`
and `shrink prune ... --recipe FILE --set ...`. Whatever they hold, the result is exit 0 or 2,
never 3, never a traceback, one `error:` line, and nothing is written outside the temporary
directory (an audit hook watches every write, rename and delete while the CLI runs).

prune stops after the recipes are validated and the output checked (model loading is replaced by
a sentinel error), so a few hundred examples take seconds. SHRINK_FUZZ_EXAMPLES=N runs N examples
with a random seed, for a deeper search than `make test` does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from shrink.cli import app
from shrink.errors import BadInputError
from shrink.prune.recipe import builtin_recipes

from helpers import write_model_and_data

runner = CliRunner()
BUILTIN = {name: yaml.safe_load(path.read_text(encoding="utf-8")) for name, path in builtin_recipes().items()}
ACCEPTED = "fuzz: the recipe was accepted"
EXAMPLES = int(os.environ.get("SHRINK_FUZZ_EXAMPLES", "0"))

HOSTILE = [
    "nan", ".nan", ".inf", "-.inf", "1e400", "1.0e+400", "-1", "0", "1" * 40, "9" * 5000, "[", "{", "]", "}",
    "!!python/object/apply:os.system ['touch pwned']", "!!python/name:os.system", "!custom x", "*a", "&a x",
    "\t", "@", "%TAG", "`", "\x00", "\x1b[31m", "\u202e", "\ufeff", "[/x]", "[bold]x", "../../escape",
    "/etc/passwd", "~", "---", "...", "? x", "- a", "a: b: c", "'", '"', "|", ">", "#", "\\", "\r\n",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(HOSTILE),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(["name", "description", "steps", "source", "method", "target", "options"]), st.integers(), st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


def paths(data, prefix=()):
    """Every location in a recipe document, mappings and lists included."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from paths(value, (*prefix, i))


def mutate(draw, data):
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(paths(data))))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not where:
            if action == "replace":
                data = draw(values)
            continue
        parent = data
        try:
            for part in where[:-1]:
                parent = parent[part]
            if action == "replace":
                parent[where[-1]] = draw(values)
            elif action == "delete":
                del parent[where[-1]]
            elif isinstance(parent[where[-1]], dict):
                parent[where[-1]][draw(keys)] = draw(values)
            elif isinstance(parent[where[-1]], list):
                parent[where[-1]].append(draw(values))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation changed the shape
    return data


@st.composite
def documents(draw) -> bytes:
    """The bytes of a recipe file."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "spliced", "nested", "random"]))
    if kind == "random":
        return draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))))
    if kind == "nested":
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
        inner = opener * depth + "1" + closer * depth
        return f"name: x\nsteps:\n  - method: distill\n    options: {{loss: {inner}}}\n".encode()
    data = mutate(draw, json.loads(json.dumps(BUILTIN[draw(st.sampled_from(sorted(BUILTIN)))])))
    try:
        text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()), sort_keys=False)
    except (yaml.YAMLError, RecursionError):  # e.g. a float key safe_dump cannot represent
        text = "name: x\n"
    if kind == "spliced":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE))) + text[at + draw(st.integers(0, 5)):]
    return text.encode("utf-8", "surrogatepass")


set_paths = st.one_of(
    st.sampled_from([
        "steps.0.target.heads_fraction", "steps.0.target", "steps.0.options.epochs", "steps.1.options.lr",
        "steps.0.method", "steps", "name", "description", "source", "steps.0", "steps.0.options.x.y", "steps.99.x",
        "steps.-1", "steps.0.target.heads_count", "heads-a-star.steps.0.target.heads_fraction", "",
    ]),
    st.text(max_size=25),
)
set_values = st.one_of(st.text(max_size=25), st.sampled_from(HOSTILE), values.map(lambda v: json.dumps(v, default=str)))
set_strings = st.one_of(st.builds(lambda k, v: f"{k}={v}", set_paths, set_values), st.text(max_size=40))


class WriteWatch:
    """Records every write, rename and delete outside `root` while `active` (sys.addaudithook)."""

    EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.link", "os.symlink",
              "os.chmod", "os.truncate", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self):
        self.root, self.active, self.outside = None, False, []
        sys.addaudithook(self)

    def _outside(self, path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        path = os.path.realpath(os.fsdecode(path))
        return not (path == self.root or path.startswith(self.root + os.sep))

    def __call__(self, event, args):
        if not self.active:
            return
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & self.WRITE_FLAGS)
            touched = [path] if writes else []
        elif event in self.EVENTS:
            touched = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        self.outside += [(event, str(p)) for p in touched if self._outside(p)]


WATCH = WriteWatch()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_model_and_data(root)
    return root


def check(result, allowed):
    output = result.output
    assert result.exit_code in allowed, (result.exit_code, output[-2000:])
    assert "Traceback" not in output and "internal error" not in output, output[-2000:]
    if result.exit_code == 2:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr[-2000:]


def run_cli(workdir, args):
    """Run in a fresh temporary directory (also the working directory, where outputs without -o
    go); fail on anything written outside it."""
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        WATCH.root, WATCH.outside = os.path.realpath(scratch), []
        before = os.getcwd()
        os.chdir(scratch)
        WATCH.active = True
        try:
            result = runner.invoke(app, [a.replace("{scratch}", scratch) for a in args])
        finally:
            WATCH.active = False
            os.chdir(before)
        assert WATCH.outside == [], WATCH.outside
    return result


@pytest.fixture
def fuzz_env(workdir, monkeypatch):
    import shrink.prune.pipeline

    def accepted(*args, **kwargs):
        raise BadInputError(ACCEPTED)

    monkeypatch.setattr(shrink.prune.pipeline, "build_session", accepted)
    return workdir


FUZZ = settings(
    max_examples=EXAMPLES or 130,  # x 2 tests: a few hundred examples, ~15 s on 2 shared cores
    derandomize=not EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(document=documents(), overrides=st.lists(set_strings, max_size=3), with_output=st.booleans(), json_output=st.booleans())
def test_fuzzed_recipe_documents(fuzz_env, document, overrides, with_output, json_output):
    with tempfile.TemporaryDirectory(dir=fuzz_env) as holder:
        recipe = Path(holder) / "fuzzed.yaml"
        recipe.write_bytes(document)
        shown = run_cli(fuzz_env, ["recipes", str(recipe), *(["--json"] if json_output else [])])
        check(shown, {0, 2})
        if json_output:
            document_out = json.loads(shown.stdout)  # one JSON document, success or failure
            assert ("error" in document_out) == (shown.exit_code == 2)
        sets = [x for o in overrides for x in ("--set", o)]
        output = ["-o", "{scratch}/out"] if with_output else []
        pruned = run_cli(fuzz_env, ["prune", str(fuzz_env / "model"), "--recipe", str(recipe), *sets, *output])
        check(pruned, {2})


@FUZZ
@given(overrides=st.lists(set_strings, min_size=1, max_size=4), recipes=st.lists(st.sampled_from(sorted(BUILTIN)), min_size=1, max_size=2))
def test_fuzzed_set_strings(fuzz_env, overrides, recipes):
    args = ["prune", str(fuzz_env / "model"), *[x for r in recipes for x in ("--recipe", r)], "-o", "{scratch}/out"]
    result = run_cli(fuzz_env, [*args, *[x for o in overrides for x in ("--set", o)], "--json"])
    check(result, {2})
    document = json.loads(result.stdout)
    assert set(document) == {"error", "exit_code", "hint"} and document["exit_code"] == 2


def test_the_watch_sees_writes_outside(tmp_path):
    """The audit hook itself: a write outside the temporary directory is caught."""
    outside = tmp_path / "outside.txt"
    with tempfile.TemporaryDirectory() as scratch:
        WATCH.root, WATCH.outside, WATCH.active = os.path.realpath(scratch), [], True
        try:
            outside.write_text("x")
            (Path(scratch) / "inside.txt").write_text("x")
        finally:
            WATCH.active = False
    assert [event for event, _ in WATCH.outside] == ["open"] and str(outside) in WATCH.outside[0][1]
