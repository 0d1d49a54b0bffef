"""Head-pruning methods through the registry: a useless head is found first by every scorer."""

from __future__ import annotations

import pytest
import torch

from shrink import surgery
from shrink.methods.catalog import get_method

from helpers import method_context, tiny_inputs, tiny_model

USELESS = (1, 2)  # (layer, head) whose output projection columns are zeroed


def context(seed=0):
    model = tiny_model("bert")
    with torch.no_grad():
        layer, head = USELESS
        model.encoder.layer[layer].attention.output.dense.weight[:, head * 8 : (head + 1) * 8] = 0
    return method_context(model, [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(2)], seed=seed)


@pytest.mark.parametrize("name, options", [("heads.a_star", {}), ("heads.importance", {}), ("heads.importance", {"score": "taylor"})])
def test_the_useless_head_goes_first(name, options):
    method = get_method(name)
    result = method.fn(context(), method.target(heads_count=1), method.options(**options))
    layer, head = USELESS
    assert result.plan == [surgery.KeepHeads({layer: [h for h in range(4) if h != head]})]


def test_a_star_stats_and_plan_size():
    method = get_method("heads.a_star")
    result = method.fn(context(), method.target(heads_fraction=0.5), method.options(max_evaluations=30))
    [op] = result.plan
    kept = sum(len(v) for v in op.keep.values()) + 4 * (3 - len(op.keep))
    assert kept == 6
    assert result.stats["heads_removed"] == 6 and result.stats["search_evaluations"] >= 1
    assert result.stats["loss_increase"] >= 0


def test_random_is_seeded():
    method = get_method("heads.random")
    a = method.fn(context(seed=1), method.target(heads_count=5), method.options())
    b = method.fn(context(seed=1), method.target(heads_count=5), method.options())
    c = method.fn(context(seed=2), method.target(heads_count=5), method.options())
    assert a.plan == b.plan != c.plan


def test_count_target_validation():
    target = get_method("heads.importance").target
    with pytest.raises(ValueError, match="exactly one"):
        target(heads_fraction=0.5, heads_count=3)
