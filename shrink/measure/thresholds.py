"""CI thresholds: the one checker behind `shrink prune` and `shrink bench` (`--max-quality-drop`,
`--min-speedup`, `--max-latency-ratio`, `--max-size-mb`). Each check returns one line per miss; the
commands raise ThresholdFailedError (exit 1) after everything is written.

The quality figure compared is the primary one: accuracy with labels, else Spearman with gold
pairs, else the fidelity to the original (embedding cosine, or top-1 agreement of a task head);
`--quality-metric NAME` picks another (e.g. neighbour_recall, what a search index keeps).
"""

from __future__ import annotations

from shrink.errors import ThresholdFailedError

PRIMARY_QUALITY = ("accuracy", "spearman", "embedding_cosine", "top1_agreement")
# every figure --quality-metric may name: higher is better for all of them
QUALITY_METRICS = ("accuracy", "macro_f1", "spearman", "embedding_cosine", "neighbour_recall", "top1_agreement")


def check_quality_metric(metric: str | None) -> None:
    """Bad input (exit 2) for a --quality-metric that no evaluation produces."""
    if metric is not None and metric not in QUALITY_METRICS:
        from shrink.errors import BadInputError

        raise BadInputError(f"--quality-metric {metric!r} is not a quality figure", hint=f"choose from {', '.join(QUALITY_METRICS)}")


def primary_quality(quality: dict | None, metric: str | None = None) -> tuple[str, float] | None:
    """(name, value) of the one number --max-quality-drop compares (`metric`, else the primary), or None."""
    for key in (metric,) if metric else PRIMARY_QUALITY:
        if quality and quality.get(key) is not None:
            return key, float(quality[key])
    return None


def quality_drop(reference: dict | None, measured: dict | None, max_drop: float, name: str = "", metric: str | None = None) -> list[str]:
    """A miss when the quality figure fell by more than max_drop (or the figures cannot be compared)."""
    prefix = f"{name}: " if name else ""
    before, after = primary_quality(reference, metric), primary_quality(measured, metric)
    if before is None or after is None or before[0] != after[0]:
        if metric:
            return [f"{prefix}{metric} was not measured (it needs data it applies to, e.g. neighbour_recall an embedding model)"]
        return [f"{prefix}no comparable quality figure (pass --data)"]
    drop = before[1] - after[1]
    if drop > max_drop:
        return [f"{prefix}{after[0]} dropped by {drop:.4f} (> {max_drop}) from {before[1]:.4f}"]
    return []


def bench_failures(result: dict, *, max_latency_ratio=None, min_speedup=None, max_size_mb=None, max_quality_drop=None, quality_metric=None) -> list[str]:
    """Misses of a shrink bench result. Thresholds judge the compared models (all but the baseline;
    the baseline itself when it is the only model), in every (batch, seq) cell."""
    models = result["models"]
    baseline, candidates = models[0], (models[1:] or models[:1])
    failures = []
    for model in candidates:
        for row in model["results"]:
            cell = f"batch {row['batch']}, seq {row['seq']}"
            if max_latency_ratio is not None and row["latency_ratio"] > max_latency_ratio:
                failures.append(f"{model['name']}: latency ratio {row['latency_ratio']:.3f} > {max_latency_ratio} ({cell})")
            if min_speedup is not None and row["speedup"] < min_speedup:
                failures.append(f"{model['name']}: speedup {row['speedup']:.2f}x < {min_speedup}x ({cell})")
        if max_size_mb is not None and model["size_mb"] is not None and model["size_mb"] > max_size_mb:
            failures.append(f"{model['name']}: size {model['size_mb']:.3f} MB > {max_size_mb} MB")
        if max_quality_drop is not None:
            failures += quality_drop(baseline.get("quality"), model.get("quality"), max_quality_drop, model["name"], quality_metric)
    return failures


def prune_speedup(report: dict) -> float | None:
    """The slim model's measured ONNX speedup in a prune report (None without an export)."""
    try:
        return float(report["onnx"]["bench"]["models"][1]["results"][0]["speedup"])
    except (KeyError, IndexError, TypeError):
        return None


def prune_failures(report: dict, *, max_quality_drop=None, min_speedup=None, quality_metric=None) -> list[str]:
    """Misses of a shrink prune report: quality on the held-out split, before vs after."""
    failures = []
    if max_quality_drop is not None:
        failures += quality_drop(report["quality"]["before"], report["quality"]["after"], max_quality_drop, metric=quality_metric)
    if min_speedup is not None:
        measured = prune_speedup(report)
        if measured is None:
            failures.append("no speedup was measured (did you pass --no-export?)")
        elif measured < min_speedup:
            failures.append(f"speedup {measured:.2f}x is below {min_speedup}x")
    return failures


def raise_on_failures(failures: list[str], outputs: str | None = None) -> None:
    """ThresholdFailedError (exit 1) naming every miss (and where the outputs were written)."""
    if failures:
        written = f" (outputs written to {outputs})" if outputs else ""
        raise ThresholdFailedError("threshold failed: " + "; ".join(failures) + written)
