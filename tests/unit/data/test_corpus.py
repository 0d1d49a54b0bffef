"""The bundled calibration corpus: its registers, source blocks and licence note."""

from __future__ import annotations

import gzip
import re
from collections import Counter

from shrink.data import corpus


def test_corpus_covers_several_registers_in_balance():
    texts = corpus.sentences()
    assert len(texts) > 10000
    per_register = Counter()
    for _, register, n in corpus.SOURCES:
        per_register[register] += n
    assert set(per_register) == set(corpus.REGISTERS) and len(per_register) >= 4
    assert min(per_register.values()) >= 0.15 * len(texts)  # no register is a token share


def test_source_blocks_partition_the_file():
    blocks = corpus.sources()
    assert list(blocks) == [name for name, _, _ in corpus.SOURCES]
    assert [t for block in blocks.values() for t in block] == corpus.sentences()
    assert corpus.sentences("austen") == blocks["austen"]


def test_blocks_hold_the_text_they_are_named_for():
    blocks = corpus.sources()

    def share(name, pattern):
        return sum(bool(re.search(pattern, t)) for t in blocks[name]) / len(blocks[name])

    assert share("austen", r"\b(Elizabeth|Emma|Fanny|Anne|Elinor|Marianne|Catherine)\b") > 0.05
    assert share("shakespeare", r"\b(thou|thee|thy|hath|doth)\b") > 0.2
    assert share("factbook", r"\b(economy|government|GDP|independence|country)\b") > 0.2
    assert share("python-docs", r"\b(function|module|object|method|argument)s?\b") > 0.2
    assert share("sqlite-docs", r"\b(SQLite|database|table|column|query)\b") > 0.3


def test_plain_distinct_lines():
    raw = gzip.decompress(corpus.corpus_path().read_bytes()).decode("utf-8")
    lines = raw.splitlines()
    assert raw.endswith("\n") and "\t" not in raw and "\r" not in raw
    assert all(line == line.strip() and line for line in lines)
    assert len(set(lines)) == len(lines)


def test_licence_note_lists_every_source_and_count():
    note = (corpus.corpus_path().parent / "LICENSE-calibration-corpus.txt").read_text(encoding="utf-8")
    for name, register, n in corpus.SOURCES:
        assert re.search(rf"{register}\s+{re.escape(name)}\s+{n:,}\b", note), name
    assert f"total {len(corpus.sentences()):,}" in re.sub(r"\s+", " ", note)


def test_data_names_pick_the_whole_corpus_or_its_fiction_block():
    from shrink.data.examples import read_examples

    assert len(read_examples("bundled")) == len(read_examples(None)) == sum(n for _, _, n in corpus.SOURCES)
    assert read_examples("austen").texts == corpus.sentences("austen")
