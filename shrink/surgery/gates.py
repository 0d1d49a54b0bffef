"""Gates for scoring: multiply heads, FFN neurons or whole layers by a factor, through hooks.

One model instance can then evaluate many candidate masks without copying weights. A gate is a
tensor set per layer: shape (units,) applies to every sample, shape (batch, units) gives each sample
its own mask, so many masks can be scored in one forward pass (repeat the inputs, one row per mask).
Gates may require grad (gradient importance, learned gates). A gate of 0 equals physical removal,
which the tests check against shrink.surgery.

    with Gates(model) as gates:
        gates.heads[2] = torch.tensor([1., 0., 1., 1.])   # drop head 1 of layer 2
        gates.layers = torch.tensor([1., 1., 0.])         # skip layer 2 (per-sample: (batch, L))
        out = model(**batch)
"""

from __future__ import annotations

import torch
from torch import nn

from shrink.surgery import runtime
from shrink.surgery.ops import adapter_of, head_size, layers_of


def _per_sample(gate: torch.Tensor, batch: int) -> torch.Tensor:
    """Gate as (batch or 1, units)."""
    gate = gate if gate.dim() == 2 else gate.unsqueeze(0)
    if gate.shape[0] not in (1, batch):
        raise ValueError(f"gate has {gate.shape[0]} rows but the batch has {batch} samples")
    return gate


class Gates:
    """Head, FFN-neuron and layer gates on a model; `None` means ungated."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = adapter_of(model)
        self.head_size = head_size(model)
        n = len(layers_of(model))
        self.heads: list[torch.Tensor | None] = [None] * n
        self.ffn: list[torch.Tensor | None] = [None] * n
        self.layers: torch.Tensor | None = None
        self._handles = []
        self._attach()

    def _attach(self) -> None:
        adapter = self.adapter
        for i, layer in enumerate(layers_of(self.model)):
            if runtime.layer_has_attention(adapter, layer):
                out = runtime.get_module(layer, adapter.attention_out)
                self._handles.append(out.register_forward_pre_hook(self._head_hook(i)))
            if runtime.layer_has_ffn(adapter, layer):
                out = runtime.get_module(layer, adapter.ffn_out)
                self._handles.append(out.register_forward_pre_hook(self._ffn_hook(i)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))

    def _head_hook(self, i: int):
        def hook(module, args):
            gate = self.heads[i]
            if gate is None:
                return None
            x = args[0]
            b, s, width = x.shape
            g = _per_sample(gate, b).to(device=x.device, dtype=x.dtype)
            x = (x.view(b, s, -1, self.head_size) * g[:, None, :, None]).view(b, s, width)
            return (x, *args[1:])

        return hook

    def _ffn_hook(self, i: int):
        def hook(module, args):
            gate = self.ffn[i]
            if gate is None:
                return None
            x = args[0]
            g = _per_sample(gate, x.shape[0]).to(device=x.device, dtype=x.dtype)
            return (x * g[:, None, :], *args[1:])

        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if self.layers is None:
                return None
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            g = _per_sample(self.layers, hidden_in.shape[0])[:, i].to(device=hidden_in.device, dtype=hidden_in.dtype)[:, None, None]
            mixed = hidden_in + g * (hidden_out - hidden_in)
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def clear(self) -> None:
        self.heads = [None] * len(self.heads)
        self.ffn = [None] * len(self.ffn)
        self.layers = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "Gates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
