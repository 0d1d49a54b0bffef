"""The bundled calibration corpus: 19,069 English sentences or short passages in four registers
(fiction, dialogue, reference, technical), all public domain or permissively licensed, shipped
gzip-compressed in shrink/data/assets so every recipe runs with no data of the user's. It is a
general-purpose fallback: a user's own unlabeled text (--data FILE) calibrates better.

The file holds one text per line, in source blocks of the order and sizes in SOURCES. Sources,
licences and counts: shrink/data/assets/LICENSE-calibration-corpus.txt; rebuilt by scripts/make_corpus.py.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

CORPUS_FILE = Path(__file__).parent / "assets" / "calibration-corpus.txt.gz"

# (source, register, texts) in file order; scripts/make_corpus.py prints the sizes after a rebuild.
SOURCES = (
    ("austen", "fiction", 4799),  # Jane Austen's six novels
    ("shakespeare", "dialogue", 4070),  # speeches from 37 plays
    ("chatterbot", "dialogue", 600),  # chat turns (chatterbot-corpus)
    ("factbook", "reference", 3300),  # CIA World Factbook backgrounds and economy overviews
    ("jargon", "reference", 1500),  # the Jargon File
    ("python-docs", "technical", 3600),  # the Python 3.11 documentation
    ("sqlite-docs", "technical", 1200),  # the SQLite documentation
)
REGISTERS = ("fiction", "dialogue", "reference", "technical")

# Names that mean the bundled corpus wherever a data source is accepted (--data bundled);
# sentences("austen") is its fiction block, the Austen-only corpus of earlier versions.
NAMES = ("bundled", "austen")


def corpus_path() -> Path:
    return CORPUS_FILE


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        texts = tuple(line.strip() for line in f if line.strip())
    if len(texts) != sum(n for _, _, n in SOURCES):  # a rebuilt file whose sizes SOURCES lacks
        raise RuntimeError(f"{CORPUS_FILE.name} has {len(texts)} texts but SOURCES describes {sum(n for _, _, n in SOURCES)}")
    return texts


def sources() -> dict[str, list[str]]:
    """Each source's texts, in file order."""
    texts, blocks, start = _sentences(), {}, 0
    for name, _, n in SOURCES:
        blocks[name] = list(texts[start : start + n])
        start += n
    return blocks


def sentences(name: str = "bundled") -> list[str]:
    """All texts in file order ("bundled"), or one source's block (e.g. "austen")."""
    if name == "bundled":
        return list(_sentences())
    return sources()[name]
