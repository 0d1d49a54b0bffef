"""Gates on the residual stream (CoFi's z_hidden), through forward hooks: shared by hidden.importance
(gradient of a gate of ones) and the L0 `hidden` kind (learned hard-concrete gates). Its own module
because shrink.methods.hidden imports posttrain, which imports l0."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shrink.surgery import adapter_of, layers_of, runtime


def stream_writers(model) -> list[nn.Module]:
    """The modules whose output is the residual stream: the embeddings' LayerNorm (ELECTRA:
    embeddings_project) and every LayerNorm inside the layers."""
    adapter, base = adapter_of(model), runtime.base_model(model)
    project = runtime.embeddings_project(adapter, model)
    first = [project] if project is not None else [
        m for m in runtime.get_module(base, adapter.embeddings).modules() if isinstance(m, nn.LayerNorm)]
    return first + [m for layer in layers_of(model) for m in layer.modules() if isinstance(m, nn.LayerNorm)]


def gate_stream(model, gate: Callable[[], torch.Tensor | None]) -> list:
    """Multiply the residual stream by gate() wherever it is written (stream_writers): a (hidden,)
    tensor for every example, (batch, hidden) one row per example, None ungated. Returns the hook
    handles (call .remove() on each)."""

    def hook(module, args, out):
        g = gate()
        if g is None:
            return None
        g = g if g.dim() == 2 else g.unsqueeze(0)
        return out * g[:, None, :].to(device=out.device, dtype=out.dtype)

    return [m.register_forward_hook(hook) for m in stream_writers(model)]
