"""EarlyBERT (shrink.methods.earlybert): tickets, the mask distance, the early-bird stop, rewinding."""

from __future__ import annotations

import torch
from helpers import method_context, tiny_model

from shrink import surgery
from shrink.methods.catalog import get_method
from shrink.methods.earlybert import mask_distance, ticket


def test_a_ticket_keeps_the_largest_coefficients_per_layer_or_overall():
    values = [torch.tensor([0.9, -0.1, 0.5, 0.2]), None, torch.tensor([0.05, 0.04, -0.8, 0.3])]
    assert ticket(values, 0.5, "layer") == [[0, 2], [], [2, 3]]
    assert ticket(values, 0.5, "global") == [[0, 2], [], [2, 3]]
    assert ticket(values, 0.75, "global") == [[0], [], [2]]
    assert ticket([torch.tensor([0.1, 0.2])], 0.99, "layer") == [[1]]  # a layer keeps one unit
    assert ticket([torch.tensor([0.9, 0.8]), torch.tensor([0.01, 0.02])], 0.5, "global") == [[0, 1], [1]]


def test_mask_distance_counts_units_kept_by_one_ticket_only():
    assert mask_distance([[0, 1], [2]], [[0, 1], [2]], [4, 4]) == 0
    assert mask_distance([[0, 1], [2]], [[0, 3], [2]], [4, 4]) == 2 / 8


def _run(**options):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = method_context(model)
    method = get_method("structured.earlybert")
    result = method.fn(ctx, method.target(heads_fraction=0.5, ffn_fraction=0.4), method.options(epochs=50, **options))
    return model, before, result


def test_the_search_stops_at_the_early_bird_and_the_ticket_is_removed_from_the_rewound_model():
    # a huge tolerance: the second draw always agrees closely enough
    model, before, result = _run(max_steps=50, check_every=2, tolerance=0.99, lr=1e-3)
    stats = result.stats
    assert stats["early_bird_step"] == 4 and stats["searched_steps"] == 4
    assert [d["step"] for d in stats["draws"]] == [2, 4]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # rewound
    surgery.apply(model, result.plan)
    assert surgery.heads_per_layer(model) == [2, 2, 2] and surgery.ffn_per_layer(model) == [22, 22, 22]


def test_without_an_early_bird_it_runs_to_max_steps_and_keeps_the_searched_weights():
    model, before, result = _run(max_steps=6, check_every=2, tolerance=1e-6, rewind=False, lr=1e-3, dropout=False)
    assert result.stats["early_bird_step"] is None and result.stats["searched_steps"] == 6
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_l1_penalty_pulls_the_coefficients_down_at_the_coefficient_rate():
    # dropout off at the original: the objective's gradient is ~0, so Adam steps each coefficient by
    # ~its learning rate per step against the constant L1 gradient; the rate decays linearly to 0 over
    # the 8 steps, so the coefficients fall by 0.01 * (8 + 7 + ... + 1) / 8 = 0.045
    model, _, result = _run(max_steps=8, check_every=100, dropout=False, coefficient_lr=0.01, head_penalty=0.1, ffn_penalty=0.1, warmup=0)
    for key in ("head_coefficients", "ffn_coefficients"):
        c = result.stats[key]
        assert 1 - 0.045 * 1.2 < c["min"] <= c["max"] < 1 - 0.045 * 0.8, (key, c)
    _, _, none = _run(max_steps=8, check_every=100, dropout=False, coefficient_lr=0.01, head_penalty=0, ffn_penalty=0, warmup=0)
    assert none.stats["head_coefficients"]["min"] > 1 - 0.045 * 0.3  # without the penalty they barely move
