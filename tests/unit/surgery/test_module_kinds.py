"""The module-kind interface (runtime.MODULE_KINDS): nn.Linear and LowRankLinear sliced, rebuilt and
priced the same way, so no code outside the runtime branches on the type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.surgery import runtime
from shrink.surgery.runtime import DenseKind, LowRankKind, LowRankLinear, kind_of


def modules():
    torch.manual_seed(0)
    dense = nn.Linear(6, 5)
    low = LowRankLinear(6, 5, rank=3)
    with torch.no_grad():
        low.second.bias.normal_()
    return [dense, low]


@pytest.mark.parametrize("which", [0, 1])
def test_slices_and_rebuilds_agree_with_the_dense_matrix(which):
    module = modules()[which]
    kind = kind_of(module)
    dense, bias = kind.dense_weight(module), kind.output_bias(module)
    rows, cols = torch.tensor([0, 3]), torch.tensor([1, 2, 5])
    narrow = kind.empty_like(module, module.in_features, 2)
    narrow.load_state_dict(kind.rows(module, rows), strict=True)
    assert torch.allclose(kind.dense_weight(narrow), dense[rows]) and torch.equal(kind.output_bias(narrow), bias[rows])
    thin = kind.empty_like(module, 3, module.out_features)
    thin.load_state_dict(kind.columns(module, cols), strict=True)
    assert torch.allclose(kind.dense_weight(thin), dense[:, cols]) and torch.equal(kind.output_bias(thin), bias)
    assert type(narrow) is type(module) and kind.input_weight(module).shape[1] == module.in_features
    x = torch.randn(4, 6)
    torch.testing.assert_close(module(x), x @ dense.T + bias)


@pytest.mark.parametrize("which", [0, 1])
def test_weights_and_flops(which):
    module = modules()[which]
    kind = kind_of(module)
    weights = kind.weight_matrices(module)
    assert all(dict(module.named_parameters())[name] is w for name, w in weights.items())
    assert kind.flops(module, 7) == 2 * 7 * sum(w.numel() for w in weights.values())
    assert kind.max_rank(module) == (5 if which == 0 else 3)


def test_kinds_by_type():
    class Tagged(nn.Linear):
        pass

    assert kind_of(Tagged(2, 2)) is DenseKind and kind_of(LowRankLinear(4, 4, 2)) is LowRankKind
    assert kind_of(nn.Embedding(3, 2)) is None and kind_of(nn.LayerNorm(2)) is None
    assert set(runtime.MODULE_KINDS) == {nn.Linear, LowRankLinear}
