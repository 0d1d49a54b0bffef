"""CLI behaviour: help, version, info, recipes, and every bad input of the foundation issue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from shrink.cli import app
from shrink.models.slim import save_slim

from helpers import tiny_model

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_is_instant_and_lists_commands():
    code = "import sys, shrink.cli; sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'onnx')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "heavy imports at CLI start-up"
    result = invoke("--help")
    assert result.exit_code == 0
    assert "info" in result.output and "recipes" in result.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("shrink ")


@pytest.fixture
def slim_dir(tmp_path):
    from shrink import surgery

    model = tiny_model("bert", task="seq")
    surgery.prune_heads(model, {0: [1], 1: []})
    surgery.prune_ffn(model, {2: [0, 1, 2, 3]})
    return save_slim(model, tmp_path / "slim")


def test_info_json_reports_real_shapes(slim_dir):
    result = invoke("info", str(slim_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_type"] == "bert"
    assert data["num_layers"] == 3
    assert data["heads_per_layer"] == [1, 0, 4]
    assert data["ffn_per_layer"] == [37, 37, 4]
    assert data["task_head"] == "BertForSequenceClassification"
    assert data["params_total"] == sum(data["params"].values())
    assert data["slim"] is True


def test_info_table(slim_dir):
    result = invoke("info", str(slim_dir))
    assert result.exit_code == 0
    assert "heads" in result.stdout and "embeddings" in result.stdout


def test_recipes_lists_something_or_says_none():
    result = invoke("recipes")
    assert result.exit_code == 0
    assert result.stdout.strip()


# --- bad input: one line, exit 2 ---------------------------------------------------------------


def assert_bad_input(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path(tmp_path):
    assert_bad_input(invoke("info", str(tmp_path / "nope")), "does not exist")


def test_directory_without_config(tmp_path):
    assert_bad_input(invoke("info", str(tmp_path)), "no config.json")


def test_unsupported_architecture(tmp_path):
    import transformers

    transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=10).save_pretrained(tmp_path)
    assert_bad_input(invoke("info", str(tmp_path)), "'gpt2' is not supported", "bert", "mpnet")


def test_corrupt_safetensors(slim_dir):
    weights = slim_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_bad_input(invoke("info", str(slim_dir)), "cannot load")


def test_corrupt_plain_checkpoint(tmp_path):
    model = tiny_model("roberta")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-50])
    assert_bad_input(invoke("info", str(tmp_path)), "cannot load")


def test_newer_manifest(slim_dir):
    config = json.loads((slim_dir / "config.json").read_text())
    config["shrink"]["format_version"] = 7
    (slim_dir / "config.json").write_text(json.dumps(config))
    assert_bad_input(invoke("info", str(slim_dir)), "newer shrink", "upgrade")


def test_offline_hub_id_fails_cleanly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_bad_input(invoke("info", "bert-base"), "google-bert/bert-base-uncased", "local model directory")


def test_debug_shows_traceback(tmp_path):
    result = invoke("--debug", "info", str(tmp_path / "nope"))
    assert result.exit_code != 0 and result.exception is not None


def test_a_recipe_says_what_a_run_costs():
    result = invoke("recipes", "posttrain-1.5x")
    assert result.exit_code == 0, result.output
    assert "expected time: about 30 s" in result.stdout


def test_ctrl_c_inside_an_extension_import_is_an_interrupt(capsys):
    """pybind11 turns a KeyboardInterrupt during a module's initialisation into ImportError."""
    import typer

    from shrink.commands import cli_errors

    with pytest.raises(typer.Exit) as stopped:
        with cli_errors():
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise ImportError("initialization failed") from exc
    assert stopped.value.exit_code == 130
    with pytest.raises(typer.Exit) as stopped:
        with cli_errors():
            raise ImportError("no module named onnx")
    assert stopped.value.exit_code == 3
