"""First-order Taylor importance (shrink.methods.taylor): each group's w . dL/dw against a finite
difference of scaling that group, and the option in heads.importance / uniform.importance."""

from __future__ import annotations

import torch
from helpers import method_context, tiny_inputs, tiny_model

from shrink import surgery
from shrink.methods.catalog import get_method
from shrink.methods.taylor import taylor_importance


def _scaled_loss(model, batch, scale: float, layer: int, head: int | None = None, neuron: int | None = None) -> float:
    """The loss with one head's (or neuron's) weights multiplied by `scale`: d/dscale at 1 is sum w dL/dw."""
    block = model.encoder.layer[layer]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        if head is not None:
            rows = slice(head * 8, (head + 1) * 8)
            for m in (block.attention.self.query, block.attention.self.key, block.attention.self.value):
                m.weight[rows] *= scale
                m.bias[rows] *= scale
            block.attention.output.dense.weight[:, rows] *= scale
        else:
            block.intermediate.dense.weight[neuron] *= scale
            block.intermediate.dense.bias[neuron] *= scale
            block.output.dense.weight[:, neuron] *= scale
        value = float(batch_loss(model, batch))
    model.load_state_dict(saved)
    return value


def batch_loss(model, batch):
    out = model(**batch).last_hidden_state
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (probe * out).sum()


def test_each_groups_score_is_the_square_of_a_finite_difference_of_scaling_it():
    torch.set_default_dtype(torch.float64)
    try:
        model = tiny_model("bert").double()
        batches = [{k: v for k, v in tiny_inputs(model, batch=3, seed=s).items()} for s in range(2)]
        ctx = method_context(model, batches)
        heads, neurons = taylor_importance(ctx, batches, lambda b: batch_loss(model, b))
        eps = 1e-5
        for layer, head in ((0, 1), (2, 3)):
            expected = sum(((_scaled_loss(model, b, 1 + eps, layer, head=head) - _scaled_loss(model, b, 1 - eps, layer, head=head)) / (2 * eps)) ** 2
                           for b in batches)
            assert abs(float(heads[layer][head]) - expected) <= 1e-6 * max(1.0, expected), (layer, head)
        for layer, neuron in ((1, 0), (2, 36)):
            expected = sum(((_scaled_loss(model, b, 1 + eps, layer, neuron=neuron) - _scaled_loss(model, b, 1 - eps, layer, neuron=neuron)) / (2 * eps)) ** 2
                           for b in batches)
            assert abs(float(neurons[layer][neuron]) - expected) <= 1e-6 * max(1.0, expected), (layer, neuron)
        assert [h.shape[0] for h in heads] == [4, 4, 4] and [n.shape[0] for n in neurons] == [37, 37, 37]
        assert all(p.grad is None for p in model.parameters())  # nothing left behind for a later optimizer
    finally:
        torch.set_default_dtype(torch.float32)


def test_removed_blocks_score_nothing_and_the_others_still_score():
    model = tiny_model("bert")
    surgery.prune_heads(model, {1: []})
    surgery.prune_ffn(model, {2: []})
    ctx = method_context(model)
    heads, neurons = taylor_importance(ctx, ctx.calibration, lambda b: batch_loss(model, b))
    assert [h.numel() for h in heads] == [4, 0, 4] and [n.numel() for n in neurons] == [37, 37, 0]
    assert float(heads[0].sum()) > 0 and float(neurons[1].sum()) > 0


def test_uniform_importance_with_taylor_scores_keeps_the_counts_asked_for():
    model = tiny_model("bert")
    ctx = method_context(model)
    method = get_method("uniform.importance")
    result = method.fn(ctx, method.target(heads_per_layer=2, ffn_per_layer=20), method.options(score="taylor", calibration_samples=8))
    surgery.apply(model, result.plan)
    assert surgery.heads_per_layer(model) == [2, 2, 2] and surgery.ffn_per_layer(model) == [20, 20, 20]
