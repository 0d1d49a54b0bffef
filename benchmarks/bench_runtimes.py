"""Runtimes for the real MiniLM (all-MiniLM-L6-v2, the packaged `minilm`): torch eager vs ONNX fp32
vs ONNX optimized (onnxruntime fusions) vs ONNX int8 (dynamic quantization), at b=1 and b=8, s=128,
one thread, measured interleaved in one shrink.measure.bench run. Also records how long each export took and
its parity (max abs diff to torch) or, for int8, its agreement (embedding cosine) with torch, and
the mean embedding cosine of each runtime with torch eager on 512 real sentences (bundled corpus).

    .venv/bin/python benchmarks/bench_runtimes.py [--rounds 30] [--warmup 5]
    # writes benchmarks/results/runtimes.{json,md}

Absolute milliseconds depend on the machine and on whatever else runs on it; the ratios to torch
eager (measured interleaved, so drift hits every runtime alike) are the figures that carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

from shrink.measure.bench import bench  # noqa: E402
from shrink.data.corpus import sentences  # noqa: E402
from shrink.data.examples import Examples, make_batches  # noqa: E402
from shrink.measure.export import export_onnx  # noqa: E402
from shrink.models.hub import load_model, load_tokenizer  # noqa: E402
from shrink.measure.bench.render import to_markdown  # noqa: E402

EXPORTS = {  # name in the table: export_onnx options
    "ONNX fp32": {},
    "ONNX optimized": {"optimize": True},
    # min_agreement 0: the benchmark records the agreement instead of gating on it
    "ONNX int8": {"int8": True, "min_agreement": 0.0},
}
QUALITY_SENTENCES = 512  # bundled-corpus sentences on which each runtime's embeddings are compared with torch


def export_all(model, tokenizer, directory: Path) -> dict[str, dict]:
    reports = {}
    for name, options in EXPORTS.items():
        path = directory / (name.lower().replace(" ", "-") + ".onnx")
        report = export_onnx(model, path, tokenizer=tokenizer, **options)
        reports[name] = {
            "path": str(path),
            "export_seconds": report["seconds"],
            "max_abs_diff": max(report["max_abs_diff"].values()),
            "agreement": report.get("agreement"),
            "optimized": report["optimized"],
            "fused_ops": report.get("fused_ops"),
            "optimize_skipped": report.get("optimize_skipped"),
            "size_bytes": report["size_bytes"],
        }
        print(f"exported {name} in {report['seconds']} s", file=sys.stderr)
    return reports


def export_column(entry: dict) -> str:
    """What the export table says about parity: atol figures for fp32, agreement for int8."""
    if entry.get("agreement"):
        return ", ".join(f"{k} {v:.4f}" for k, v in entry["agreement"].items())
    return f"max abs diff {entry['max_abs_diff']:.1e}"


def markdown(result: dict, exports: dict, command: str) -> str:
    lines = [
        "# Runtimes: all-MiniLM-L6-v2 (`minilm`), one thread",
        "",
        f"Command: `{command}`",
        "",
        "| runtime | export s | export check vs torch (random ids + 4 sentences) | embedding cosine vs torch, 512 real sentences | fused ops |",
        "|---|---|---|---|---|",
    ]
    for model in result["models"]:
        entry = exports.get(model["name"])
        cosine = f"{model['quality']['embedding_cosine']:.4f}"
        if entry is None:
            lines.append(f"| {model['name']} | - | - | {cosine} (itself) | - |")
            continue
        fused = ", ".join(f"{k} {v}" for k, v in (entry["fused_ops"] or {}).items()) or entry.get("optimize_skipped") or "-"
        lines.append(f"| {model['name']} | {entry['export_seconds']} | {export_column(entry)} | {cosine} | {fused} |")
    lines += [
        "",
        "GFLOPs are analytic (shrink.models.flops) for the torch model; the ONNX files have no checkpoint beside",
        "them, so their parameters are counted from the graph's initializers (the base-model graph leaves",
        "out the unused pooler, 0.15M parameters and 0.3 MFLOPs) and their GFLOPs read n/a.",
        f"Load average (1 min) before/after: {result['settings']['load_average_1min']['before']} / "
        f"{result['settings']['load_average_1min']['after']} on {result['settings']['environment']['cpu_count']} CPUs.",
        "",
        to_markdown(result),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    command = "python benchmarks/bench_runtimes.py" + (f" --rounds {args.rounds}" if args.rounds != 30 else "") + (f" --warmup {args.warmup}" if args.warmup != 5 else "")

    model, tokenizer = load_model("minilm"), load_tokenizer("minilm")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as scratch:
        exports = export_all(model, tokenizer, Path(scratch))
        started = time.perf_counter()
        result = bench(
            ["minilm", *(e["path"] for e in exports.values())], batch_sizes=(1, 8), seq_lengths=(128,),
            threads=1, warmup=args.warmup, rounds=args.rounds,
            data_batches=make_batches(tokenizer, Examples(sentences()), max_samples=QUALITY_SENTENCES, batch_size=32),
        )
    renamed = {}
    for entry, name in zip(result["models"], ["torch eager", *exports]):
        renamed[entry["name"]], entry["name"] = name, name
        if name in exports:
            entry["export"] = exports[name]
    for row in result["results"]:
        row["model"] = renamed[row["model"]]
    result["settings"]["baseline"] = "torch eager"
    result["settings"]["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    result["settings"]["bench_seconds"] = round(time.perf_counter() - started, 1)
    result["settings"]["command"] = command

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtimes.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "runtimes.md").write_text(markdown(result, exports, command), encoding="utf-8")
    print(markdown(result, exports, command))


if __name__ == "__main__":
    main()
