"""ONNX export: parity on every architecture and task head, pruned and unpruned; int8; optimize."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import InternalError
from shrink.measure.export import export_onnx
from shrink.measure.onnx_session import session

from helpers import ARCHITECTURES, slim_everything, tiny_model

TASKS = ["base", "seq", "tok", "qa", "mlm"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("pruned", [False, True])
def test_export_matches_torch(arch, pruned, tmp_path):
    model = tiny_model(arch, task="seq")
    if pruned:
        slim_everything(model)
    report = export_onnx(model, tmp_path / "model.onnx")
    assert max(report["max_abs_diff"].values()) <= 1e-4
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert ("token_type_ids" in names) == (arch in ("bert", "electra"))
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.parametrize("task, outputs", [("base", ["last_hidden_state"]), ("tok", ["logits"]), ("qa", ["start_logits", "end_logits"]), ("mlm", ["logits"])])
def test_task_heads_and_output_names(task, outputs, tmp_path):
    model = tiny_model("bert", task=task)
    surgery.prune_heads(model, {0: [1, 2]})
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report["outputs"] == outputs
    sess = session(tmp_path / "m.onnx")
    assert [o.name for o in sess.get_outputs()] == outputs


def test_factorized_embeddings_export(tmp_path):
    model = tiny_model("distilbert")
    surgery.factorize_word_embeddings(model, rank=8)
    report = export_onnx(model, tmp_path / "m.onnx")
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_dynamic_axes_accept_other_shapes(tmp_path):
    model = tiny_model("bert")
    export_onnx(model, tmp_path / "m.onnx")
    sess = session(tmp_path / "m.onnx")
    feed = {"input_ids": torch.randint(5, 99, (5, 50)).numpy(), "attention_mask": torch.ones(5, 50, dtype=torch.long).numpy(), "token_type_ids": torch.zeros(5, 50, dtype=torch.long).numpy()}
    assert sess.run(None, feed)[0].shape == (5, 50, 32)


def test_parity_inputs_fit_a_model_with_few_positions(tmp_path):
    """Real sentences and random ids are cut to the model's maximum positions (here 20 < 33 tokens)."""
    import transformers as T

    from helpers import tiny_tokenizer

    config = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99, max_position_embeddings=20)
    torch.manual_seed(0)
    model = T.BertModel(config).eval()
    tokenizer = tiny_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    result = export_onnx(model, tmp_path / "m.onnx", tokenizer=tokenizer)
    checked = result["max_abs_diff"]
    assert set(checked) == {"random ids, length 1", "random ids, length 7", "random ids, length 20", "real sentences"}
    assert max(checked.values()) < 1e-4


def test_parity_failure_is_exit_3_and_leaves_nothing(tmp_path, monkeypatch):
    import shrink.measure.export as export

    real = export._torch_outputs
    monkeypatch.setattr(export, "_torch_outputs", lambda *a: [x + 1e-2 for x in real(*a)])
    with pytest.raises(InternalError, match="output 'last_hidden_state' differs") as info:
        export_onnx(tiny_model("bert"), tmp_path / "m.onnx")
    assert info.value.exit_code == 3
    assert list(tmp_path.iterdir()) == []


def test_int8_keeps_top1_agreement(tmp_path):
    model = tiny_model("bert", task="seq")
    report = export_onnx(model, tmp_path / "q.onnx", int8=True)
    assert report["agreement"]["top1_agreement"] >= 0.98
    fp32 = export_onnx(model, tmp_path / "f.onnx")
    assert report["size_bytes"] < fp32["size_bytes"]


def test_optimize_on_a_pruned_model_keeps_parity(tmp_path):
    model = slim_everything(tiny_model("bert"))
    report = export_onnx(model, tmp_path / "o.onnx", optimize=True)
    assert report["optimized"] or "optimize_skipped" in report
    assert max(report["max_abs_diff"].values()) <= 1e-4


# --- the command ------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def checkpoint(tmp_path):
    from shrink.models.slim import save_slim

    return save_slim(slim_everything(tiny_model("bert", task="seq")), tmp_path / "slim")


def test_cli_export_json(checkpoint, tmp_path):
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["outputs"] == ["logits"] and report["size_bytes"] > 0
    assert (tmp_path / "m.onnx").exists()


def test_cli_export_int8_and_optimize(checkpoint, tmp_path):
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "q.onnx"), "--int8", "--optimize"])
    assert result.exit_code == 0, result.output
    assert "int8 agreement" in result.stdout


def test_cli_export_refuses_existing_file(checkpoint, tmp_path):
    (tmp_path / "m.onnx").write_text("mine")
    result = runner.invoke(app, ["export", str(checkpoint), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "m.onnx").read_text() == "mine"


@pytest.mark.parametrize("args, message", [(["-o", "x.txt"], "must end in .onnx"), (["--opset", "3"], "opset 3")])
def test_cli_export_bad_options(checkpoint, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(checkpoint), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_cli_export_missing_model(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
