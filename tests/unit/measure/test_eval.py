"""Metrics, evaluate() on torch and ONNX, and `shrink eval` from the command line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from shrink.cli import app
from shrink.data.examples import Examples, make_batches
from shrink.measure.evaluate import evaluate, macro_f1, spearman
from shrink.surgery import prune_heads

from helpers import sharp, tiny_model, tiny_tokenizer

runner = CliRunner()
LABELS = {0: "neg", 1: "pos", 2: "neutral"}
TEXTS = ["a good film", "bad", "it was fine", "great acting", "dull and long", "so so", "loved it", "hated it", "meh", "superb cast"]


def classifier():
    model = sharp(tiny_model("bert", "seq"))
    model.config.id2label, model.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    model.config.architectures = ["BertForSequenceClassification"]
    return model


def save(model, directory):
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def export_onnx(model, path, output: str):
    """A plain torch export (shrink.measure.export has its own tests; this only needs a faithful graph)."""
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones(2, 7, dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}


    class Named(torch.nn.Module):  # HF forward signatures differ in argument order; name them
        def __init__(self):
            super().__init__()
            self.model = model.eval()

        def forward(self, input_ids, attention_mask, token_type_ids):
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids), output)

    torch.onnx.export(
        Named(), example, str(path), dynamo=False, opset_version=17,
        input_names=names, output_names=[output], dynamic_axes={**axes, output: {0: "batch"}},
    )
    return str(path)


# --- metrics ----------------------------------------------------------------------------------


def test_spearman_with_ties_matches_the_definition():
    a, b = [1, 2, 2, 3, 5], [10, 20, 30, 30, 40]
    # ranks with ties averaged: a -> 0, 1.5, 1.5, 3, 4 ; b -> 0, 1, 2.5, 2.5, 4
    expected = np.corrcoef([0, 1.5, 1.5, 3, 4], [0, 1, 2.5, 2.5, 4])[0, 1]
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_macro_f1_by_hand():
    predictions, labels = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1])
    # class 0: tp1 fp1 fn0 -> 2/3 ; class 1: tp1 fp0 fn2 -> 1/2 ; class 2: tp0 fp1 -> 0
    assert macro_f1(predictions, labels) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


# --- evaluate ---------------------------------------------------------------------------------


def labeled_batches(model, labels):
    return make_batches(tiny_tokenizer(), Examples(TEXTS, labels=labels), batch_size=4, label_ids=model)


def test_classification_metrics_and_fidelity():
    model = classifier()
    labels = [LABELS[i % 3] for i in range(len(TEXTS))]
    batches = labeled_batches(model, labels)
    result = evaluate(model, batches, teacher=model, progress=False)
    with torch.no_grad():
        predictions = torch.cat([model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.argmax(-1) for b in batches])
    gold = torch.cat([b["labels"] for b in batches])
    assert result["samples"] == 10
    assert result["accuracy"] == pytest.approx((predictions == gold).float().mean().item())
    assert result["top1_agreement"] == 1.0 and result["logits_kl"] == pytest.approx(0, abs=1e-6)
    student = copy.deepcopy(model)
    prune_heads(student, {0: [0], 1: [0], 2: [0]})
    against = evaluate(student, batches, teacher=model, progress=False)
    assert against["logits_kl"] > 1e-4 and "embedding_cosine" not in against


def test_neighbour_recall_counts_the_teachers_neighbours_kept():
    from shrink.measure.evaluate import neighbour_recall

    torch.manual_seed(0)
    teacher = torch.randn(200, 16)
    assert neighbour_recall(teacher, teacher) == 1.0
    assert neighbour_recall(3 * teacher, teacher) == 1.0  # cosine neighbours: scale does not matter
    assert neighbour_recall(torch.randn(200, 16), teacher) < 0.15  # chance is 10 / 199
    # by hand: 4 points on a line, k=1; the student swaps which of 1 and 2 is nearest to 0 (only)
    t = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    nearest = lambda x: [max((j for j in range(4) if j != i), key=lambda j: float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0))) for i in range(4)]  # noqa: E731
    expected = sum(a == b for a, b in zip(nearest(s), nearest(t))) / 4
    assert neighbour_recall(s, t, k=1) == expected < 1


def test_embedding_model_pairs_give_spearman_and_cosine():
    model = sharp(tiny_model("bert"))
    ex = Examples(["the cat sat", "a dog ran", "cats sit", "rain falls"], pairs=["a cat sat", "the sea", "dogs run", "it rains"], labels=[4.0, 1.0, 2.5, 3.0])
    result = evaluate(model, examples=ex, tokenizer=tiny_tokenizer(), teacher=model, progress=False)
    assert result["output"] == "embedding" and result["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    from shrink.train.objectives import mean_pool

    tok = tiny_tokenizer()
    with torch.no_grad():
        a, b = (tok(x, return_tensors="pt", padding=True) for x in (ex.texts, ex.pairs))
        cos = torch.cosine_similarity(mean_pool(model(**a).last_hidden_state, a["attention_mask"]), mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    assert result["spearman"] == pytest.approx(spearman(cos.numpy(), ex.labels))


@pytest.mark.parametrize("task", ["seq", "base"])
def test_torch_and_onnx_agree(tmp_path, task):
    model = classifier() if task == "seq" else sharp(tiny_model("bert"))
    path = export_onnx(model, tmp_path / "model.onnx", "logits" if task == "seq" else "last_hidden_state")
    labels = [i % 3 for i in range(len(TEXTS))] if task == "seq" else None
    batches = make_batches(tiny_tokenizer(), Examples(TEXTS, labels=labels), batch_size=4)
    student = copy.deepcopy(model)
    prune_heads(student, {0: [1, 2], 2: [3]})
    on_torch = evaluate(model, batches, teacher=student, progress=False)
    on_onnx = evaluate(path, batches, teacher=student, progress=False)
    assert on_torch.keys() == on_onnx.keys()
    for key, value in on_torch.items():
        assert on_onnx[key] == pytest.approx(value, abs=1e-4), key
    assert on_torch.get("accuracy") is not None if task == "seq" else on_torch["embedding_cosine"] < 0.9999


# --- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    clf = save(classifier(), root / "clf")
    base = save(sharp(tiny_model("bert")), root / "base")
    tok_model = tiny_model("bert", "tok")
    tok_model.config.architectures = ["BertForTokenClassification"]
    tagger = save(tok_model, root / "tagger")
    data = root / "labeled.csv"
    data.write_text("text,label\n" + "".join(f'"{t}",{LABELS[i % 3] if i % 2 else i % 3}\n' for i, t in enumerate(TEXTS)))
    pairs = root / "pairs.tsv"
    pairs.write_text("a\tb\tscore\nthe cat\ta cat\t4.5\nthe cat\tthe sea\t0.5\nrain\tit rains\t3.0\n")
    return {"clf": clf, "base": base, "tagger": tagger, "data": str(data), "pairs": str(pairs), "root": root}


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_cli_classifier_with_labeled_csv(dirs):
    result = invoke(dirs["clf"], "--data", dirs["data"], "--label-column", "label", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["samples"] == 10 and 0 <= document["accuracy"] <= 1 and "macro_f1" in document
    table = invoke(dirs["clf"], "--data", dirs["data"], "--label-column", "label", "--teacher", dirs["clf"])
    assert table.exit_code == 0 and "accuracy" in table.stdout and "top-1 agreement with teacher" in table.stdout


def test_cli_pairs_on_embedding_model(dirs):
    result = invoke(dirs["base"], "--data", dirs["pairs"], "--text-column", "a", "--text-pair-column", "b", "--label-column", "score", "--json")
    assert result.exit_code == 0, result.output
    assert -1 <= json.loads(result.stdout)["spearman"] <= 1


def test_cli_onnx_file_uses_the_tokenizer_beside_it(dirs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(dirs["clf"])
    onnx_dir = tmp_path / "exported"
    save(model, onnx_dir)
    path = export_onnx(model, onnx_dir / "model.onnx", "logits")
    on_onnx = invoke(path, "--data", dirs["data"], "--label-column", "label", "--json")
    on_torch = invoke(dirs["clf"], "--data", dirs["data"], "--label-column", "label", "--json")
    assert on_onnx.exit_code == 0, on_onnx.output
    assert json.loads(on_onnx.stdout)["accuracy"] == json.loads(on_torch.stdout)["accuracy"]


def test_cli_slim_checkpoint_defaults_to_its_source_as_teacher(dirs, tmp_path):
    from shrink.models.hub import load_model
    from shrink.models.slim import save_slim

    model = load_model(dirs["base"])
    prune_heads(model, {0: [0, 1], 1: [2]})
    slim = save_slim(model, tmp_path / "slim", tiny_tokenizer(), extra_manifest={"source": dirs["base"]})
    result = invoke(slim, "--data", dirs["data"], "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["teacher"] == dirs["base"] and 0 < document["embedding_cosine"] < 0.9999
    assert 0 <= document["neighbour_recall"] <= 1 and document["neighbour_k"] == min(10, document["samples"] - 1)


def test_cli_too_many_samples_warns_and_uses_what_exists(dirs):
    result = invoke(dirs["clf"], "--data", dirs["data"], "--label-column", "label", "--samples", "50", "--json")
    assert result.exit_code == 0
    assert "50 samples requested but only 10 exist" in result.stderr
    assert json.loads(result.stdout)["samples"] == 10


def test_cli_eval_fraction_uses_the_held_out_split(dirs):
    result = invoke(dirs["clf"], "--data", dirs["data"], "--label-column", "label", "--eval-fraction", "0.3", "--json")
    assert json.loads(result.stdout)["samples"] == 3


@pytest.mark.parametrize(
    "model, file, content, options, message",
    [
        ("clf", "empty.csv", "text,label\n", [], "is empty"),
        ("clf", "empty.txt", "", [], "is empty"),
        ("clf", "cols.csv", "text,label\nhi,pos\n", ["--label-column", "lable"], "no column 'lable'; available: text, label"),
        ("clf", "latin1.txt", b"ok\nna\xefve\n", [], "bad byte 0xef on line 2"),
        ("clf", "unknown.csv", "text,label\nhi,pos\nho,great\n", ["--label-column", "label"], "label 'great', which the model does not know"),
        ("clf", "ids.csv", "text,label\nhi,7\n", ["--label-column", "label"], "label 7"),
        ("tagger", "pairs.csv", "text,other\nhi,there\n", ["--text-pair-column", "other"], "does not take sentence pairs"),
        ("base", "labels.csv", "text,label\nhi,pos\n", ["--label-column", "label"], "embedding model with no classification head"),
        ("clf", "missing.csv", None, [], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(dirs, tmp_path, model, file, content, options, message):
    path = tmp_path / file
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = invoke(dirs[model], "--data", path, *options)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
