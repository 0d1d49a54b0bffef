"""uniform.importance: the same heads and neurons per layer, the most important by |dL/dgate|."""

from __future__ import annotations

import pytest
import torch

from shrink import surgery
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.methods.l0.hard_concrete import LinearCost
from shrink.methods.uniform import unit_importance
from shrink.prune.pipeline import run_step
from shrink.surgery.gates import Gates

from helpers import labeled_method_context, method_context, tiny_model


def context(arch="bert"):
    return method_context(tiny_model(arch))


def step(ctx, target, **options):
    method = get_method("uniform.importance")
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def labeled_context():
    """A tiny classifier with labels: the task loss is informative at the original model."""
    return labeled_method_context(tiny_model("bert", task="seq"))


def test_importance_is_the_summed_per_example_gradient_magnitude_of_each_unit_gate():
    ctx = labeled_context()
    heads, ffn = unit_importance(ctx, ctx.calibration)
    # the reference: one example and one gate vector at a time, gradient by autograd
    layer, expected = 1, torch.zeros(4)
    for batch in ctx.calibration:
        for i in range(4):
            example = {k: v[i:i + 1] for k, v in batch.items()}
            gate = torch.ones(4, requires_grad=True)
            with Gates(ctx.model) as gates:
                gates.heads = [gate if j == layer else None for j in range(3)]
                loss = ctx.objective(ctx.model, example, ctx.objective.targets(example))
            expected += torch.autograd.grad(loss, gate)[0].abs()
    assert torch.allclose(heads[layer], expected, atol=1e-5)
    assert [s.numel() for s in ffn] == [37, 37, 37]


def test_without_labels_the_scores_still_carry_information():
    ctx = context()  # a base model: the objective is embedding cosine to the teacher, zero gradient here
    heads, ffn = unit_importance(ctx, ctx.calibration)
    assert all(s.min() > 0 for s in heads + ffn)
    assert all(s.unique().numel() == s.numel() for s in heads)


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_every_layer_keeps_the_same_counts_and_its_most_important_units(arch):
    ctx = context(arch)
    heads, ffn = unit_importance(ctx, ctx.calibration)
    expected = [sorted(torch.argsort(s, descending=True)[:2].tolist()) for s in heads]
    result = step(ctx, {"heads_per_layer": 2, "ffn_per_layer": 16})
    assert surgery.heads_per_layer(ctx.model) == [2, 2, 2]
    assert surgery.ffn_per_layer(ctx.model) == [16, 16, 16]
    assert result.stats["heads_per_layer"] == 2
    kept = [op for op in result.plan if type(op).__name__ == "KeepHeads"][0].keep
    assert [kept[layer] for layer in range(3)] == expected


def test_only_heads_leaves_the_ffn_alone():
    ctx = context()
    step(ctx, {"heads_per_layer": 3})
    assert surgery.heads_per_layer(ctx.model) == [3, 3, 3]
    assert surgery.ffn_per_layer(ctx.model) == [37, 37, 37]


def fake_cost(monkeypatch, per_head=1.0, per_neuron=0.1):
    cost = LinearCost("latency_ms", base=2.0, att_fixed=0.5, per_head=per_head, ffn_fixed=0.5, per_neuron=per_neuron)
    monkeypatch.setattr("shrink.methods.uniform.latency_cost", lambda model, seq_len, threads, rounds: (cost, {"fake": True}))
    return cost


def test_speedup_keeps_the_largest_fraction_within_the_budget(monkeypatch):
    cost = fake_cost(monkeypatch)
    ctx = context()
    dense = cost.of_counts([4] * 3, [37] * 3)
    result = step(ctx, {"speedup": 1.6})
    heads, ffn = surgery.heads_per_layer(ctx.model), surgery.ffn_per_layer(ctx.model)
    assert cost.of_counts(heads, ffn) <= dense / 1.6
    assert heads == [round(4 * ffn[0] / 37)] * 3  # one keep fraction for heads and neurons
    one_more = cost.of_counts([round(4 * (ffn[0] + 1) / 37)] * 3, [ffn[0] + 1] * 3)
    assert one_more > dense / 1.6  # one neuron more per layer would miss the target
    assert result.stats["predicted_speedup"] == pytest.approx(dense / cost.of_counts(heads, ffn), abs=1e-3)


def test_an_unreachable_speedup_is_one_clear_error(monkeypatch):
    fake_cost(monkeypatch)
    with pytest.raises(BadInputError, match="cannot reach a 50.0x speedup"):
        step(context(), {"speedup": 50})


def test_target_needs_counts_or_a_speedup():
    method = get_method("uniform.importance")
    with pytest.raises(ValueError, match="give speedup"):
        method.target(speedup=2, heads_per_layer=2)
    with pytest.raises(ValueError, match="give speedup"):
        method.target()
