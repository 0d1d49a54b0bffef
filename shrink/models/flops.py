"""Analytic FLOPs of one forward pass, read off the model's actual (possibly non-uniform) shapes.

    model_flops(model, seq_len, batch=1) -> {"embeddings", "attention", "ffn", "head", "total"}

Convention: FLOPs = 2 x multiply-adds of the matrix products (Linear layers and the two attention
matmuls). Softmax, GELU, LayerNorm, bias adds and embedding lookups are left out: they are a few
percent of the total and are the same before and after pruning, so ratios stay honest.

Per encoder layer (s tokens, h heads of size d; a pruned layer has its own h):
    q, k, v, out projections   2 * s * in * out each (a LowRankLinear counts both factors)
    scores Q K^T, context A V  2 * s * s * h * d each (0 for a layer with no heads left)
    FFN in, FFN out            2 * s * in * out each (0 for an FFN with no neurons left)
Outside the layers: Linears inside the embeddings (a factorized embedding's projection, ELECTRA's
embeddings_project) run on all s tokens; the pooler and a sequence-classification head see only the
first token; token-level heads (token classification, QA, masked LM) run on all s tokens.

An ONNX file has no such walk: ONNX shape inference cannot recover the per-layer head counts through
the exported Reshape chains, so shrink.measure.bench reports FLOPs of an .onnx file only when the checkpoint
it came from sits beside it (config.json in the same directory), and null otherwise.
"""

from __future__ import annotations

from torch import nn

from shrink.arch import task_head
from shrink.surgery import runtime
from shrink.surgery.ops import adapter_of, head_size, heads_per_layer, layers_of


def linear_flops(module: nn.Module, tokens: int) -> int:
    """FLOPs of one Linear (or LowRankLinear: both factors) applied to `tokens` vectors; 0 for any
    other module."""
    kind = runtime.kind_of(module)
    return kind.flops(module, tokens) if kind is not None else 0


def attention_matmul_flops(seq_len: int, heads: int, size: int) -> int:
    """Q K^T plus (attention weights) V for one layer."""
    return 2 * (2 * seq_len * seq_len * heads * size)


def layer_flops(adapter, layer: nn.Module, heads: int, size: int, seq_len: int) -> dict[str, int]:
    attention = ffn = 0
    if runtime.layer_has_attention(adapter, layer):
        for path in (adapter.query, adapter.key, adapter.value, adapter.attention_out):
            attention += linear_flops(runtime.get_module(layer, path), seq_len)
        attention += attention_matmul_flops(seq_len, heads, size)
    if runtime.layer_has_ffn(adapter, layer):
        for path in (adapter.ffn_in, adapter.ffn_out):
            ffn += linear_flops(runtime.get_module(layer, path), seq_len)
    return {"attention": attention, "ffn": ffn}


def _linears(module: nn.Module, skip: set[int]):
    """Linear-like modules under `module` (a LowRankLinear once, not its two halves), except those in `skip`."""
    found = []

    def walk(m: nn.Module) -> None:
        if id(m) in skip:
            return
        if runtime.kind_of(m) is not None:
            found.append(m)
            return
        for child in m.children():
            walk(child)

    walk(module)
    return found


def _first_token_only(model: nn.Module) -> bool:
    """Sequence classifiers pool the first token before their head; token-level heads do not."""
    return task_head(model) == "sequence"


def model_flops(model: nn.Module, seq_len: int, batch: int = 1) -> dict[str, int]:
    """FLOPs of a forward pass at (batch, seq_len), by component. See the module docstring."""
    adapter = adapter_of(model)
    base = runtime.base_model(model)
    size = head_size(model)
    layers = layers_of(model)
    totals = {"embeddings": 0, "attention": 0, "ffn": 0, "head": 0}
    for layer, heads in zip(layers, heads_per_layer(model)):
        for key, value in layer_flops(adapter, layer, heads, size, seq_len).items():
            totals[key] += value

    # Everything outside the layers: embeddings side (all tokens), pooler (first token), task head.
    skip = {id(layers)}
    pooler = getattr(base, "pooler", None)
    if pooler is not None:
        skip.add(id(pooler))
        totals["head"] += sum(linear_flops(m, 1) for m in _linears(pooler, set()))
    totals["embeddings"] += sum(linear_flops(m, seq_len) for m in _linears(base, skip))
    if model is not base:
        tokens = 1 if _first_token_only(model) else seq_len
        totals["head"] += sum(linear_flops(m, tokens) for m in _linears(model, {id(base)}))
    totals = {key: value * batch for key, value in totals.items()}
    totals["total"] = sum(totals.values())
    return totals
