"""Latency side by side, measured so that the comparison can be trusted.

    bench(targets, batch_sizes=(1, 8), seq_lengths=(128,), threads=1, warmup=5, rounds=30,
          backend="auto", data_batches=None) -> dict

A target is a checkpoint (a directory, slim or not, an alias or a hub id: run with torch), an .onnx
file (run with onnxruntime), or a torch model object. With backend="onnx" checkpoints and model
objects are exported on the fly (shrink.measure.export, parity-gated) into a temporary directory.

How it measures, and why:
- one (batch, seq) cell at a time; all models warm up first, then rounds are INTERLEAVED: every round
  times one run of every model, so a slow minute of the machine (another job, thermal throttling)
  hits all models alike. The order rotates each round so no model always follows the same one.
- the same seeded random token ids of exactly the requested shape for every model, attention mask
  all ones (no padding to skip), so the models do identical work per token.
- one intra-op thread by default (torch.set_num_threads, onnxruntime intra_op_num_threads) because
  single-thread numbers are stable; the previous torch setting is restored afterwards.
- ratios against the first target (the baseline) are the figures to compare across machines;
  absolute milliseconds belong to this machine and this moment.

Result (shrink.measure.bench.render renders it; `shrink prune` stores it in report.json):
    {"settings": {...},
     "models": [{"name", "path", "backend", "params", "params_total", "flops_g": {"128": ...},
                 "size_mb", "p50_ms" (first cell), "results": [{"batch", "seq", "p50_ms", "p90_ms",
                 "p99_ms", "mean_ms", "throughput", "speedup", "latency_ratio"}], ...}],
     "results": [the same rows, cell by cell, each with "model"],
     "real_text" (with text_batches): {"inputs": what was timed, "own_lengths": {"models": [{"model",
                 "p50_ms" (mean ms per text), "p90_ms", "speedup", "latency_ratio"}], "tokens"}, "long": ...}}
speedup = baseline p50 / model p50 and latency_ratio = model p50 / baseline p50, per cell.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from shrink.console import progress
from shrink.errors import BadInputError
from shrink.measure.bench.env import environment, process_peak_rss_mb
from shrink.measure.bench.targets import Target, load_target, static_figures, unique_names
from shrink.measure.bench.real_text import LONG_LENGTH, TEXT_SAMPLES, real_text_section
from shrink.measure.bench.timing import random_feed, summarize, time_cell
from shrink.measure.evaluate import NEIGHBOURS, evaluate, runner_for

BACKENDS = ("auto", "torch", "onnx")


def bench(
    targets: list,
    *,
    batch_sizes=(1, 8),
    seq_lengths=(128,),
    threads: int = 1,
    warmup: int = 5,
    rounds: int = 30,
    backend: str = "auto",
    data_batches=None,
    seed: int = 0,
    text_batches=None,
    text_samples: int = TEXT_SAMPLES,
    long_length: int = LONG_LENGTH,
) -> dict:
    """Measure every target on every (batch, seq) cell; see the module docstring.

    data_batches: batches (dicts of tensors, as shrink.measure.evaluate takes them) or a function of the
    baseline's runner that makes them; adds each model's metrics as "quality".
    text_batches: tokenized real texts (batches), or a function of the target's index giving that
    target's own (a pruned vocabulary tokenizes anew): adds "real_text", each model timed on
    `text_samples` texts at their own lengths (b=1, unpadded) and on one input of `long_length` real
    tokens (shrink.measure.bench.real_text); what token-pruned models must be judged on."""
    batch_sizes, seq_lengths = list(batch_sizes), list(seq_lengths)
    check_settings(targets, batch_sizes, seq_lengths, threads, warmup, rounds, backend)
    check_text_settings(text_samples, long_length)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="shrink-bench-") as scratch:
            loaded = []
            for ref, name in zip(targets, unique_names(targets)):
                loaded.append(load_target(ref, name, backend, threads, Path(scratch)))
                check_lengths(loaded[-1], seq_lengths)
            cells = [(b, s) for s in seq_lengths for b in batch_sizes]
            vocab = min((t.vocab_size for t in loaded if t.vocab_size), default=None)
            timings = {}
            with progress() as bar:
                texts = 2 if text_batches is not None else 0
                task = bar.add_task("bench", total=(len(cells) + texts) * (warmup + rounds) * len(loaded), status="")
                for index, (b, s) in enumerate(cells):
                    bar.update(task, status=f"batch {b}, seq {s}")
                    feed = random_feed(b, s, vocab, seed + index)
                    timings[(b, s)] = time_cell(loaded, feed, warmup, rounds, lambda: bar.advance(task))
                real = None
                if text_batches is not None:
                    bar.update(task, status="real texts")
                    batches_of = text_batches if callable(text_batches) else (lambda i: text_batches)
                    real = real_text_section(loaded, batches_of, samples=text_samples, long_length=long_length,
                                             warmup=warmup, rounds=rounds, tick=lambda: bar.advance(task))
            scores = quality(loaded, data_batches) if data_batches is not None else None
            result = _result(loaded, cells, timings, scores, seq_lengths, {
                "batch_sizes": batch_sizes, "seq_lengths": seq_lengths, "threads": threads, "warmup": warmup,
                "rounds": rounds, "backend": backend, "seed": seed,
            })
            if real is not None:
                result["real_text"] = real
            return result
    finally:
        torch.set_num_threads(previous_threads)


def check_settings(targets, batch_sizes, seq_lengths, threads, warmup, rounds, backend) -> None:
    if not targets:
        raise BadInputError("nothing to benchmark", hint="pass one or more checkpoints or .onnx files")
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    for label, values in (("batch size", batch_sizes), ("sequence length", seq_lengths)):
        if not values:
            raise BadInputError(f"no {label}s given")
        for v in values:
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise BadInputError(f"{label} {v} must be a positive integer")
    if threads < 1 or rounds < 1 or warmup < 0:
        raise BadInputError("threads and rounds must be at least 1, warmup at least 0")


def check_text_settings(text_samples: int, long_length: int) -> None:
    if text_samples < 1 or long_length < 3:
        raise BadInputError(f"--text-samples must be at least 1 and --long-length at least 3 (got {text_samples}, {long_length})")


def check_lengths(target: Target, seq_lengths) -> None:
    longest = max(seq_lengths)
    if target.max_seq_len is not None and longest > target.max_seq_len:
        raise BadInputError(
            f"sequence length {longest} is above the maximum of {target.name} ({target.max_seq_len} positions)",
            hint=f"use --seq-lengths up to {target.max_seq_len}",
        )


def quality(targets: list[Target], data_batches) -> list[dict]:
    """Each model's metrics on the data; the first model is the teacher of the others, so models
    without labels still get a fidelity figure (embedding cosine / top-1 agreement)."""
    runners = [runner_for(t.runner_source) for t in targets]
    batches = data_batches(runners[0]) if callable(data_batches) else data_batches
    results = [evaluate(runners[0], batches)]
    if runners[0].kind == "embedding":  # the baseline against itself, by definition
        n = results[0]["samples"]
        results[0].update(embedding_cosine=1.0, **({"neighbour_recall": 1.0, "neighbour_k": min(NEIGHBOURS, n - 1)} if n > 1 else {}))
    else:
        results[0].update(top1_agreement=1.0, logits_kl=0.0)
    for runner in runners[1:]:
        results.append(evaluate(runner, batches, teacher=runners[0]))
    return results


def _result(loaded: list[Target], cells, timings, scores, seq_lengths, settings: dict) -> dict:
    models = []
    for i, target in enumerate(loaded):
        rows = []
        for b, s in cells:
            row = {"batch": b, "seq": s, **summarize(timings[(b, s)][i], b)}
            baseline = float(np.percentile(timings[(b, s)][0], 50))
            row["speedup"] = baseline / row["p50_ms"]
            row["latency_ratio"] = row["p50_ms"] / baseline
            rows.append(row)
        entry = {"name": target.name, "path": target.path, "backend": target.backend, **static_figures(target, seq_lengths)}
        entry["p50_ms"] = rows[0]["p50_ms"]
        entry["results"] = rows
        entry.update(target.extra)
        if scores is not None:
            entry["quality"] = scores[i]
        models.append(entry)
    settings.update(
        baseline=loaded[0].name,
        interleaved="warm-up for all models, then every round times each model once (order rotates)",
        inputs="seeded random token ids of exactly batch x seq, attention mask all ones",
        environment=environment(),
        process_peak_rss_mb=process_peak_rss_mb(),
        note="absolute ms depend on this machine and moment; compare the ratios (speedup, latency_ratio)",
    )
    flat = [{"model": m["name"], **row} for k in range(len(cells)) for m in models for row in [m["results"][k]]]
    return {"settings": settings, "models": models, "results": flat}
