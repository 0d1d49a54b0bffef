"""Timing: the same seeded random feed for every model, warm-up for all, then interleaved rounds."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from shrink.measure.bench.targets import Target

FIRST_TOKEN_ID = 5  # random ids start above the usual special tokens ([PAD], <s>, ...)


def random_feed(batch: int, seq: int, vocab_size: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random ids of exactly (batch, seq), mask all ones, token types zero. Without a known
    vocabulary every id is FIRST_TOKEN_ID (valid for any real vocabulary; the work is the same)."""
    high = vocab_size if vocab_size and vocab_size > FIRST_TOKEN_ID + 1 else FIRST_TOKEN_ID + 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_TOKEN_ID, high, (batch, seq), generator=g, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def time_cell(targets: list[Target], feed: dict, warmup: int, rounds: int, tick: Callable[[], None]) -> list[list[float]]:
    """Milliseconds of each run, per target: warm-up for all, then interleaved rounds."""
    feeds = [{k: feed[k] for k in t.inputs} for t in targets]
    for _ in range(warmup):
        for target, own in zip(targets, feeds):
            target.run(own)
            tick()
    times: list[list[float]] = [[] for _ in targets]
    order = list(range(len(targets)))
    for r in range(rounds):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:  # rotate so no model always runs right after the same one
            started = time.perf_counter()
            targets[i].run(feeds[i])
            times[i].append((time.perf_counter() - started) * 1e3)
            tick()
    return times


def summarize(ms: list[float], batch: int) -> dict:
    values = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
        "throughput": float(batch * len(values) / (values.sum() / 1e3)),  # sequences/s over the timed runs
    }
