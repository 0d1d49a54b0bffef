"""Calibration and evaluation data: readers, deterministic splits, tokenization and batching.

    read_examples(source, text_column, text_pair_column, label_column) -> Examples
        source: None or "bundled" (the bundled corpus), a .txt/.csv/.tsv/.jsonl file (optionally
        .gz), or a Hugging Face `datasets` name ("name", "name:config", "name@split").
    split_examples(examples, eval_fraction, seed) -> (calibration, evaluation)
    make_batches(tokenizer, examples, ...) -> list of dicts of tensors, length-sorted, padded per batch

Every problem with the data is a BadInputError (exit 2) that says what and where in one line.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from shrink.console import note
from shrink.data import corpus
from shrink.errors import BadInputError

FILE_TYPES = (".txt", ".csv", ".tsv", ".jsonl")


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None = None  # second text of each pair, when the data holds pairs
    labels: list | None = None  # raw labels as read: names, ids or float scores

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> Examples:
        return Examples(
            [self.texts[i] for i in indices],
            [self.pairs[i] for i in indices] if self.pairs is not None else None,
            [self.labels[i] for i in indices] if self.labels is not None else None,
        )


# --- reading ----------------------------------------------------------------------------------


def read_examples(source: str | None, text_column=None, text_pair_column=None, label_column=None) -> Examples:
    if source is None or source in corpus.NAMES:
        if text_pair_column or label_column:
            raise BadInputError("the bundled corpus is plain sentences: it has no pair or label column", hint="pass --data FILE")
        return Examples(corpus.sentences(source or "bundled"))  # "austen": its fiction block only
    path = Path(source).expanduser()
    suffix = _file_type(path)
    if path.is_dir():
        raise BadInputError(f"{source} is a directory, not a data file", hint=f"pass a {'/'.join(FILE_TYPES)} file")
    if path.exists() or suffix:
        if not path.exists():
            raise BadInputError(f"data file {source} does not exist", hint="check the path")
        if not suffix:
            raise BadInputError(f"cannot read {source}: unknown file type", hint=f"use one of {', '.join(FILE_TYPES)} (optionally .gz)")
        text = _decode(path)
        if suffix == ".txt":
            if text_pair_column or label_column:
                raise BadInputError(f"{source} is plain text (one example per line): it has no columns", hint="use CSV or JSONL for pairs and labels")
            return _from_lines(text, source)
        rows = _csv_rows(text, source, "\t" if suffix == ".tsv" else ",") if suffix != ".jsonl" else _jsonl_rows(text, source)
    else:
        rows = _dataset_rows(source)
    return _from_rows(rows, source, text_column, text_pair_column, label_column)


def _file_type(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in FILE_TYPES else None


def _decode(path: Path) -> str:
    """The file as text; non-UTF-8 bytes are an error that names the line (files are never guessed
    into another encoding, which would silently corrupt the text)."""
    try:
        raw = path.read_bytes()
        if path.suffix.lower() == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise BadInputError(f"cannot read {path}: {exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInputError(f"{path} is not UTF-8: bad byte {raw[exc.start]:#04x} on line {line}", hint="re-save the file as UTF-8") from None


def _from_lines(text: str, source: str) -> Examples:
    lines = [line.strip() for line in text.splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise BadInputError(f"{source} is empty: no examples", hint="one example per line")
    return Examples(texts)


def _csv_rows(text: str, source: str, delimiter: str) -> list[dict]:
    # Long fields are fine (tokenization truncates them); the csv module's default limit of 128 KiB
    # per field would refuse a long document. The whole file is in memory already.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader files extra fields under None
                raise BadInputError(f"{source}: line {reader.reader.line_num} has more fields than the header names")
            if any((v or "").strip() for v in row.values()):
                rows.append(row)
    except csv.Error as exc:
        # reader.reader counts the lines read so far, the one with the problem included
        # (DictReader.line_num is only updated after a whole row)
        raise BadInputError(f"{source} is not valid CSV on line {reader.reader.line_num}: {exc}") from None
    if not reader.fieldnames:
        raise BadInputError(f"{source} is empty: no header and no rows", hint="the first line names the columns")
    return rows or [dict.fromkeys(reader.fieldnames)]  # header only: keep the column names for messages


def _jsonl_rows(text: str, source: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{source}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise BadInputError(f"{source}: line {number} is not a JSON object", hint='one {"text": ...} object per line')
        rows.append(row)
    return rows


def _dataset_rows(name: str) -> list[dict]:
    """Rows of a Hugging Face dataset: "name", "name:config", with "@split" (default: train)."""
    try:
        import datasets
    except ImportError:
        raise BadInputError(
            f"{name} is neither a data file nor a bundled corpus, and `datasets` is not installed to load it from the Hub",
            hint="pass a .txt/.csv/.tsv/.jsonl file, or pip install 'shrink[datasets]'",
        ) from None
    name, _, split = name.partition("@")
    name, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, unknown split: datasets raises many types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BadInputError(f"could not load dataset {name!r}: {reason}", hint="check the name, or your network (HF_DATASETS_OFFLINE)") from None
    return [dict(row) for row in data]


# --- columns ----------------------------------------------------------------------------------


def _from_rows(rows: list[dict], source: str, text_column, text_pair_column, label_column) -> Examples:
    columns = list(rows[0]) if rows else []
    real_rows = [row for row in rows if any(v not in (None, "") for v in row.values())]
    if not real_rows:
        raise BadInputError(f"{source} is empty: no examples")
    text_column = _column(columns, text_column, source, "--text-column") if text_column else _default_text_column(real_rows, columns, source)
    pair_column = _column(columns, text_pair_column, source, "--text-pair-column") if text_pair_column else None
    label_column = _column(columns, label_column, source, "--label-column") if label_column else None

    texts = [_text(row, text_column, source, i) for i, row in enumerate(real_rows)]
    pairs = [_text(row, pair_column, source, i) for i, row in enumerate(real_rows)] if pair_column else None
    labels = [_label(row, label_column, source, i) for i, row in enumerate(real_rows)] if label_column else None
    return Examples(texts, pairs, labels)


def _column(columns: list[str], wanted: str, source: str, option: str) -> str:
    if wanted in columns:
        return wanted
    close = difflib.get_close_matches(wanted, columns, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"pass {option} with one of them"
    raise BadInputError(f"{source} has no column {wanted!r}; available: {', '.join(columns)}", hint=hint)


def _default_text_column(rows: list[dict], columns: list[str], source: str) -> str:
    """The column named `text`, else the only column holding non-numeric strings."""
    if "text" in columns:
        return "text"
    textual = [c for c in columns if any(isinstance(r.get(c), str) and r[c].strip() and _number(r[c]) is None for r in rows)]
    if len(textual) == 1:
        return textual[0]
    raise BadInputError(
        f"{source}: cannot tell which column holds the text; available: {', '.join(columns)}",
        hint="pass --text-column NAME",
    )


def _text(row: dict, column: str, source: str, index: int) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"{source}: example {index + 1} has no text in column {column!r}")
    return value.strip()


def _label(row: dict, column: str, source: str, index: int):
    value = row.get(column)
    if isinstance(value, str):
        value = value.strip()
        number = _number(value)
        value = number if number is not None else value
    if value is None or value == "" or isinstance(value, (list, dict)):
        raise BadInputError(f"{source}: example {index + 1} has no usable label in column {column!r}")
    return value


def _number(value: str):
    """An int or float when the string is one, else None."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return None


# --- splitting --------------------------------------------------------------------------------


def split_examples(ex: Examples, eval_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(calibration, evaluation), disjoint and the same for the same seed, so a method never scores
    on the examples a report evaluates on. Both keep the original order."""
    if not 0 <= eval_fraction < 1:
        raise BadInputError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n = len(ex)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)  # never an empty side when a split was asked for
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = sorted(order[:n_eval])
    calibration = sorted(order[n_eval:])
    return ex.subset(calibration), ex.subset(held_out)


# --- labels -----------------------------------------------------------------------------------


def label_map(model_or_config) -> dict:
    """{"label2id": {...}, "num_labels": n, "regression": bool} from a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    num_labels = int(getattr(config, "num_labels", len(label2id)) or len(label2id))
    regression = getattr(config, "problem_type", None) == "regression" or num_labels == 1
    return {"label2id": label2id, "num_labels": num_labels, "regression": regression}


def label_ids(labels: list, mapping: dict | None) -> list:
    """Raw labels -> class ids (or float scores for regression). Names and ids are both accepted;
    a label the model does not know is an error listing the ones it does."""
    if mapping is None:  # no model to check against: numbers pass through (scores for Spearman)
        bad = [v for v in labels if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            raise BadInputError(f"label {bad[0]!r} is not a number and there is no label map to translate it")
        return labels
    if not isinstance(mapping, dict):  # a model or a config
        mapping = label_map(mapping)
    elif "label2id" not in mapping:  # a bare label2id dict
        mapping = {"label2id": {str(k): int(v) for k, v in mapping.items()}, "num_labels": len(mapping), "regression": False}
    if mapping["regression"]:
        try:
            return [float(v) for v in labels]
        except (TypeError, ValueError):
            raise BadInputError("the model is a regression model but the labels are not all numbers") from None
    label2id, n = mapping["label2id"], mapping["num_labels"]
    ids = []
    for i, value in enumerate(labels):
        if str(value) in label2id:
            ids.append(label2id[str(value)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() and 0 <= value < n:
            ids.append(int(value))
        else:
            known = ", ".join(f"{name}={idx}" for name, idx in sorted(label2id.items(), key=lambda kv: kv[1]))
            raise BadInputError(
                f"example {i + 1} has label {value!r}, which the model does not know (it has {n} labels: {known})",
                hint="use the model's label names or ids 0..num_labels-1",
            )
    return ids


# --- tokenization and batching ----------------------------------------------------------------


def make_batches(tokenizer, ex: Examples, *, max_length=128, batch_size=16, max_samples=None, label_ids=None, seed=0, pair_encoding="cross",
                 teacher_tokenizer=None) -> list[dict]:
    """Length-sorted batches with dynamic padding (each batch padded to its own longest example).

    max_samples: a seeded random subset (all examples when there are fewer, with a warning).
    label_ids: a model, config, or label2id dict to map labels with; None keeps numeric labels.
    pair_encoding: "cross" encodes (text, pair) as one sequence (cross-encoders, classifiers);
        "separate" encodes the pair texts on their own under batch["pair"] (bi-encoders).
    teacher_tokenizer: another tokenizer (the original, after vocabulary pruning): each batch also
        holds the same rows in its tokenization under batch["teacher"] (what the teacher is fed).
    """
    import torch

    if len(ex) == 0:
        raise BadInputError("no examples to batch", hint="the data (or its calibration/eval split) is empty")
    indices = list(range(len(ex)))
    if max_samples is not None and max_samples < len(ex):
        indices = sorted(random.Random(seed).sample(indices, max_samples))
    elif max_samples is not None and max_samples > len(ex):
        note(f"[yellow]warning:[/yellow] {max_samples} samples requested but only {len(ex)} exist; using {len(ex)}")
    ex = ex.subset(indices)
    labels = label_ids_of(ex.labels, label_ids)
    cross = ex.pairs is not None and pair_encoding == "cross"
    if pair_encoding not in ("cross", "separate"):
        raise ValueError(f"pair_encoding must be 'cross' or 'separate', not {pair_encoding!r}")

    encoded = tokenizer(ex.texts, ex.pairs if cross else None, truncation=True, max_length=max_length)
    pair_encoded = tokenizer(ex.pairs, truncation=True, max_length=max_length) if ex.pairs is not None and not cross else None
    lengths = [len(ids) + (len(pair_encoded["input_ids"][i]) if pair_encoded else 0) for i, ids in enumerate(encoded["input_ids"])]
    order = sorted(range(len(ex)), key=lambda i: (lengths[i], i))  # stable: ties keep file order
    teacher = None
    if teacher_tokenizer is not None:
        teacher = (teacher_tokenizer(ex.texts, ex.pairs if cross else None, truncation=True, max_length=max_length),
                   teacher_tokenizer(ex.pairs, truncation=True, max_length=max_length) if pair_encoded is not None else None)

    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _pad(tokenizer, encoded, rows)
        if pair_encoded is not None:
            batch["pair"] = _pad(tokenizer, pair_encoded, rows)
        if teacher is not None:
            batch["teacher"] = _pad(teacher_tokenizer, teacher[0], rows)
            if teacher[1] is not None:
                batch["teacher"]["pair"] = _pad(teacher_tokenizer, teacher[1], rows)
        if labels is not None:
            values = [labels[i] for i in rows]
            dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.long
            batch["labels"] = torch.tensor(values, dtype=dtype)
        batches.append(batch)
    return batches


def label_ids_of(labels, mapping):
    return None if labels is None else label_ids(labels, mapping)


def _pad(tokenizer, encoded, rows: list[int]) -> dict:
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in rows]
    return dict(tokenizer.pad(features, return_tensors="pt"))
