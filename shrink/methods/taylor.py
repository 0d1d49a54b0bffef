"""First-order Taylor importance of structural groups (Molchanov et al. 2019, "Importance Estimation
for Neural Network Pruning"; NViT, Yang et al. 2023, "Global Vision Transformer Pruning with
Hessian-Aware Saliency"; Chen et al. 2021, "Chasing Sparsity in Vision Transformers").

Removing a group of weights W_g changes the loss by about -sum_{i in g} w_i dL/dw_i (the first-order
Taylor expansion around the current weights, setting them to zero). Its square, accumulated over the
calibration batches, is the group's importance:

    I_g = sum_batches ( sum_{i in g} w_i * dL_b/dw_i )^2

A head's group is its Q, K and V rows (weights and biases) and its columns of the output projection;
an FFN neuron's its input row (and bias) and its output column. The output-projection part alone is
what a gate on the head's output measures (dL/dgate = sum over those columns of w * dL/dw), so this
score also sees how the head's queries, keys and values are used. Squaring per batch, not at the end,
keeps batches from cancelling each other (the expectation of the square, as Molchanov et al.).
"""

from __future__ import annotations

import torch

from collections.abc import Callable

from shrink.methods.base import Context
from shrink.surgery import runtime
from shrink.surgery.ops import adapter_of, head_size, heads_per_layer, layers_of


def _modules(model):
    adapter = adapter_of(model)
    for layer in layers_of(model):
        get = lambda name: runtime.get_module(layer, getattr(adapter, name))  # noqa: E731
        attention = [get(n) for n in ("query", "key", "value", "attention_out")] if runtime.layer_has_attention(adapter, layer) else None
        ffn = [get("ffn_in"), get("ffn_out")] if runtime.layer_has_ffn(adapter, layer) else None
        yield attention, ffn


def _plain(modules) -> bool:
    return modules is not None and all(isinstance(m, torch.nn.Linear) for m in modules)


def _head_sums(modules, size: int) -> torch.Tensor:
    """Per head, sum of w * dL/dw over its Q/K/V rows (and biases) and output columns."""
    *qkv, out = modules
    total = 0
    for m in qkv:
        rows = (m.weight * m.weight.grad).sum(1)
        if m.bias is not None:
            rows = rows + m.bias * m.bias.grad
        total = total + rows.view(-1, size).sum(1)
    return total + (out.weight * out.weight.grad).view(out.weight.shape[0], -1, size).sum((0, 2))


def _neuron_sums(modules) -> torch.Tensor:
    up, down = modules
    rows = (up.weight * up.weight.grad).sum(1)
    if up.bias is not None:
        rows = rows + up.bias * up.bias.grad
    return rows + (down.weight * down.weight.grad).sum(0)


def taylor_importance(ctx: Context, batches: list[dict], loss: Callable[[dict], torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, I_g for every head and every FFN neuron (empty tensors where the block is gone;
    zeros for a factorized block, which has no per-unit rows). `loss(batch)`: the scalar to expand,
    default the run's objective (a distillation loss has zero gradient at the original model: pass a
    per-example proxy there, as uniform.importance does)."""
    model = ctx.model
    size, layers = head_size(model), list(_modules(model))
    heads = [torch.zeros(n) for n in heads_per_layer(model)]
    neurons = [torch.zeros(ffn[0].out_features) if _plain(ffn) else torch.zeros(0) for _, ffn in layers]
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(True)  # a copy of the frozen teacher has no gradients otherwise
    try:
        for batch in batches:
            model.zero_grad(set_to_none=False)
            if loss is not None:
                loss(batch).backward()
            else:
                with torch.no_grad():
                    targets = ctx.objective.targets(batch)
                ctx.objective(model, batch, targets).backward()
            with torch.no_grad():
                for index, (attention, ffn) in enumerate(layers):
                    if _plain(attention):
                        heads[index] += _head_sums(attention, size).cpu() ** 2
                    if _plain(ffn):
                        neurons[index] += _neuron_sums(ffn).cpu() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return heads, neurons
