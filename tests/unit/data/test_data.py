"""Data readers, the bundled corpus, deterministic splits, label mapping and batching."""

from __future__ import annotations

import gzip
import re
import string

import pytest
import torch

from shrink.data.examples import (
    Examples,
    label_ids,
    make_batches,
    read_examples,
    split_examples,
)
from shrink.errors import BadInputError

from helpers import tiny_model, tiny_tokenizer


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


# --- readers ----------------------------------------------------------------------------------


def test_bundled_corpus_is_clean_prose():
    ex = read_examples(None)
    assert ex.pairs is None and ex.labels is None
    assert 15000 <= len(ex) <= 25000
    assert all(6 <= len(t.split()) <= 60 for t in ex.texts)
    assert not any(re.match(r"(chapter|volume)\s+[ivxlc\d]+\b", t, re.IGNORECASE) for t in ex.texts)  # no headings
    assert read_examples("bundled").texts == ex.texts


def test_txt_one_example_per_line_blank_lines_skipped(tmp_path):
    ex = read_examples(write(tmp_path, "a.txt", "first line\n\n  second line  \n"))
    assert ex.texts == ["first line", "second line"]


def test_gzipped_text(tmp_path):
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress("one\ntwo\n".encode()))
    assert read_examples(str(path)).texts == ["one", "two"]


def test_csv_default_text_column_and_labels(tmp_path):
    path = write(tmp_path, "d.csv", "id,text,label\n1,good film,pos\n2,\"bad, very bad\",neg\n3,fine,2\n")
    ex = read_examples(path, label_column="label")
    assert ex.texts == ["good film", "bad, very bad", "fine"]
    assert ex.labels == ["pos", "neg", 2]  # numbers become numbers, names stay names


def test_csv_only_string_column_is_the_text(tmp_path):
    path = write(tmp_path, "d.csv", "score,sentence\n0.5,hello there\n1.5,general kenobi\n")
    assert read_examples(path).texts == ["hello there", "general kenobi"]


def test_tsv_with_pairs_and_scores(tmp_path):
    path = write(tmp_path, "d.tsv", "a\tb\tscore\nthe cat\ta cat\t4.5\nthe cat\tthe sea\t0.5\n")
    ex = read_examples(path, text_column="a", text_pair_column="b", label_column="score")
    assert ex.texts == ["the cat", "the cat"] and ex.pairs == ["a cat", "the sea"] and ex.labels == [4.5, 0.5]


def test_jsonl(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "x y", "label": 1}\n\n{"text": "z", "label": 0}\n')
    ex = read_examples(path, label_column="label")
    assert ex.texts == ["x y", "z"] and ex.labels == [1, 0]


@pytest.mark.parametrize(
    "name, content, kwargs, message",
    [
        ("e.txt", "\n  \n", {}, "is empty"),
        ("e.csv", "text,label\n", {}, "is empty"),
        ("e.csv", "", {}, "is empty"),
        ("e.jsonl", "", {}, "is empty"),
        ("m.csv", "text,label\nhi,1\n", {"label_column": "lable"}, "no column 'lable'; available: text, label"),
        ("m.jsonl", '{"sentence": "hi"}\n', {"text_column": "text"}, "available: sentence"),
        ("a.csv", "a,b\nhi,there\n", {}, "cannot tell which column holds the text; available: a, b"),
        ("j.jsonl", '{"text": "a"}\nnot json\n', {}, "line 2 is not valid JSON"),
        ("x.csv", "text\nhi,extra\n", {}, "line 2 has more fields"),
        ("l.csv", "text,label\nhi,\n", {"label_column": "label"}, "example 1 has no usable label"),
        ("t.txt", "hi\n", {"label_column": "label"}, "has no columns"),
    ],
)
def test_bad_files(tmp_path, name, content, kwargs, message):
    with pytest.raises(BadInputError) as info:
        read_examples(write(tmp_path, name, content), **kwargs)
    assert message in info.value.one_line()


def test_misspelled_column_suggests_the_right_one(tmp_path):
    with pytest.raises(BadInputError) as info:
        read_examples(write(tmp_path, "m.csv", "text,label\nhi,1\n"), label_column="lable")
    assert "did you mean 'label'" in info.value.one_line()


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "bad.txt", b"fine\nalso fine\ncaf\xe9 au lait\n")
    with pytest.raises(BadInputError, match="not UTF-8: bad byte 0xe9 on line 3"):
        read_examples(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_examples(str(tmp_path / "nope.csv"))
    with pytest.raises(BadInputError, match="unknown file type"):
        read_examples(write(tmp_path, "data.parquet", "x"))


def test_dataset_name_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(BadInputError, match="datasets"):
            read_examples("glue:sst2")
    else:
        pytest.skip("datasets is installed; the offline path would need the network")


def test_dataset_name_is_parsed_and_loaded_through_datasets(monkeypatch):
    """The Hub path with a stand-in `datasets` module: name, config and split reach load_dataset, rows
    become examples, and a failing load (offline, unknown name) is one clear line."""
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "offline":
            raise ConnectionError("Couldn't reach the Hub\nlong traceback text")
        return [{"sentence": "a fine film", "label": 1}, {"sentence": "dull", "label": 0}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = read_examples("glue:sst2@validation", label_column="label")
    assert calls == [("glue", "sst2", "validation")]
    assert examples.texts == ["a fine film", "dull"] and examples.labels == [1, 0]
    read_examples("imdb")
    assert calls[-1] == ("imdb", None, "train")
    with pytest.raises(BadInputError, match="could not load dataset 'offline': Couldn't reach the Hub$"):
        read_examples("offline")


# --- splits -----------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_complete():
    ex = Examples([f"sentence {i}" for i in range(100)], labels=list(range(100)))
    cal, held = split_examples(ex, 0.2, seed=3)
    assert len(held) == 20 and len(cal) == 80
    assert set(cal.texts).isdisjoint(held.texts) and set(cal.texts) | set(held.texts) == set(ex.texts)
    assert [int(t.split()[1]) for t in held.texts] == held.labels  # labels travel with their texts
    again, other = split_examples(ex, 0.2, seed=3)[1], split_examples(ex, 0.2, seed=4)[1]
    assert again.texts == held.texts and other.texts != held.texts


def test_split_edges():
    ex = Examples(["a", "b", "c"])
    assert len(split_examples(ex, 0.0, 0)[1]) == 0
    assert len(split_examples(ex, 0.01, 0)[1]) == 1  # asked for a split: never empty
    with pytest.raises(BadInputError):
        split_examples(ex, 1.0, 0)


# --- labels -----------------------------------------------------------------------------------


def classifier():
    model = tiny_model("bert", "seq")
    model.config.id2label = {0: "neg", 1: "pos", 2: "neutral"}
    model.config.label2id = {"neg": 0, "pos": 1, "neutral": 2}
    return model


def test_labels_accept_names_and_ids():
    assert label_ids(["pos", 0, "neutral", 2], classifier()) == [1, 0, 2, 2]


def test_unknown_label_lists_the_known_ones():
    with pytest.raises(BadInputError, match=r"label 'great'.*3 labels: neg=0, pos=1, neutral=2"):
        label_ids(["pos", "great"], classifier())
    with pytest.raises(BadInputError, match="label 3"):
        label_ids([3], classifier())


def test_regression_labels_are_floats():
    model = tiny_model("bert", "seq", num_labels=1)
    assert label_ids([1, 2.5], model) == [1.0, 2.5]


# --- batching ---------------------------------------------------------------------------------


def test_batches_are_length_sorted_and_padded_per_batch():
    texts = ["a " * n for n in (9, 1, 5, 3, 7, 2)]
    batches = make_batches(tiny_tokenizer(), Examples(texts), batch_size=2)
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths) and widths[0] < widths[-1]  # dynamic padding, not one width
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert (b["attention_mask"].sum(dim=1).max() == b["input_ids"].shape[1]).item()


def test_max_length_truncates():
    batches = make_batches(tiny_tokenizer(), Examples(["abcdefghij" * 5]), max_length=12)
    assert batches[0]["input_ids"].shape == (1, 12)


def test_sample_cap_is_seeded_and_too_many_warns(capsys):
    ex = Examples([f"text {c}" for c in string.ascii_lowercase])
    tok = tiny_tokenizer()
    a = make_batches(tok, ex, max_samples=5, seed=1)
    b = make_batches(tok, ex, max_samples=5, seed=1)
    c = make_batches(tok, ex, max_samples=5, seed=2)
    assert sum(len(x["input_ids"]) for x in a) == 5
    assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    everything = make_batches(tok, ex, max_samples=100)
    assert sum(len(x["input_ids"]) for x in everything) == 26
    assert "100 samples requested but only 26 exist" in capsys.readouterr().err


def test_labels_in_batches_follow_their_texts():
    ex = Examples(["aaaaaaaa", "b", "cccc"], labels=["pos", "neg", "neutral"])
    (batch,) = make_batches(tiny_tokenizer(), ex, label_ids=classifier())
    assert batch["labels"].tolist() == [0, 2, 1]  # sorted by length: b, cccc, aaaaaaaa
    with pytest.raises(BadInputError, match="not a number"):
        make_batches(tiny_tokenizer(), ex)  # names need the model's label map


def test_pairs_cross_and_separate():
    ex = Examples(["the cat", "a dog"], pairs=["sat down", "ran"], labels=[0.9, 0.1])
    (cross,) = make_batches(tiny_tokenizer(), ex)
    assert cross["token_type_ids"].max() == 1 and "pair" not in cross
    assert cross["labels"].dtype == torch.float32
    (separate,) = make_batches(tiny_tokenizer(), ex, pair_encoding="separate")
    assert separate["token_type_ids"].max() == 0 and set(separate["pair"]) >= {"input_ids", "attention_mask"}
