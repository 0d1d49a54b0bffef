"""A latency model of one architecture size on this machine, measured with ONNX Runtime.

    latency_cost(model, seq_len=128, threads=1, rounds=30) -> shrink.methods.l0.hard_concrete.LinearCost (milliseconds)

Five variants of the model are exported and timed interleaved in one shrink.measure.bench run (batch 1,
seq_len tokens, one thread): as it is, every layer with half its heads, every layer with half its FFN
neurons, attention removed from every layer but the first, the FFN removed from every layer but the
first (an encoder without any attention exports without an attention_mask input). With L_a layers
that have attention, H heads in all and H_1 in the first, L_f layers with an FFN, N neurons in all
and N_1 in the first (t = p50 latency):

    per_head   = (t_full - t_half_heads) / (heads removed)                 slope of attention
    att_fixed  = (t_full - t_no_attention - per_head * (H - H_1)) / (L_a - 1)   a live attention sub-layer
    per_neuron = (t_full - t_half_ffn) / (neurons removed)                 slope of the FFN
    ffn_fixed  = (t_full - t_no_ffn - per_neuron * (N - N_1)) / (L_f - 1)  a live FFN sub-layer
    base       = t_full - (L_a * att_fixed + per_head * H + L_f * ffn_fixed + per_neuron * N)

(negative estimates, which only noise can produce, are clipped to 0). The table is cached in
$SHRINK_CACHE/latency (default ~/.cache/shrink/latency) under a key made of the structure, the
sequence length, the thread count, the CPU and the onnxruntime version, so it is measured once per
architecture size and machine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from shrink import surgery
from shrink.measure.bench import bench
from shrink.measure.cpu import cpu_description
from shrink.methods.l0.hard_concrete import LinearCost
from shrink.models.info import describe


def cache_dir() -> Path:
    root = os.environ.get("SHRINK_CACHE") or Path.home() / ".cache" / "shrink"
    return Path(root) / "latency"


def _key(model, seq_len: int, threads: int) -> str:
    import onnxruntime

    summary = describe(model)
    facts = {
        "model_type": summary["model_type"],
        "architecture": summary["architecture"],
        "hidden": summary["hidden_size"],
        "head_size": summary["head_size"],
        "heads": summary["heads_per_layer"],
        "ffn": summary["ffn_per_layer"],
        "vocab": summary["vocab_size"],
        "seq_len": seq_len,
        "threads": threads,
        "cpu": cpu_description(),
        "onnxruntime": onnxruntime.__version__,
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{summary['model_type']}-{digest}"


def _variants(model) -> dict:
    """The five timed variants. "No attention" keeps the first layer's attention (and "no FFN" its
    FFN): an encoder with no attention at all exports without an attention_mask input."""

    heads, ffn = surgery.heads_per_layer(model), surgery.ffn_per_layer(model)
    first_att = next(i for i, n in enumerate(heads) if n)
    first_ffn = next(i for i, n in enumerate(ffn) if n)
    variants = {"full": copy.deepcopy(model)}
    cuts = {
        "half_heads": (surgery.prune_heads, {i: list(range(n - n // 2)) for i, n in enumerate(heads) if n >= 2}),
        "half_ffn": (surgery.prune_ffn, {i: list(range(n - n // 2)) for i, n in enumerate(ffn) if n >= 2}),
        "no_attention": (surgery.prune_heads, {i: [] for i, n in enumerate(heads) if n and i != first_att}),
        "no_ffn": (surgery.prune_ffn, {i: [] for i, n in enumerate(ffn) if n and i != first_ffn}),
    }
    for name, (cut, plan) in cuts.items():
        variants[name] = copy.deepcopy(model)
        cut(variants[name], plan)
    return variants


def measure(model, seq_len: int = 128, threads: int = 1, rounds: int = 30) -> dict:
    """Time the five variants (see the module docstring) and fit the coefficients."""

    model = copy.deepcopy(model).cpu().eval()
    heads, ffn = surgery.heads_per_layer(model), surgery.ffn_per_layer(model)
    variants = _variants(model)
    result = bench(list(variants.values()), batch_sizes=(1,), seq_lengths=(seq_len,), threads=threads,
                   rounds=rounds, backend="onnx")
    t = {name: m["results"][0]["p50_ms"] for name, m in zip(variants, result["models"])}
    removed_heads = sum(n // 2 for n in heads if n >= 2)
    removed_neurons = sum(n // 2 for n in ffn if n >= 2)
    total_heads, total_neurons = sum(heads), sum(ffn)
    att_layers, ffn_layers = sum(1 for n in heads if n), sum(1 for n in ffn if n)
    first_att, first_ffn = next(n for n in heads if n), next(n for n in ffn if n)
    per_head = max(0.0, (t["full"] - t["half_heads"]) / max(removed_heads, 1))
    per_neuron = max(0.0, (t["full"] - t["half_ffn"]) / max(removed_neurons, 1))
    # every attention sub-layer but the first is gone in "no_attention" (likewise for the FFN)
    att_fixed = max(0.0, (t["full"] - t["no_attention"] - per_head * (total_heads - first_att)) / max(att_layers - 1, 1))
    ffn_fixed = max(0.0, (t["full"] - t["no_ffn"] - per_neuron * (total_neurons - first_ffn)) / max(ffn_layers - 1, 1))
    layers = att_layers * att_fixed + per_head * total_heads + ffn_layers * ffn_fixed + per_neuron * total_neurons
    base = max(0.0, t["full"] - layers)
    return {
        "coefficients_ms": {"base": base, "att_fixed": att_fixed, "per_head": per_head, "ffn_fixed": ffn_fixed, "per_neuron": per_neuron},
        "p50_ms": t,
        "seq_len": seq_len,
        "threads": threads,
        "rounds": rounds,
    }


def latency_table(model, seq_len: int = 128, threads: int = 1, rounds: int = 30, refresh: bool = False) -> dict:
    """The cached table for this structure and machine, measured when absent (or refresh)."""
    path = cache_dir() / f"{_key(model, seq_len, threads)}.json"
    if path.exists() and not refresh:
        table = json.loads(path.read_text())
        table["cached"] = str(path)
        return table
    table = measure(model, seq_len, threads, rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)
    table["cached"] = None
    return table


def latency_cost(model, seq_len: int = 128, threads: int = 1, rounds: int = 30, refresh: bool = False) -> tuple[LinearCost, dict]:
    """The table as a LinearCost. With the L0 `hidden` kind, a head's and a neuron's latency are taken
    as proportional to the kept hidden dims (per_head_hidden = per_head, likewise per neuron; their
    matrix products are): an approximation the table does not measure. base and the sub-layers'
    fixed costs stay as measured."""
    table = latency_table(model, seq_len, threads, rounds, refresh)
    c = table["coefficients_ms"]
    return LinearCost("latency_ms", **c, per_head_hidden=c["per_head"], per_neuron_hidden=c["per_neuron"]), table
