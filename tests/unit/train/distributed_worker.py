"""The runs tests/unit/train/test_distributed.py compares: `distill` and `l0` on tiny BERTs, run in one
process (imported by the test) or in each of several (`accelerate launch ... distributed_worker.py OUT`).

Dropout is 0 in the models so that the only randomness is the L0 gates' (drawn from the stream all
processes share): a run in N processes then computes the same global-batch gradients as one process,
up to the order of floating-point sums. Every process writes its figures and final weights to OUT.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

from helpers import method_context  # noqa: E402

from shrink.methods.catalog import get_method  # noqa: E402
from shrink.train.loop import distill  # noqa: E402

ROWS = 7  # an odd batch: 2 processes take 3 and 4 rows, weighted 6/7 and 8/7


def tiny(task: str, seed: int = 0):
    import transformers as T

    from helpers import tiny_config

    torch.manual_seed(seed)
    config = tiny_config("bert", num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    model = (T.AutoModel if task == "base" else T.AutoModelForSequenceClassification).from_config(config)
    return model.eval()


def batches(model, count: int = 4, rows: int = ROWS, length: int = 12, seed: int = 5, half: bool = False) -> list[dict]:
    """`count` batches of `rows` rows of random lengths (padding matters); half=True keeps only the
    first process's rows of each (what a process that skipped the all-reduce would train on)."""
    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        ids = torch.randint(3, model.config.vocab_size, (rows, length), generator=g)
        lengths = torch.randint(4, length + 1, (rows,), generator=g)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        made.append({"input_ids": ids * mask, "attention_mask": mask})
    if half:
        made = [{k: v[: rows // 2] for k, v in b.items()} for b in made]
    return made


def run_distill(half: bool = False) -> tuple[dict, dict]:
    teacher = tiny("seq")
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # away from the teacher, so the KL has gradients
        g = torch.Generator().manual_seed(1)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    data = batches(teacher, half=half)
    history = distill(student, teacher, data, eval_batches=data[:1], epochs=2, grad_accum=2, lr=2e-3, eval_every=1,
                      early_stop_patience=10, progress=False, seed=3)
    figures = {"losses": history["losses"], "evals": [e["loss"] for e in history["evals"]], "processes": history.get("processes", 1)}
    return figures, student.state_dict()


def run_l0(half: bool = False) -> tuple[dict, dict]:
    model = tiny("base", seed=2)
    ctx = method_context(model, batches(model, half=half), seed=4)
    method = get_method("l0")
    options = method.options(epochs=2, max_steps=8, lr=2e-3, gate_lr=0.2, lambda_lr=0.2, target_warmup=0.25)
    result = method.fn(ctx, method.target(params_fraction=0.6), options)
    stats = result.stats
    figures = {
        "losses": [row["loss"] for row in stats["training"]["log"]],
        "expected": [row["expected_fraction"] for row in stats["training"]["log"]],
        "lambda1": [row["lambda1"] for row in stats["training"]["log"]],
        "heads_per_layer": stats["heads_per_layer"],
        "ffn_per_layer": stats["ffn_per_layer"],
    }
    return figures, model.state_dict()


def main(out: str) -> None:
    from shrink.train import distributed

    dist = distributed.current("cpu")
    rank = dist.rank if dist is not None else 0
    out = Path(out)
    for name, run in (("distill", run_distill), ("l0", run_l0)):
        figures, state = run()
        (out / f"{name}-{rank}.json").write_text(json.dumps(figures))
        torch.save(state, out / f"{name}-{rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
