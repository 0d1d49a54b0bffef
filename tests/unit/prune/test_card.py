"""The model card (README.md of every prune output): Hub front matter that parses and says only
facts, what was removed, the measured table, how to reproduce it and how to load it."""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import torch
import yaml
from typer.testing import CliRunner

from shrink.cli import app
from shrink.models.hub import load_model
from shrink.prune.card import model_card, write_model_card
from shrink.prune.recipe import load_recipe

from helpers import FAST, SENTENCES, tiny_config, tiny_tokenizer

STRUCTURE = {"num_layers": 6, "original_layers": [0, 1, 2, 3, 4, 5], "heads_per_layer": [12] * 6, "ffn_per_layer": [1536] * 6,
             "params_total": 22713216, "gflops_s128": 2.9}
SLIM = {"num_layers": 4, "original_layers": [0, 1, 3, 5], "heads_per_layer": [6, 8, 12, 4], "ffn_per_layer": [900, 1536, 1200, 700],
        "params_total": 15000000, "gflops_s128": 1.6}
QUALITY = {"before": {"embedding_cosine": 1.0}, "after": {"embedding_cosine": 0.9731}}
BENCH = {"settings": {"batch_sizes": [1], "seq_lengths": [128], "threads": 1,
                      "environment": {"cpu": "AMD EPYC 7B13 (avx2)", "cpu_count": 2}},
         "models": [{"size_mb": 90.4, "p50_ms": 80.0}, {"size_mb": 60.2, "p50_ms": 40.0}]}


def report(**extra) -> dict:
    base = {
        "model": "bert-base", "recipes": ["heads-a-star"], "output": "/runs/slim", "seed": 0, "data": "bundled corpus",
        "eval_data": "20% split of the data", "calibration_examples": 100, "training_examples": 100, "eval_examples": 25,
        "objective": "embedding_cosine", "before": STRUCTURE, "after": SLIM, "quality": QUALITY,
        "steps": [
            {"recipe": "heads-a-star", "method": "heads.a_star", "target": {"heads_fraction": 0.5, "heads_count": None},
             "options": {"calibration_samples": 16}, "seconds": 12.5,
             "stats": {"heads_removed": 36, "removed_per_layer": [6, 4, 0, 8, 6, 12], "loss_increase": 0.0123456, "order": list(range(40))}},
            {"recipe": "heads-a-star", "method": "distill", "target": {}, "options": {"epochs": 1}, "seconds": 30.1,
             "stats": {"distill": {"steps": 64, "losses": [0.3, 0.2], "stopped_early": False}}},
        ],
    }
    return {**base, **extra}


def exported(directory, inputs=("input_ids", "attention_mask", "token_type_ids"), outputs=("last_hidden_state",), name="model.onnx"):
    """An "onnx" entry as the pipeline writes it: paths inside the temporary directory of the run."""
    return {"export": {"path": str(directory / name), "inputs": list(inputs), "outputs": list(outputs)}, "bench": copy.deepcopy(BENCH)}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_base_model_from_an_alias_no_onnx_default_kind_is_shrink():
    card = model_card(report())
    assert front_matter(card) == {
        "base_model": "google-bert/bert-base-uncased",
        "library_name": "transformers",
        "tags": ["shrink", "pruned", "heads-a-star"],
        "pipeline_tag": "feature-extraction",
    }
    assert "[google-bert/bert-base-uncased](https://huggingface.co/google-bert/bert-base-uncased)" in card
    assert "- layers: 6 -> 4 (original layers kept: 0, 1, 3, 5)" in card
    assert "- attention heads: 72 -> 30 (per layer: 12 12 12 12 12 12 -> 6 8 12 4)" in card
    assert "- FFN neurons per layer: 1536 1536 1536 1536 1536 1536 -> 900 1536 1200 700" in card
    assert "22,713,216 -> 15,000,000 (0.66x)" in card
    assert "`heads.a_star` (12.5 s): heads_removed=36, removed_per_layer=[6 4 0 8 6 12], loss_increase=0.01235" in card
    assert "order=" not in card and "losses" not in card  # long lists stay in report.json
    assert "`distill` (30.1 s): steps=64, stopped_early=False" in card
    assert "| embedding_cosine (held-out) | 1.0000 | 0.9731 | -0.0269 |" in card
    assert "AutoModel.from_pretrained(model_dir, trust_remote_code=True)" in card
    assert "shrink.load(model_dir)" in card and 'model_dir = "slim"' in card
    assert "SentenceTransformer" not in card and "onnxruntime" not in card
    assert "shrink prune bert-base --recipe heads-a-star --no-export -o slim" in card
    assert "No ONNX export" in card


def test_sentence_transformers_standard_checkpoint_with_onnx(tmp_path):
    st = {"pooling": "mean", "normalize": True, "dense_modules": 0, "max_seq_length": 256}
    r = report(model="minilm", sentence_transformers=st, checkpoint={"kind": "standard", "why": "heads ops only"},
               onnx=exported(tmp_path / ".slim.tmp-abc", name="onnx/model.onnx"))
    card = model_card(r, "BertModel")
    assert front_matter(card) == {
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "library_name": "sentence-transformers",
        "tags": ["shrink", "pruned", "heads-a-star", "sentence-transformers", "onnx"],
        "pipeline_tag": "sentence-similarity",
    }
    assert "trust_remote_code" not in card
    assert "AutoModel.from_pretrained(model_dir)" in card and "SentenceTransformer(model_dir)" in card
    assert "pooling `mean`, embeddings normalized, 0 Dense modules, max_seq_length 256" in card
    assert 'ort.InferenceSession(f"{model_dir}/onnx/model.onnx"' in card
    assert '"token_type_ids": enc.get("token_type_ids"' in card and 'session.run(["last_hidden_state"]' in card
    assert "AMD EPYC 7B13 (avx2), 2 CPUs" in card
    assert "| ONNX p50 latency (ms, b=1 s=128, 1 thread) | 80.00 | 40.00 | 2.00x faster |" in card
    assert "apply the pooling (`mean`) and the normalization" in card and 'backend="onnx"' in card
    assert "Why: heads ops only." in card


def test_sentence_transformers_shrink_checkpoint_needs_remote_code():
    st = {"pooling": "cls", "normalize": False, "dense_modules": 1, "max_seq_length": None}
    card = model_card(report(sentence_transformers=st, checkpoint={"kind": "shrink", "why": "uneven FFN"}))
    assert "SentenceTransformer(model_dir, trust_remote_code=True)" in card
    assert "AutoModel.from_pretrained(model_dir, trust_remote_code=True)" in card
    assert "pooling `cls`, embeddings not normalized, 1 Dense module)" in card


@pytest.mark.parametrize("architecture, tag, auto", [
    ("RobertaForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("BertForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("DistilBertForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("MPNetForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
])
def test_task_heads(tmp_path, architecture, tag, auto):
    outputs = ("start_logits", "end_logits") if "Question" in architecture else ("logits",)
    r = report(model="org/my-classifier", onnx=exported(tmp_path, inputs=("input_ids", "attention_mask"), outputs=outputs))
    card = model_card(r, architecture)
    meta = front_matter(card)
    assert meta["pipeline_tag"] == tag and meta["base_model"] == "org/my-classifier" and meta["tags"][-1] == "onnx"
    assert f"{auto}.from_pretrained(model_dir, trust_remote_code=True)" in card
    assert "token_type_ids" not in card  # RoBERTa, DistilBERT, MPNet take none; the export lists the inputs
    assert f"session.run([{', '.join(f'{chr(34)}{o}{chr(34)}' for o in outputs)}]" in card


def test_a_local_source_is_named_by_its_directory(tmp_path):
    source = tmp_path / "my model"
    source.mkdir()
    card = model_card(report(model=str(source), data="train.csv", seed=3, eval_data="25% split of the data",
                             training_examples=50, budget={"seconds": 600.0}))
    assert front_matter(card)["base_model"] == "my model"
    assert "local model directory `my model`" in card and "huggingface.co" not in card
    assert f"shrink prune '{source}' --recipe heads-a-star --data train.csv --eval-fraction 0.25 --max-samples 50 --seed 3 --budget 600s" in card
    assert front_matter(model_card(report(model="./not/here/any-more")))["base_model"] == "any-more"


def test_write_model_card_replaces_the_source_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# all-MiniLM-L6-v2 (the source's own card)\n")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ElectraForSequenceClassification"]}))
    write_model_card(report(), tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "source's own card" not in card and "apache" not in card
    assert front_matter(card)["pipeline_tag"] == "text-classification" and "license" not in front_matter(card)


def test_a_prune_writes_a_card_that_reproduces_it(tmp_path):
    """End to end on a tiny model: README.md beside the checkpoint and model.onnx, its front matter
    parses, and its command with its as-run recipe gives the same weights."""
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()  # the bench uses 128 tokens
    model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(tmp_path / "model"), "--recipe", "heads-a-star", "--data", str(tmp_path / "data.txt"),
                                 "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "model" and meta["pipeline_tag"] == "feature-extraction"
    assert meta["tags"][:3] == ["shrink", "pruned", "heads-a-star"] and "onnx" in meta["tags"]
    assert "`model.onnx`" in card and "ort.InferenceSession" in card
    report_json = json.loads((out / "report.json").read_text())
    assert report_json["onnx"]["bench"]["settings"]["environment"]["cpu"] in card

    recipe = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "as-run.yaml").write_text(recipe)
    assert [s.method for s in load_recipe(str(tmp_path / "as-run.yaml")).steps] == ["heads.a_star", "distill"]
    command = shlex.split(card.split("```bash\n", 1)[1].split("```", 1)[0])
    assert command[:3] == ["shrink", "prune", str(tmp_path / "model")]
    args = command[1:]
    args[args.index("--recipe") + 1] = str(tmp_path / "as-run.yaml")
    args[args.index("-o") + 1] = str(tmp_path / "again")
    # what the report does not record, as the card says
    again = runner.invoke(app, [*args, "--max-length", "32", "--eval-samples", "8", "--no-export"])
    assert again.exit_code == 0, again.output
    a, b = load_model(str(out)), load_model(str(tmp_path / "again"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
