"""Hostile input never reaches "internal error" (issue 15): one test per row of the issue's table,
and `--json` on failure for every command. The fuzz test is test_fuzz_recipes.py, Ctrl-C is
test_interrupt.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError, OutputExistsError
from shrink.measure import export as export_module
from shrink.models.slim import atomic_directory, save_slim, umask

from helpers import (
    ARCHITECTURES,
    assert_exit,
    shrink_process,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    write_model_and_data,
)

runner = CliRunner()
FAST = [
    "--set", "steps.0.options.calibration_samples=8",
    "--set", "steps.0.options.max_evaluations=20",
    "--set", "steps.1.options.max_steps=2",
    "--max-samples", "16", "--eval-samples", "8", "--max-length", "32",
]
ON_LINUX = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("hostile"))


def prune_args(setup, out, *extra, recipe="heads-a-star"):
    return ["prune", setup / "model", "--recipe", recipe, "--data", setup / "data.txt", "-o", out, "--no-export",
            "--set", "steps.0.target={heads_count: 5}", *FAST, *extra]


def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import shrink.models.hub
    import shrink.prune.pipeline

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    # the commands import load_model when they run; the pipeline holds its own reference
    for module in (shrink.models.hub, shrink.prune.pipeline):
        monkeypatch.setattr(module, "load_model", loaded)


# --- row 1: two runs writing the same -o at once: exactly one wins, the other exits 2 "exists" -----


def _race(first, second):
    a, b = shrink_process(*first), shrink_process(*second)
    results = [(p.wait(timeout=240), *p.communicate()) for p in (a, b)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-600:]) for code, _, err in results]
    loser = next(err for code, _, err in results if code == 2)
    assert "exists" in loser and "Traceback" not in loser, loser
    return results


@pytest.mark.slow  # ~5 s: two real processes
def test_two_exports_to_the_same_file_at_once(setup, tmp_path):
    target = tmp_path / "same.onnx"
    args = ["--quiet", "export", setup / "model", "-o", target]
    _race(args, args)
    import onnxruntime as ort

    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])  # the winner's file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.onnx"]  # no temporary leftovers


@pytest.mark.slow  # ~5 s: two real processes
def test_two_prunes_to_the_same_directory_at_once(setup, tmp_path):
    out = tmp_path / "same"
    args = ["--quiet", *prune_args(setup, out)]
    _race(args, args)
    assert (out / "report.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same"]


def test_export_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    """The exclusive step itself, deterministically: the other run's file stays as it was."""
    (tmp_path / "finished.onnx").write_bytes(b"ours")
    (tmp_path / "m.onnx").write_bytes(b"theirs")
    with pytest.raises(OutputExistsError, match="exists"):
        export_module.place_file(tmp_path / "finished.onnx", tmp_path / "m.onnx", overwrite=False)
    assert (tmp_path / "m.onnx").read_bytes() == b"theirs"
    export_module.place_file(tmp_path / "finished.onnx", tmp_path / "n.onnx", overwrite=False)
    assert (tmp_path / "n.onnx").read_bytes() == b"ours" and not (tmp_path / "finished.onnx").exists()


def test_prune_never_replaces_a_directory_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="exists"):
        with atomic_directory(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()  # another run finished first
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temporary directory is gone


# --- row 2: every head removed: the export keeps its inputs and passes parity, on every family -----


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_all_heads_removed_exports_with_every_input(model_type, tmp_path):
    model = tiny_model(model_type, task="seq")
    surgery.prune_heads(model, {i: [] for i in range(3)})
    report = export_module.export_onnx(model, tmp_path / "m.onnx", tokenizer=tiny_tokenizer() if model_type == "bert" else None)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == export_module.input_names(model) == report["inputs"]
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_prune_with_every_head_removed_exports_and_benches(tmp_path):
    """The issue's command: heads_fraction=1.0 through prune, export and the latency run (a model
    with 160 positions: the report's latency run uses 128 tokens)."""
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()
    model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(f"the {w} sat on the mat." for w in ("cat", "dog", "owl", "fox") * 5))
    result = invoke(
        "prune", tmp_path / "model", "--recipe", "heads-a-star", "--data", tmp_path / "data.txt", "-o", tmp_path / "out",
        "--set", "steps.0.target.heads_fraction=1.0", *FAST, "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["after"]["heads_per_layer"] == [0, 0, 0]
    assert report["onnx"]["export"]["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]


# --- row 3: an unwritable -o is exit 2 "cannot write to", before any work ----------------------------


@ON_LINUX
def test_unwritable_prune_output_fails_before_any_work(setup, monkeypatch):
    no_work(monkeypatch)
    assert_exit(invoke(*prune_args(setup, "/proc/shrink-test/out")), 2, "cannot write to /proc/shrink-test/out")


@ON_LINUX
def test_unwritable_export_output_fails_before_any_work(setup, monkeypatch):
    no_work(monkeypatch)
    assert_exit(invoke("export", setup / "model", "-o", "/proc/shrink-test.onnx"), 2, "cannot write to /proc/shrink-test.onnx")


def test_output_under_a_file_or_too_long_is_exit_2(setup, tmp_path, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "file").write_text("x")
    assert_exit(invoke(*prune_args(setup, tmp_path / "file" / "out")), 2, "cannot write to", "is a file")
    assert_exit(invoke("export", setup / "model", "-o", tmp_path / ("a" * 300 + ".onnx")), 2, "cannot write to")
    assert_exit(invoke(*prune_args(setup, tmp_path / ("a" * 300))), 2, "cannot write to")


# --- row 4: eval of an .onnx file whose config.json beside it is corrupt --------------------------


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    export_module.export_onnx(tiny_model("bert"), directory / "m.onnx")
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"id2label": 5}'])
def test_eval_onnx_with_corrupt_sibling_config(setup, onnx_dir, text):
    (onnx_dir / "config.json").write_text(text)
    result = invoke("eval", onnx_dir / "m.onnx", "--data", setup / "data.txt")
    assert_exit(result, 2, f"{onnx_dir / 'config.json'}")


# --- rows 5-6: recipe top-level keys: `source`, non-string keys ------------------------------------


@pytest.mark.parametrize("text, message", [
    ("source: x\nsteps:\n  - method: distill\n", "r.yaml:1: source: unknown key"),
    ("name: x\nsteps:\n  - method: distill\nsource: /etc\n", "r.yaml:4: source: unknown key"),
    ("1: x\nsteps:\n  - method: distill\n", "r.yaml:1: 1: unknown key"),
    ("? [a, b]\n: x\nsteps:\n  - method: distill\n", "r.yaml:1: malformed YAML: found unhashable key"),
    ("true: x\nsteps:\n  - method: distill\n", "r.yaml:1: True: unknown key"),
    ("null: x\nsteps:\n  - method: distill\n", "None: unknown key"),
])
def test_recipe_top_level_keys(setup, tmp_path, monkeypatch, text, message):
    (tmp_path / "r.yaml").write_text(text)
    assert_exit(invoke("recipes", tmp_path / "r.yaml"), 2, message)
    no_work(monkeypatch)
    assert_exit(invoke("prune", setup / "model", "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o"), 2, message)


# --- rows 7-9: --set values that are not YAML, carry tags, tabs or '@' -----------------------------


@pytest.mark.parametrize("assignment, message", [
    ("steps.0.target.heads_fraction=[", "the value is not valid YAML"),
    ("steps.0.target.heads_fraction={a: 1", "the value is not valid YAML"),
    ("steps.0.target.heads_fraction=\t0.3", "the value is not valid YAML"),
    ("steps.0.target.heads_fraction=@x", "the value is not valid YAML"),
    ("steps.0.target.heads_fraction=`x", "the value is not valid YAML"),
    ("steps.0.target.heads_fraction=a: b: c", "the value is not valid YAML"),
    ("steps.0.target=&a [1, *a]", "anchors and aliases"),
    ("steps.0.target.heads_fraction=" + "[" * 5000, "--set steps.0.target.heads_fraction=[[["),
    ("steps.0.target.heads_fraction=" + "9" * 5000, "too many digits"),
])
def test_set_values_that_do_not_parse(setup, tmp_path, monkeypatch, assignment, message):
    no_work(monkeypatch)
    result = invoke(*prune_args(setup, tmp_path / "o", "--set", assignment))
    assert_exit(result, 2, "--set steps.0.target", message)
    assert len(result.stderr.strip().splitlines()) == 1


def test_set_tags_are_refused_and_never_run(setup, tmp_path, monkeypatch):
    no_work(monkeypatch)
    marker = tmp_path / "ran"
    for value in (
        f'!!python/object/apply:os.system ["touch {marker}"]',
        f'!!python/object/apply:builtins.exec ["open({str(marker)!r}, \'w\')"]',
        "!custom x",
        "[1, !!str 2]",
    ):
        result = invoke(*prune_args(setup, tmp_path / "o", "--set", f"steps.0.target={value}"))
        assert_exit(result, 2, "tags are not allowed in --set")
    assert not marker.exists()


# --- row 10: --json on failure, every command ---------------------------------------------------------


def _error_document(result, code):
    assert result.exit_code == code, result.output
    document = json.loads(result.stdout)  # exactly one document, nothing else on stdout
    assert set(document) == {"error", "exit_code", "hint"} and document["exit_code"] == code
    assert document["error"] and "\n" not in document["error"]
    assert document["error"].split(" (hint")[0][:40] in result.stderr  # the one line is still on stderr
    return document


@pytest.mark.parametrize("args", [
    ["recipes", "no-such-recipe"],
    ["info", "/no/such/model"],
    ["export", "/no/such/model"],
    ["eval", "/no/such/model.onnx"],
    ["bench", "/no/such/model.onnx"],
    ["prune", "/no/such/model", "--recipe", "no-such-recipe"],
])
def test_json_error_document_on_every_command(args, tmp_path):
    document = _error_document(invoke(*args, "--json"), 2)
    assert "no-such" in document["error"] or "does not exist" in document["error"]


def test_json_error_document_with_a_hint(setup):
    document = _error_document(invoke("recipes", "heads-astar", "--json"), 2)
    assert "heads-a-star" in document["hint"]


@pytest.mark.parametrize("args", [["info", "--json"], ["info", "--bogus", "x", "--json"], ["nope", "--json"]])
def test_json_error_document_on_usage_errors(args):
    document = _error_document(invoke(*args), 2)
    assert "--help" in document["hint"]


def test_json_error_document_on_internal_errors(setup, monkeypatch):
    import shrink.models.info

    def broken(*args, **kwargs):
        raise RuntimeError("something that should not happen")

    monkeypatch.setattr(shrink.models.info, "describe", broken)
    document = _error_document(invoke("info", setup / "model", "--json"), 3)
    assert document["error"].startswith("internal error: RuntimeError") and "--debug" in document["hint"]


def test_json_gate_failure_prints_only_the_report(setup, tmp_path):
    result = invoke(*prune_args(setup, tmp_path / "o", "--max-quality-drop", "0", "--json"))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)  # one document: the report, not a second error document
    assert "quality" in report and "threshold failed" in result.stderr


def test_markup_in_user_text_is_printed_as_is(tmp_path):
    for name in ("[/x].yaml", "[bold]x.yaml"):
        result = invoke("recipes", tmp_path / name)
        assert_exit(result, 2, f"{tmp_path / name} does not exist")


# --- row 11: a --set value of the wrong type says it came from --set -------------------------------


@pytest.mark.parametrize("assignment, message", [
    ("steps.0.target.heads_fraction=abc", "steps.0.target.heads_fraction: Input should be a valid number"),
    ("steps.0.target={heads_count: many}", "steps.0.target.heads_count: Input should be a valid integer"),
    ("steps.0.options.beam_width=3", "steps.0.options.beam_width: unknown key"),
    ("steps.0.target.x.y=1", "steps.0.target.x: unknown key"),
    ("source=x", "source: unknown key"),
    ("name=../../elsewhere", "name: use letters"),
])
def test_set_wrong_values_name_the_set(setup, tmp_path, monkeypatch, assignment, message):
    no_work(monkeypatch)
    result = invoke(*prune_args(setup, tmp_path / "o", "--set", assignment))
    assert_exit(result, 2, f"--set {assignment}: {message}", "came from --set")
    assert "heads-a-star.yaml" not in result.stderr


def test_set_paths_that_do_not_exist(setup, tmp_path, monkeypatch):
    no_work(monkeypatch)
    for assignment in ("steps.9.target.x=1", "steps.²=1", "steps.-1.x=1", "steps.0.method.x=1", "steps." + "9" * 5000 + "=1"):
        assert_exit(invoke(*prune_args(setup, tmp_path / "o", "--set", assignment)), 2, "--set steps.")


# --- row 12: NaN and infinity ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e400"])
def test_non_finite_numbers(setup, tmp_path, monkeypatch, value):
    no_work(monkeypatch)
    result = invoke(*prune_args(setup, tmp_path / "o", "--set", f"steps.0.target.heads_fraction={value}"))
    assert_exit(result, 2, "steps.0.target.heads_fraction: must be a finite number", "came from --set")
    (tmp_path / "r.yaml").write_text(f"name: x\nsteps:\n  - method: distill\n    options:\n      lr: {value}\n")
    assert_exit(invoke("recipes", tmp_path / "r.yaml"), 2, "r.yaml:5: steps.0.options.lr: must be a finite number")


def test_integers_beyond_int64(tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\nsteps:\n  - method: distill\n    options: {max_steps: 99999999999999999999}\n")
    assert_exit(invoke("recipes", tmp_path / "r.yaml"), 2, "r.yaml:4: steps.0.options.max_steps: is too large")


# --- rows 13-14: pickle-only checkpoints ---------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _pickle_checkpoint(directory: Path, extra=None):
    model = tiny_model("bert")
    model.config.architectures = ["BertModel"]
    model.config.save_pretrained(directory)
    state = dict(model.state_dict())
    if extra is not None:
        state["extra"] = extra
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_malicious_pickle_is_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    _pickle_checkpoint(tmp_path / "evil", _Payload(marker))
    for args in (["info", tmp_path / "evil"], ["export", tmp_path / "evil", "-o", tmp_path / "e.onnx"]):
        result = invoke(*args)
        assert_exit(result, 2, "pytorch_model.bin is a pickle that holds more than tensors", "not loaded", "safetensors")
        assert "Re-running" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_benign_pickle_loads_weights_only_with_a_note(tmp_path):
    _pickle_checkpoint(tmp_path / "plain")
    result = invoke("info", tmp_path / "plain", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_layers"] == 3
    notes = [line for line in result.stderr.splitlines() if "pickle" in line]
    assert len(notes) == 1 and "weights-only" in notes[0] and "safetensors" in notes[0] and "save_pretrained" in notes[0]
    assert "pickle" not in invoke("--quiet", "info", tmp_path / "plain").stderr


# --- row 15: CSV with a 1M-character field --------------------------------------------------------------


def test_csv_with_a_huge_field_is_accepted(tmp_path):
    from shrink.data.examples import read_examples

    (tmp_path / "big.csv").write_text("text,label\n" + "a" * 1_000_000 + ",x\nshort,y\n")
    examples = read_examples(str(tmp_path / "big.csv"), None, None, None)
    assert len(examples) == 2 and len(examples.texts[0]) == 1_000_000


def test_csv_errors_name_the_right_line(tmp_path):
    from shrink.data.examples import read_examples

    (tmp_path / "bad.csv").write_text("text,label\nok,1\n" + "b" * 200_000 + ",2,extra\n")
    with pytest.raises(BadInputError, match="line 3 has more fields"):
        read_examples(str(tmp_path / "bad.csv"), None, None, None)


# --- row 16: output directories get the umask's mode ------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_directory_mode_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        assert umask() == mask
        out = save_slim(tiny_model("bert"), tmp_path / "a" / "slim")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask


def test_failed_write_leaves_no_parent_directories(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new" / "deeper" / "out"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- row 17 (cosmetic): bad manifest layer, --opset hint ---------------------------------------------


def test_bad_manifest_layer_says_which_layer(tmp_path):
    model = tiny_model("bert")
    surgery.prune_heads(model, {0: [1, 2]})
    slim = save_slim(model, tmp_path / "slim")
    config = json.loads((slim / "config.json").read_text())
    config["shrink"]["ops"][0]["layer"] = 42
    (slim / "config.json").write_text(json.dumps(config))
    assert_exit(invoke("info", slim), 2, "layer 42 does not exist (model has 3)")
    for bad in ("not a list", [5], [{"op": "drop_layers", "layers": "x"}], [{"op": "heads", "layer": True, "keep": []}]):
        config["shrink"]["ops"] = bad
        (slim / "config.json").write_text(json.dumps(config))
        assert_exit(invoke("info", slim), 2, "manifest", "is invalid")


def test_opset_hint_and_code_agree(tmp_path):
    low, high = export_module.MIN_OPSET, export_module.MAX_OPSET
    model = tiny_model("bert")
    for opset in (low - 1, high + 1):
        with pytest.raises(BadInputError) as info:
            export_module.export_onnx(model, tmp_path / "m.onnx", opset=opset)
        assert info.value.hint.startswith(f"use {low}..{high}")
    for opset in (low, high):  # both ends of the hint really export
        report = export_module.export_onnx(model, tmp_path / f"{opset}.onnx", opset=opset)
        assert report["opset"] == opset


def test_cli_opset_below_the_range(setup, monkeypatch):
    no_work(monkeypatch)
    result = invoke("export", setup / "model", "--opset", "13", "-o", setup / "x.onnx")
    assert_exit(result, 2, "--opset 13 is not supported", f"use {export_module.MIN_OPSET}..{export_module.MAX_OPSET}")



# --- what already held (the "keep it" list): kept by tests -------------------------------


def test_output_at_the_input_is_refused_even_with_overwrite(setup, tmp_path, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "link").symlink_to(setup / "model")
    for out in (setup / "model", setup, tmp_path / "link"):
        assert_exit(invoke(*prune_args(setup, out, "--overwrite")), 2, "refusing to write over the input")
    assert (setup / "model" / "config.json").is_file()


def test_code_in_the_model_directory_never_runs(setup, tmp_path):
    import shutil

    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    plain = Path(shutil.copytree(setup / "model", tmp_path / "plain"))
    config = json.loads((plain / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
    (plain / "config.json").write_text(json.dumps(config))
    (plain / "evil.py").write_text(code)
    model = tiny_model("bert")
    surgery.prune_heads(model, {0: [1]})
    slim = save_slim(model, tmp_path / "slim")
    (slim / "modeling_shrink.py").write_text(code)
    for directory in (plain, slim):
        result = invoke("info", directory, "--json")
        assert result.exit_code == 0, result.output
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "a recipe is a mapping"),
    (b"\x00\xff\xfe binary", "not UTF-8"),
    (b"name: a\nsteps:\n  - method: distill\n---\nname: b\n", "malformed YAML"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n".encode() for p, k in zip("abcdefgh", "bcdefghi")
    ) + b"name: x\nsteps:\n  - method: distill\n", "unknown key"),
    (b"name: x\nsteps:\n  - method: distill\n    options:\n      loss: &a [auto, auto, auto, auto, auto, auto, auto, auto]\n"
     + b"".join(f"      x{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 8)}]\n".encode() for i in range(7)), "values once its aliases are expanded"),
])
def test_recipe_files_that_are_not_recipes(tmp_path, content, message):
    (tmp_path / "r.yaml").write_bytes(content)
    assert_exit(invoke("recipes", tmp_path / "r.yaml"), 2, message)


def test_bench_quality_gate_needs_data(setup, monkeypatch):
    no_work(monkeypatch)
    assert_exit(invoke("bench", setup / "model", "--max-quality-drop", "0.1"), 2, "needs --data")


def test_paths_that_look_like_markup_are_printed_as_they_are(setup, tmp_path):
    import shutil

    model = tmp_path / "a[" / "b]m"  # the path a[/b]m: a closing tag to rich
    shutil.copytree(setup / "model", model)
    result = invoke("info", model)
    assert result.exit_code == 0 and "a[/b]m" in result.stdout, result.output
    result = invoke("--quiet", "export", model, "-o", tmp_path / "a[" / "b].onnx")
    assert result.exit_code == 0 and "a[/b].onnx" in result.stdout, result.output
    result = invoke("eval", tmp_path / "a[" / "b].onnx", "--tokenizer", setup / "model", "--data", setup / "data.txt")
    assert result.exit_code == 0, result.output
    result = invoke("--quiet", *prune_args(setup, tmp_path / "a[" / "b]out")[:1], model, *prune_args(setup, tmp_path / "a[" / "b]out")[2:])
    assert result.exit_code == 0 and "a[/b]out" in result.stdout, result.output
