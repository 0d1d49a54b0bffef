"""Token pruning (tokens.power, drop-and-restore) on all-MiniLM-L6-v2: embedding fidelity against ONNX
speedup on real text, long documents and short queries.

    .venv/bin/python benchmarks/tokens_benchmark.py [--quick]

Writes benchmarks/results/tokens.{json,md}.

Texts: King James Bible chapters (Debian's bible-kjv, public domain; benchmarks/bible_data.py), the
long-input set: each chapter's verses joined, chapters of 200+ tokens, truncated to 256 tokens.
Calibration (the schedule search) uses chapters of the "train" split; fidelity and latency are
measured on chapters of the "test" split (split by a hash of book and chapter, so no chapter is on
both sides), and on short queries: single verses of the test split (their own lengths).
Variants: tokens.power at several target mean keeps, token pruning alone (weights unchanged, no
distillation; the recipe's distill step would add training). Quality: mean cosine of the mean-pooled
sentence embedding to the original's. Latency: shrink.measure.bench, ONNX Runtime, 1 thread, the
original and the pruned export interleaved, b=1 on each text at its own length (unpadded).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bible_data import chapters, read_verses, split_of  # noqa: E402

from shrink.measure.bench import bench  # noqa: E402
from shrink.methods.base import Context  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402
from shrink.models.hub import load_model, load_tokenizer  # noqa: E402
from shrink.prune.pipeline import run_step  # noqa: E402
from shrink.train.loop import distill  # noqa: E402
from shrink.train.objectives import choose_objective, mean_pool  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LENGTH = 256


def texts(quick: bool) -> dict[str, list[str]]:
    verses = read_verses()
    by_split: dict[str, list[str]] = {"train": [], "test": []}
    short: list[str] = []
    for (book, chapter), lines in chapters(verses).items():
        split = split_of(book, chapter)
        if split in by_split:
            by_split[split].append(" ".join(lines))
        if split == "test":
            short.extend(lines[:1])
    n = 16 if quick else 32
    train = by_split["train"]  # every 7th chapter may calibrate, the others distil (disjoint)
    distil = [c for i, c in enumerate(train) if i % 7]
    return {"calibration": train[::7][:n], "distill": distil, "long": by_split["test"][::5][:n], "short": short[::9][:n]}


def batches(tokenizer, items: list[str], size: int = 8) -> list[dict]:
    out = []
    for i in range(0, len(items), size):
        enc = tokenizer(items[i:i + size], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        out.append(dict(enc))
    return out


def embeddings(model, data: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        parts = [mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in data]
    return torch.nn.functional.normalize(torch.cat(parts), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="16 texts per set and 3 rounds (a smoke run)")
    parser.add_argument("--targets", default="0.85,0.75,0.65", help="target.keep_fraction values")
    parser.add_argument("--method", choices=["power", "ltp"], default="power",
                        help="power: tokens.power's schedule search (on the calibration chapters); ltp: tokens.ltp, its soft stage "
                        "trained one epoch on the --distill chapters (or the calibration ones without --distill)")
    parser.add_argument("--results-name", default="tokens", help="write benchmarks/results/NAME.{json,md}")
    parser.add_argument("--distill", type=int, default=0, help="also distil each pruned model for one epoch on this many "
                        "training chapters (the recipe's distill step; embedding cosine + relation objective), and measure again")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = load_tokenizer("minilm")
    teacher = load_model("minilm").eval()
    sets = texts(args.quick)
    data = {name: batches(tokenizer, items) for name, items in sets.items()}
    lengths = {name: [int(m.sum()) for b in data[name] for m in b["attention_mask"]] for name in data}
    reference = {name: embeddings(teacher, data[name]) for name in ("long", "short")}
    rounds = 3 if args.quick else 8
    rows = []
    distill_data = batches(tokenizer, sets["distill"][: args.distill]) if args.distill else []
    variants = [(float(t), False) for t in args.targets.split(",")] + [(float(t), True) for t in args.targets.split(",") if args.distill]
    for target, distilled in variants:
        model = copy.deepcopy(teacher)
        trains_on = distill_data if args.method == "ltp" and distill_data else data["calibration"]
        ctx = Context(model=model, teacher=teacher, tokenizer=tokenizer, calibration=trains_on,
                      calibration_batches=lambda n, length, size: data["calibration"], evaluation=[],
                      objective=choose_objective(model, teacher, has_labels=False, training=args.method == "ltp"), has_labels=False)
        method = get_method(f"tokens.{args.method}")
        model.requires_grad_(True)  # a copy of the frozen teacher (tokens.ltp trains it)
        result, _ = run_step(ctx, method, method.options(), method.target(keep_fraction=target))
        if distilled:
            model.requires_grad_(True)  # a copy of the frozen teacher
            history = distill(model, teacher, distill_data, epochs=1, lr=5e-5, progress=False)
            steps = history.get("steps")
        model.eval()
        name = f"tokens.{args.method}" + (f" + distill ({args.distill} chapters, 1 epoch)" if distilled else "")
        if args.method == "power":
            row = {"method": name, "target_keep": target, "kept_fractions": result.stats["kept_fractions"],
                   "mean_keep": result.stats["mean_keep"], "search_loss": result.stats["loss_after"]}
        else:  # thresholds, not fractions: what the layers kept is measured (hard, calibration chapters)
            row = {"method": name, "target_keep": target, "thresholds": result.stats["thresholds"],
                   "mean_keep": result.stats["hard_mean_keep"], "soft_mean_keep": result.stats["soft_mean_keep"]}
        if distilled:
            row["distill_steps"] = steps
        for name in ("long", "short"):
            cosine = (embeddings(model, data[name]) * reference[name]).sum(-1)
            timing = bench([teacher, model], batch_sizes=[1, 8] if name == "long" else [1], seq_lengths=[MAX_LENGTH], backend="onnx",
                           warmup=1, rounds=rounds,
                           text_batches=data[name], text_samples=len(sets[name]), long_length=MAX_LENGTH)
            own = timing["real_text"]["own_lengths"]["models"]
            row[name] = {"cosine_mean": round(float(cosine.mean()), 4), "cosine_min": round(float(cosine.min()), 4),
                         "speedup_own_lengths": round(own[1]["speedup"], 3), "p50_ms": [round(own[0]["p50_ms"], 2), round(own[1]["p50_ms"], 2)],
                         "inputs": timing["real_text"]["inputs"]}
            if name == "long":
                row["random_ids_256_speedup"] = round(timing["models"][1]["results"][0]["speedup"], 3)
                row["random_ids_256_b8_speedup"] = round(timing["models"][1]["results"][1]["speedup"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    document = {
        "model": "all-MiniLM-L6-v2", "texts": {k: {"count": len(v), "tokens_min": min(lengths[k]), "tokens_max": max(lengths[k]),
                                                    "tokens_mean": round(sum(lengths[k]) / len(lengths[k]), 1)} for k, v in sets.items()},
        "settings": {"max_length": MAX_LENGTH, "rounds": rounds, "threads": 1,
                     "distillation": f"{args.distill} training chapters, 1 epoch, lr 5e-5" if args.distill else "none (token pruning alone)"},
        "rows": rows, "seconds": round(time.perf_counter() - started, 1),
        "command": "benchmarks/tokens_benchmark.py" + (" --quick" if args.quick else "") + f" --method {args.method} --targets {args.targets}"
                   + (f" --distill {args.distill}" if args.distill else "") + (f" --results-name {args.results_name}" if args.results_name != "tokens" else ""),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps(document, indent=1) + "\n")
    lines = ["| method | target keep | kept fractions (power) or thresholds (ltp) | long: cosine | long: ONNX speedup (own lengths, b=1) | random ids 256, b=1 / b=8 | short: cosine | short: speedup (own lengths, b=1) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        schedule = r.get("kept_fractions") or r["thresholds"]
        lines.append(f"| {r['method']} | {r['target_keep']} | {', '.join(f'{f:g}' for f in schedule)} (mean keep {r['mean_keep']}) | {r['long']['cosine_mean']:.4f} | "
                     f"{r['long']['speedup_own_lengths']:.2f}x | {r['random_ids_256_speedup']:.2f}x / {r['random_ids_256_b8_speedup']:.2f}x | {r['short']['cosine_mean']:.4f} | "
                     f"{r['short']['speedup_own_lengths']:.2f}x |")
    lines += ["", f"long: {rows[0]['long']['inputs']}", f"short: {rows[0]['short']['inputs']}", f"command: {document['command']}"]
    (RESULTS / f"{args.results_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
