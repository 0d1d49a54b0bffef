"""The bundled calibration corpus: 4,800 sentences of Jane Austen's novels (public domain), shipped
gzip-compressed in shrink/data/assets so every recipe runs with no data of the user's.

Source and licence: shrink/data/assets/LICENSE-austen-sentences.txt; rebuilt by scripts/make_corpus.py.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

CORPUS_FILE = Path(__file__).parent / "assets" / "austen-sentences.txt.gz"

# Names that mean "the bundled corpus" wherever a data source is accepted (--data bundled).
NAMES = ("bundled", "austen")


def corpus_path() -> Path:
    return CORPUS_FILE


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def sentences() -> list[str]:
    """All sentences, in file order (800 per novel, in reading order)."""
    return list(_sentences())
