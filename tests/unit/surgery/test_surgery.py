"""Physical removal equals zero gates, for every architecture."""

from __future__ import annotations

import pytest
import torch

from shrink import surgery
from shrink.errors import BadInputError
from shrink.surgery.gates import Gates

from helpers import main_output, tiny_inputs, tiny_model

ATOL = 1e-5


def run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def gated(model, inputs, heads=None, ffn=None, layers=None):
    with Gates(model) as gates:
        for i, g in (heads or {}).items():
            gates.heads[i] = g
        for i, g in (ffn or {}).items():
            gates.ffn[i] = g
        gates.layers = layers
        return run(model, inputs)


def mask(n, keep):
    g = torch.zeros(n)
    g[list(keep)] = 1
    return g


def test_heads_removal_equals_zero_gates(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    keep = {0: [1, 3], 1: [], 2: [0, 1, 2]}  # non-uniform, one layer loses all heads
    expected = gated(model, inputs, heads={i: mask(4, k) for i, k in keep.items()})
    assert not torch.allclose(expected, run(model, inputs), atol=1e-3)  # the gates did something
    surgery.prune_heads(model, keep)
    assert surgery.heads_per_layer(model) == [2, 0, 3]
    torch.testing.assert_close(run(model, inputs), expected, atol=ATOL, rtol=0)


def test_ffn_removal_equals_zero_gates(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    keep = {0: list(range(0, 37, 2)), 1: [], 2: [5]}
    expected = gated(model, inputs, ffn={i: mask(37, k) for i, k in keep.items()})
    surgery.prune_ffn(model, keep)
    assert surgery.ffn_per_layer(model) == [19, 0, 1]
    torch.testing.assert_close(run(model, inputs), expected, atol=ATOL, rtol=0)


def test_layer_drop_equals_zero_layer_gate(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    expected = gated(model, inputs, layers=torch.tensor([1.0, 0.0, 1.0]))
    surgery.drop_layers(model, [1])
    assert len(surgery.layers_of(model)) == 2
    assert surgery.original_layer_ids(model) == [0, 2]
    torch.testing.assert_close(run(model, inputs), expected, atol=ATOL, rtol=0)


def test_ops_chain_on_original_ids(arch):
    """Ops after a layer drop refer to the right original layers, and head ids stay original."""
    model = tiny_model(arch, task="seq")
    inputs = tiny_inputs(model)
    reference = tiny_model(arch, task="seq")
    surgery.drop_layers(model, [0])
    surgery.prune_heads(model, {1: [0, 2, 3]})  # original layer 2
    surgery.prune_heads(model, {1: [1, 2]})  # now original heads 2, 3
    ops = surgery.manifest_of(model)["ops"]
    assert ops[-1] == {"op": "heads", "layer": 2, "keep": [2, 3]}
    expected = gated(reference, inputs, heads={2: mask(4, [2, 3])}, layers=torch.tensor([0.0, 1.0, 1.0]))
    torch.testing.assert_close(run(model, inputs), expected, atol=ATOL, rtol=0)


def test_per_sample_gates_score_many_masks_in_one_pass(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, batch=1)
    masks = torch.stack([mask(4, [0, 1]), mask(4, [2]), torch.ones(4)])
    batched = {k: v.repeat(3, 1) for k, v in inputs.items()}
    together = gated(model, batched, heads={1: masks})
    for row, m in enumerate(masks):
        alone = gated(model, inputs, heads={1: m})
        torch.testing.assert_close(together[row : row + 1], alone, atol=ATOL, rtol=0)


def test_full_rank_factorization_reproduces_linear(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    expected = run(model, inputs)
    adapter = surgery.adapter_of(model)
    path = f"{adapter.layers}.0.{adapter.ffn_in}"
    surgery.factorize_linear(model, path, rank=32)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-4, rtol=0)
    # low rank then pruning still works (pruning slices the factor pair)
    surgery.prune_ffn(model, {0: [0, 1, 2]})
    assert surgery.ffn_per_layer(model)[0] == 3


def test_low_rank_is_an_approximation():
    model = tiny_model("bert")
    layer = model.encoder.layer[0].attention.self.query
    weight = layer.weight.detach().clone()
    surgery.factorize_linear(model, "encoder.layer.0.attention.self.query", rank=4)
    new = model.encoder.layer[0].attention.self.query
    approx = new.second.weight @ new.first.weight
    s = torch.linalg.svdvals(weight.double())
    # Eckart-Young: the error of the best rank-4 approximation is the energy of the rest
    assert torch.isclose(torch.linalg.norm((approx - weight).double()), s[4:].norm(), rtol=1e-4)


def test_factorized_embeddings_full_rank_is_exact(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    expected = run(model, inputs)
    dim = surgery.adapter_of(model)
    surgery.factorize_word_embeddings(model, rank=24 if arch == "electra" else 32)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-4, rtol=0)
    assert dim  # adapter found


def test_bad_plans_are_rejected():
    model = tiny_model("bert")
    with pytest.raises(BadInputError, match="out of range"):
        surgery.prune_heads(model, {0: [7]})
    with pytest.raises(BadInputError, match="layer 9"):
        surgery.prune_ffn(model, {9: [0]})
    with pytest.raises(BadInputError, match="not a Linear|no module"):
        surgery.factorize_linear(model, "encoder.layer.0.attention", rank=2)
    with pytest.raises(BadInputError, match="rank"):
        surgery.factorize_linear(model, "encoder.layer.0.attention.self.query", rank=0)


def test_all_heads_and_all_ffn_removed_model_still_runs(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    surgery.prune_heads(model, {i: [] for i in range(3)})
    surgery.prune_ffn(model, {i: [] for i in range(3)})
    out = run(model, inputs)
    assert torch.isfinite(out).all()
    assert surgery.heads_per_layer(model) == [0, 0, 0]
