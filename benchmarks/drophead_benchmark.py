"""Scheduled DropHead (Zhou et al. 2020) with and without: does training with DropHead make later head
pruning cheaper? On the bible task, from the fine-tuned teacher:

    1. train: `distill` (task + logits KL, --train-samples training examples, one epoch), with
       DropHead (p, V-shaped schedule) or without it, the same steps and seed otherwise;
    2. prune: remove --fraction of the heads with one-shot gradient importance and with random
       removal (seeded), from each trained model;
    3. measure test accuracy after 1, after 2 (before any recovery: what DropHead should protect),
       and after the same recovery (`distill`, the heads benchmark's RECOVERY) of 2.

    .venv/bin/python benchmarks/make_teacher.py --task bible          # once (cached)
    .venv/bin/python benchmarks/drophead_benchmark.py                 # benchmarks/results/drophead.{json,md}

One seed; accuracy on the 1,500 test examples nothing trains on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import RESULTS, task_settings, teacher_dir, test_accuracy  # noqa: E402

from shrink.methods.catalog import get_method  # noqa: E402
from shrink.prune.pipeline import build_session, fresh_student, run_step  # noqa: E402

RECOVERY = {"epochs": 1, "lr": 5e-5, "loss": ["task", "logits_kl"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fraction", type=float, default=0.5, help="share of heads removed after training")
    parser.add_argument("--train-samples", type=int, default=1024, help="training examples of step 1 and of the recovery")
    parser.add_argument("--p", type=float, default=0.1, help="DropHead's highest drop rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = task_settings("bible", args.seed, data_split="train")
    settings.max_samples = args.train_samples
    session = build_session(str(teacher_dir("bible")), settings)
    teacher_accuracy = test_accuracy(session.ctx)
    distill = get_method("distill")
    rows = []
    for label, drophead in (("without DropHead", None), (f"DropHead p={args.p}, V schedule", {"p": args.p, "schedule": "v"})):
        trained = fresh_student(session, args.seed).ctx
        options = distill.options(**RECOVERY, **({"drophead": drophead} if drophead else {}))
        _, train_seconds = run_step(trained, distill, options, distill.target())
        after_training = test_accuracy(trained)
        for method_name in ("heads.importance", "heads.random"):
            ctx = dataclasses.replace(trained, model=copy.deepcopy(trained.model))
            method = get_method(method_name)
            run_step(ctx, method, method.options(), method.target(heads_fraction=args.fraction))
            before = test_accuracy(ctx)
            run_step(ctx, distill, distill.options(**RECOVERY), distill.target())
            row = {"training": label, "pruning": method_name, "accuracy_after_training": after_training,
                   "accuracy_pruned_before_recovery": before, "accuracy_after_recovery": test_accuracy(ctx),
                   "training_seconds": train_seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    document = {"task": "bible", "teacher_test_accuracy": teacher_accuracy, "heads_removed_fraction": args.fraction,
                "train_samples": args.train_samples, "recovery": RECOVERY, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
                "command": f"benchmarks/drophead_benchmark.py --fraction {args.fraction} --train-samples {args.train_samples} --p {args.p}"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drophead.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [f"Bible task, teacher test accuracy {teacher_accuracy:.2f}; {round(args.fraction * 100)}% of heads removed after step 1.", "",
             "| step 1 training | pruning | after step 1 | pruned, before recovery | after recovery |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['training']} | {r['pruning']} | {r['accuracy_after_training']:.2f} | {r['accuracy_pruned_before_recovery']:.2f} | "
                     f"{r['accuracy_after_recovery']:.2f} |")
    lines += ["", f"command: {document['command']}"]
    (RESULTS / "drophead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
