"""The bench result as people read it: a rich table on the terminal and a markdown table for READMEs
and CI summaries. Both are built from the same rows, so they always show the same numbers (the JSON
document is the bench dict itself)."""

from __future__ import annotations

from shrink.console import out
from shrink.measure.thresholds import primary_quality

LATENCY_COLUMNS = ("model", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "seq/s", "speedup")
STATIC_COLUMNS = ("model", "params", "GFLOPs", "size MB", "quality")


def _num(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _gflops(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"  # tiny test models and bert-large alike


def latency_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for model in result["models"]:
        for r in model["results"]:
            rows.append((
                model["name"], model["backend"], str(r["batch"]), str(r["seq"]), _num(r["p50_ms"]),
                _num(r["p90_ms"]), _num(r["p99_ms"]), _num(r["throughput"], 1), f"{r['speedup']:.2f}x",
            ))
    return rows


def static_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for model in result["models"]:
        flops = ", ".join(f"{_gflops(v)} (s={s})" for s, v in model["flops_g"].items())
        primary = primary_quality(model.get("quality"))
        rows.append((
            model["name"], f"{model['params_total'] / 1e6:.2f}M", flops, _num(model["size_mb"]),
            _quality_text(primary, model.get("quality")),
        ))
    return rows


def _quality_text(primary, quality: dict | None) -> str:
    """The primary figure, and for embedding models the neighbour recall beside the cosine."""
    if not primary:
        return ""
    text = f"{primary[0]} {primary[1]:.4f}"
    if quality.get("neighbour_recall") is not None and primary[0] != "neighbour_recall":
        text += f", recall@{quality.get('neighbour_k', 10)} {quality['neighbour_recall']:.4f}"
    return text


REAL_TEXT_COLUMNS = ("model", "inputs", "p50 ms", "p90 ms", "speedup")


def real_text_rows(result: dict) -> list[tuple[str, ...]]:
    """Real-text timing (shrink.measure.bench.real_text): ms per text at own lengths, and the long input."""
    real = result.get("real_text") or {}
    rows = []
    for key, label in (("own_lengths", "real texts, own lengths, b=1"), ("long", "real text, {tokens} tokens, b=1")):
        part = real.get(key)
        for r in (part or {}).get("models", []):
            rows.append((r["model"], label.format(tokens=part.get("tokens")), _num(r["p50_ms"]), _num(r["p90_ms"]), f"{r['speedup']:.2f}x"))
    return rows


def settings_line(result: dict) -> str:
    s = result["settings"]
    env = s.get("environment", {})
    return (
        f"{s['threads']} thread(s), {s['warmup']} warm-up + {s['rounds']} interleaved rounds, "
        f"baseline {s['baseline']}; torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}, "
        f"{env.get('cpu_count')} CPUs ({env.get('cpu', 'CPU unknown')}). Compare the ratios: absolute ms belong to this machine and moment."
    )


def to_markdown(result: dict) -> str:
    def table(columns, rows) -> list[str]:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]

    static = static_rows(result)
    columns = STATIC_COLUMNS if any(row[-1] for row in static) else STATIC_COLUMNS[:-1]
    lines = table(LATENCY_COLUMNS, latency_rows(result)) + [""]
    lines += table(columns, [row[: len(columns)] for row in static]) + [""]
    if real_text_rows(result):
        lines += table(REAL_TEXT_COLUMNS, real_text_rows(result)) + ["", result["real_text"]["inputs"], ""]
    lines += [settings_line(result)]
    return "\n".join(lines) + "\n"


def show(result: dict) -> None:
    from rich.table import Table

    latency = Table(title="latency (ms)", show_edge=False)
    for col in LATENCY_COLUMNS:
        latency.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for row in latency_rows(result):
        latency.add_row(*row)
    out.print(latency)
    static = static_rows(result)
    columns = STATIC_COLUMNS if any(row[-1] for row in static) else STATIC_COLUMNS[:-1]
    figures = Table(title="static figures", show_edge=False)
    for col in columns:
        figures.add_column(col, justify="left" if col == "model" else "right")
    for row in static:
        figures.add_row(*row[: len(columns)])
    out.print(figures)
    if real_text_rows(result):
        real = Table(title="latency on real text (ms per text)", show_edge=False)
        for col in REAL_TEXT_COLUMNS:
            real.add_column(col, justify="left" if col in ("model", "inputs") else "right")
        for row in real_text_rows(result):
            real.add_row(*row)
        out.print(real)
        out.print(result["real_text"]["inputs"], highlight=False)
    out.print(settings_line(result), highlight=False)
