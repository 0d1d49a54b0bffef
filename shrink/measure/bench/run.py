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
     "results": [the same rows, cell by cell, each with "model"]}
speedup = baseline p50 / model p50 and latency_ratio = model p50 / baseline p50, per cell.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from shrink.errors import BadInputError, ShrinkError

BACKENDS = ("auto", "torch", "onnx")
ENCODER_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
FIRST_TOKEN_ID = 5  # random ids start above the usual special tokens ([PAD], <s>, ...)
MB = 1e6


@dataclass
class Target:
    """One model ready to time, with what is needed for its static figures."""

    name: str
    path: str | None
    backend: str  # "torch" or "onnx"
    run: Callable[[dict], object]  # one forward pass on a feed of int64 tensors
    inputs: list[str]  # the feed keys this model takes
    model: nn.Module | None = None  # torch model (or the checkpoint an ONNX file came from), for FLOPs/params
    size_bytes: int | None = None
    size_source: str = ""
    vocab_size: int | None = None
    max_seq_len: int | None = None
    onnx_params: int | None = None  # initializer elements, when there is no torch model to count
    runner_source: object = None  # what shrink.measure.evaluate.runner_for takes: the model or the .onnx path
    extra: dict = field(default_factory=dict)


# --- loading targets ----------------------------------------------------------------------------


def _torch_target(model: nn.Module, name: str, path: str | None, size: tuple[int | None, str]) -> Target:
    from shrink.arch import model_inputs
    from shrink.surgery.ops import adapter_of
    from shrink.surgery.runtime import max_sequence_length

    adapter_of(model)  # unsupported families fail here, as one line
    model = model.eval()
    inputs = list(model_inputs(model, {k: None for k in (*ENCODER_INPUTS, *OPTIONAL_INPUTS)}))

    def run(feed: dict):
        with torch.no_grad():
            return model(**feed)

    return Target(
        name=name, path=path, backend="torch", run=run, inputs=inputs, model=model,
        size_bytes=size[0], size_source=size[1], vocab_size=model.config.vocab_size,
        max_seq_len=max_sequence_length(model.config), runner_source=model,
    )


def _onnx_target(path: Path, name: str, threads: int, model: nn.Module | None = None) -> Target:
    """An .onnx file; `model` is the torch model it was exported from, when we have it."""
    from shrink.measure.export import session

    if not path.is_file():
        raise BadInputError(f"{path} does not exist", hint="check the path")
    try:
        sess = session(path, threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BadInputError(f"cannot load {path} with onnxruntime: {str(exc).splitlines()[0][:200]}") from None
    inputs = [i.name for i in sess.get_inputs()]
    unknown = [n for n in inputs if n not in (*ENCODER_INPUTS, *OPTIONAL_INPUTS)]
    if any(n not in inputs for n in ENCODER_INPUTS) or unknown:
        raise BadInputError(
            f"{path} takes inputs {inputs}; an encoder takes input_ids and attention_mask (and optionally token_type_ids)",
            hint="export it with `shrink export`",
        )
    if model is None:
        model = _checkpoint_beside(path)
    proto_vocab, initializer_params = _onnx_graph_facts(path)
    data = path.with_name(path.name + ".data")

    def run(feed: dict):
        return sess.run(None, {k: feed[k].numpy() for k in inputs})

    from shrink.surgery.runtime import max_sequence_length

    return Target(
        name=name, path=str(path), backend="onnx", run=run, inputs=inputs, model=model,
        size_bytes=path.stat().st_size + (data.stat().st_size if data.is_file() else 0),
        size_source=".onnx file" + (" + .data" if data.is_file() else ""),
        vocab_size=model.config.vocab_size if model is not None else proto_vocab,
        max_seq_len=max_sequence_length(model.config) if model is not None else None,
        onnx_params=initializer_params, runner_source=str(path),
    )


def _checkpoint_beside(path: Path) -> nn.Module | None:
    """`shrink prune` (and `shrink export -o DIR/model.onnx`) leave the checkpoint next to the ONNX
    file; loading it gives exact FLOPs, parameters by component and the maximum length."""
    if not (path.parent / "config.json").is_file():
        return None
    from shrink.models.hub import load_model

    try:
        return load_model(str(path.parent))
    except ShrinkError:
        return None  # a config.json of something else: fall back to what the graph tells


def _onnx_graph_facts(path: Path) -> tuple[int | None, int]:
    """(vocabulary size, initializer elements), read from the graph without loading external data."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    vocab = None
    for node in graph.node:  # the word-embedding lookup: Gather(table, input_ids)
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids":
            dims = initializers.get(node.input[0])
            vocab = dims[0] if dims else None
            break
    return vocab, sum(int(np.prod(dims)) for dims in initializers.values())


def _checkpoint_size(resolved: str) -> tuple[int | None, str]:
    directory = Path(resolved)
    if not directory.is_dir():
        return None, "hub model (not on disk)"
    files = [f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in files), "weights files"


def _in_memory_size(model: nn.Module) -> tuple[int, str]:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors), "tensors in memory"


def load_target(ref, name: str, backend: str, threads: int, scratch: Path) -> Target:
    """A Target for a checkpoint reference, an .onnx path or a torch model object."""
    if isinstance(ref, nn.Module):
        model, path, size = ref, None, _in_memory_size(ref)
    elif str(ref).endswith(".onnx"):
        if backend == "torch":
            raise BadInputError(f"{ref} is an ONNX file; --backend torch runs checkpoints only", hint="use --backend auto")
        return _onnx_target(Path(ref), name, threads)
    else:
        from shrink.models.hub import load_model, resolve

        ref = str(ref)
        if Path(ref).expanduser().is_file():
            raise BadInputError(f"{ref} is neither an .onnx file nor a model directory", hint="pass a checkpoint directory or an .onnx file")
        path = resolve(ref)
        model, size = load_model(ref), _checkpoint_size(path)
    if backend != "onnx":
        return _torch_target(model, name, path, size)
    return _exported_target(model, name, path, threads, scratch)


def _exported_target(model: nn.Module, name: str, path: str | None, threads: int, scratch: Path) -> Target:
    """backend="onnx" for a checkpoint: export (parity-gated) into the scratch directory, then run that."""
    from shrink.measure.export import export_onnx

    onnx_path = scratch / f"target-{len(list(scratch.iterdir()))}.onnx"
    report = export_onnx(model, onnx_path)
    target = _onnx_target(onnx_path, name, threads, model=model)
    target.path = path
    target.size_source += " (exported on the fly)"
    target.extra["export"] = {
        "seconds": report["seconds"],
        "max_abs_diff": max(report["max_abs_diff"].values()),
        "opset": report["opset"],
    }
    return target


def _unique_names(targets: list) -> list[str]:
    names = []
    for i, ref in enumerate(targets):
        name = f"{type(ref).__name__}[{i}]" if isinstance(ref, nn.Module) else str(ref)
        names.append(name if name not in names else f"{name} ({i + 1})")
    return names


# --- measuring ----------------------------------------------------------------------------------


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


# --- static figures and quality -----------------------------------------------------------------


def static_figures(target: Target, seq_lengths) -> dict:
    from shrink.models.flops import model_flops
    from shrink.models.info import params_by_component

    if target.model is not None:
        params = params_by_component(target.model)
        flops = {str(s): model_flops(target.model, s)["total"] / 1e9 for s in seq_lengths}
    else:
        params = {"initializers": target.onnx_params}
        flops = {str(s): None for s in seq_lengths}
    return {
        "params": params,
        "params_total": sum(params.values()),
        "flops_g": flops,
        "size_mb": target.size_bytes / MB if target.size_bytes is not None else None,
        "size_source": target.size_source,
    }


def quality(targets: list[Target], data_batches) -> list[dict]:
    """Each model's metrics on the data; the first model is the teacher of the others, so models
    without labels still get a fidelity figure (embedding cosine / top-1 agreement)."""
    from shrink.measure.evaluate import evaluate, runner_for

    runners = [runner_for(t.runner_source) for t in targets]
    batches = data_batches(runners[0]) if callable(data_batches) else data_batches
    results = [evaluate(runners[0], batches)]
    results[0].update({"embedding_cosine": 1.0} if runners[0].kind == "embedding" else {"top1_agreement": 1.0, "logits_kl": 0.0})
    for runner in runners[1:]:
        results.append(evaluate(runner, batches, teacher=runners[0]))
    return results


# --- the entry point ----------------------------------------------------------------------------


def _check_settings(targets, batch_sizes, seq_lengths, threads, warmup, rounds, backend) -> None:
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


def _check_lengths(target: Target, seq_lengths) -> None:
    longest = max(seq_lengths)
    if target.max_seq_len is not None and longest > target.max_seq_len:
        raise BadInputError(
            f"sequence length {longest} is above the maximum of {target.name} ({target.max_seq_len} positions)",
            hint=f"use --seq-lengths up to {target.max_seq_len}",
        )


def _environment() -> dict:
    import os
    import platform

    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_description(),
    }


def _cpu_description() -> str:
    """CPU model and the vector extensions int8 kernels depend on: int8 speedups differ by an order
    of magnitude between a CPU with VNNI/AMX and one with AVX2 only, so a report must say which."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def _process_peak_rss_mb() -> float | None:
    """Peak resident memory of this whole process (all models together), not per model."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024) / MB  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


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
) -> dict:
    """Measure every target on every (batch, seq) cell; see the module docstring.

    data_batches: batches (dicts of tensors, as shrink.measure.evaluate takes them) or a function of the
    baseline's runner that makes them; adds each model's metrics as "quality"."""
    from shrink.console import progress

    batch_sizes, seq_lengths = list(batch_sizes), list(seq_lengths)
    _check_settings(targets, batch_sizes, seq_lengths, threads, warmup, rounds, backend)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="shrink-bench-") as scratch:
            loaded = []
            for ref, name in zip(targets, _unique_names(targets)):
                loaded.append(load_target(ref, name, backend, threads, Path(scratch)))
                _check_lengths(loaded[-1], seq_lengths)
            cells = [(b, s) for s in seq_lengths for b in batch_sizes]
            vocab = min((t.vocab_size for t in loaded if t.vocab_size), default=None)
            timings = {}
            with progress() as bar:
                task = bar.add_task("bench", total=len(cells) * (warmup + rounds) * len(loaded), status="")
                for index, (b, s) in enumerate(cells):
                    bar.update(task, status=f"batch {b}, seq {s}")
                    feed = random_feed(b, s, vocab, seed + index)
                    timings[(b, s)] = time_cell(loaded, feed, warmup, rounds, lambda: bar.advance(task))
            scores = quality(loaded, data_batches) if data_batches is not None else None
            return _result(loaded, cells, timings, scores, seq_lengths, {
                "batch_sizes": batch_sizes, "seq_lengths": seq_lengths, "threads": threads, "warmup": warmup,
                "rounds": rounds, "backend": backend, "seed": seed,
            })
    finally:
        torch.set_num_threads(previous_threads)


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
        environment=_environment(),
        process_peak_rss_mb=_process_peak_rss_mb(),
        note="absolute ms depend on this machine and moment; compare the ratios (speedup, latency_ratio)",
    )
    flat = [{"model": m["name"], **row} for k in range(len(cells)) for m in models for row in [m["results"][k]]]
    return {"settings": settings, "models": models, "results": flat}
