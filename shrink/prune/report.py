"""The prune report: report.json (everything), report.md and the terminal table (the headline)."""

from __future__ import annotations

import json
from pathlib import Path

from shrink.console import out
from shrink.train.loop import format_duration


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def headline_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(figure, before, after, change) rows shared by the terminal table and report.md."""
    before, after = report["before"], report["after"]
    rows = [
        ("parameters", _fmt_params(before["params_total"]), _fmt_params(after["params_total"]),
         f"{after['params_total'] / before['params_total']:.2f}x"),
        ("GFLOPs (b=1, s=128, analytic)", f"{before['gflops_s128']:.2f}", f"{after['gflops_s128']:.2f}",
         f"{after['gflops_s128'] / before['gflops_s128']:.2f}x"),
        ("heads", str(sum(before["heads_per_layer"])), str(sum(after["heads_per_layer"])), ""),
        ("heads per layer", " ".join(map(str, before["heads_per_layer"])), " ".join(map(str, after["heads_per_layer"])), ""),
        ("FFN per layer", " ".join(map(str, before["ffn_per_layer"])), " ".join(map(str, after["ffn_per_layer"])), ""),
    ]
    onnx = report.get("onnx")
    if onnx:
        bench = onnx["bench"]
        for key, label in (("size_mb", "ONNX size (MB)"), ("p50_ms", "ONNX p50 latency (ms, b=1 s=128, 1 thread)")):
            b, a = bench_value(bench, 0, key), bench_value(bench, 1, key)
            if b is not None and a is not None:
                rows.append((label, f"{b:.2f}", f"{a:.2f}", f"{b / a:.2f}x faster" if key == "p50_ms" else f"{a / b:.2f}x"))
    q_before, q_after = report["quality"]["before"], report["quality"]["after"]
    for key in QUALITY_KEYS:
        if q_before.get(key) is not None and q_after.get(key) is not None:
            rows.append((f"{key} (held-out)", f"{q_before[key]:.4f}", f"{q_after[key]:.4f}", f"{q_after[key] - q_before[key]:+.4f}"))
    return rows + int8_rows(onnx.get("int8") if onnx else None, q_before)


QUALITY_KEYS = ("accuracy", "macro_f1", "spearman", "embedding_cosine", "neighbour_recall", "top1_agreement")


def int8_rows(int8: dict | None, fp32_before: dict) -> list[tuple[str, str, str, str]]:
    """Rows for --int8: dense int8 -> slim int8 latency and quality, the change against dense fp32."""
    if not int8:
        return []
    speed = int8["speedup"]
    rows = [("int8 speedup vs dense fp32 (dense int8 -> slim int8)", f"{speed['dense_int8_vs_dense_fp32']:.2f}x",
             f"{speed['slim_int8_vs_dense_fp32']:.2f}x", f"{speed['slim_int8_vs_dense_int8']:.2f}x faster")]
    dense, slim = int8["quality"]["dense"], int8["quality"]["slim"]
    for key in QUALITY_KEYS:
        if dense.get(key) is not None and slim.get(key) is not None:
            change = f"{slim[key] - fp32_before[key]:+.4f} vs dense fp32" if fp32_before.get(key) is not None else ""
            rows.append((f"int8 {key} (held-out)", f"{dense[key]:.4f}", f"{slim[key]:.4f}", change))
    return rows


def bench_value(bench: dict, index: int, key: str):
    """A figure of the index-th benchmarked model, if the bench result carries it."""
    try:
        return float(bench["models"][index][key])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def to_markdown(report: dict) -> str:
    lines = [
        f"# shrink report: {report['model']} with {' + '.join(report['recipes'])}",
        "",
        f"Data: {report['data']} ({report['calibration_examples']} calibration / {report['eval_examples']} held-out examples), "
        f"objective: {report['objective']}, seed {report['seed']}.",
        "",
        "| figure | before | after | change |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(report)]
    lines += ["", checkpoint_line(report)] if report.get("checkpoint") else []
    lines += budget_lines(report)
    lines += ["", "## Steps", "", "| recipe | method | seconds | what it did |", "|---|---|---|---|"]
    for step in report["steps"]:
        stats = step["stats"]
        did = ", ".join(f"{k}={v}" for k, v in stats.items() if not isinstance(v, dict))[:400]
        lines.append(f"| {step['recipe']} | {step['method']} | {step['seconds']} | {did} |")
    return "\n".join(lines) + "\n"


def checkpoint_line(report: dict) -> str:
    """Which kind of checkpoint was written and why (shrink.models.slim.standard_config)."""
    kind = report["checkpoint"]
    loads = "vanilla transformers loads it" if kind["kind"] == "standard" else "load it with shrink.load or trust_remote_code=True"
    return f"Checkpoint: {kind['kind']} ({loads}): {kind['why']}."


def budget_lines(report: dict) -> list[str]:
    """What --budget traded, one line per training run (none without a budget)."""
    budget = report.get("budget")
    if not budget:
        return []
    head = f"Budget: {format_duration(budget['seconds'])} of training, {format_duration(budget['training_s'])} used"
    return ["", head + (":" if budget["trades"] else "; no step trained.")] + [f"- {trade}" for trade in budget["trades"]]


def write_prune_report(report: dict, directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (directory / "report.md").write_text(to_markdown(report), encoding="utf-8")


def show(report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"{report['model']} -> {report['output']}"), show_edge=False)
    for col in ("figure", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for row in headline_rows(report):
        table.add_row(*row)
    out.print(table)
    for step in report["steps"]:
        trades = "; ".join(run["trade"] for run in step.get("budget", {}).get("runs", []))
        out.print(f"  {step['recipe']} / {step['method']}: {step['seconds']} s" + (f" (trained {trades})" if trades else ""), markup=False)
    if report.get("checkpoint"):
        out.print("  " + checkpoint_line(report), markup=False)
    if report.get("budget"):
        out.print("  " + budget_lines(report)[1], markup=False)
