"""Latency on real text: what an input-dependent model (token pruning) must be timed on.

Random ids of a fixed shape flatter nothing for a dense model, but a token-pruned model's work depends
on each input's real length and on which tokens it keeps, so it is timed on real sentences:
- "own lengths": each text alone, b=1, unpadded (its padding stripped), as a service sees queries;
  the figure is the mean time per text over the set (its p50 over rounds), so long texts weigh what
  they cost;
- "long": one input of exactly `long_length` real tokens (consecutive texts joined between the first
  text's first and last special tokens), b=1: where token pruning is meant to pay.
The texts come as tokenized batches (shrink.measure.evaluate's), so every model sees the same ids;
rounds are interleaved like the random-id cells (shrink.measure.bench.timing).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

LONG_LENGTH = 256
TEXT_SAMPLES = 64


def unpadded_rows(batches: list[dict]) -> list[torch.Tensor]:
    """Each row's real token ids (1-D), in order."""
    rows = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.append(ids[mask.bool()].clone())
    return rows


def feed_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = ids.reshape(1, -1).long()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def text_feeds(batches: list[dict], samples: int = TEXT_SAMPLES) -> list[dict]:
    """b=1 unpadded feeds of the first `samples` texts."""
    return [feed_of(row) for row in unpadded_rows(batches)[:samples]]


def long_feed(batches: list[dict], length: int = LONG_LENGTH, max_length: int | None = None) -> dict | None:
    """One feed of `length` real tokens (fewer when the texts run out or the model allows fewer):
    the inner tokens of consecutive texts, between the first text's opening and closing tokens."""
    rows = [r for r in unpadded_rows(batches) if len(r) >= 2]
    if not rows:
        return None
    length = min(length, max_length) if max_length else length
    inner = torch.cat([r[1:-1] for r in rows])[: max(0, length - 2)]
    return feed_of(torch.cat([rows[0][:1], inner, rows[0][-1:]]))


def time_feed_sets(targets: list, feed_sets: list[list[dict]], warmup: int, rounds: int, tick: Callable[[], None]) -> list[list[float]]:
    """Mean ms per feed of each target over its feed set, one figure per round: warm-up runs of the
    whole set for all, then interleaved rounds (the order rotates) of the whole set per target."""
    own = [[{k: f[k] for k in t.inputs} for f in feeds] for t, feeds in zip(targets, feed_sets)]
    for _ in range(warmup):
        for target, feeds in zip(targets, own):
            for feed in feeds:
                target.run(feed)
            tick()
    times: list[list[float]] = [[] for _ in targets]
    order = list(range(len(targets)))
    for r in range(rounds):
        shift = r % len(order)
        for i in order[shift:] + order[:shift]:
            started = time.perf_counter()
            for feed in own[i]:
                targets[i].run(feed)
            times[i].append((time.perf_counter() - started) * 1e3 / max(1, len(own[i])))
            tick()
    return times


def real_text_section(targets: list, batches_of: Callable[[int], list[dict]], *, samples: int, long_length: int,
                      warmup: int, rounds: int, tick: Callable[[], None]) -> dict:
    """{"inputs": what was timed, "own_lengths": {...}, "long": {...}}, each with one row per model
    (p50/p90 of the per-round mean ms per text, speedup against the first model)."""
    sets = [text_feeds(batches_of(i), samples) for i in range(len(targets))]
    lengths = [int(f["input_ids"].shape[1]) for f in sets[0]]
    if not lengths:
        return {"inputs": "no texts", "own_lengths": None, "long": None}
    section = {
        "inputs": f"{len(lengths)} real texts at their own lengths (b=1, unpadded; {min(lengths)}-{max(lengths)} tokens, "
                  f"mean {np.mean(lengths):.1f}), and one input of {long_length} real tokens (b=1)",
        "own_lengths": _rows(targets, time_feed_sets(targets, sets, warmup, rounds, tick)),
    }
    section["own_lengths"]["tokens"] = {"min": min(lengths), "max": max(lengths), "mean": round(float(np.mean(lengths)), 1)}
    longest = min((t.max_seq_len for t in targets if t.max_seq_len), default=None)
    longs = [long_feed(batches_of(i), long_length, longest) for i in range(len(targets))]
    if all(f is not None for f in longs):
        section["long"] = _rows(targets, time_feed_sets(targets, [[f] for f in longs], warmup, rounds, tick))
        section["long"]["tokens"] = int(longs[0]["input_ids"].shape[1])
    else:
        section["long"] = None
    return section


def _rows(targets: list, times: list[list[float]]) -> dict:
    baseline = float(np.percentile(times[0], 50))
    rows = []
    for target, ms in zip(targets, times):
        p50 = float(np.percentile(ms, 50))
        rows.append({"model": target.name, "p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
                     "speedup": baseline / p50, "latency_ratio": p50 / baseline})
    return {"models": rows}
