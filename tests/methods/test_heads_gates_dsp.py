"""heads.gates (Voita et al. 2019: hard-concrete gates, L0 penalty) and heads.dsp (Li et al. 2021:
Gumbel-soft-top-K) on tiny models: how many heads they keep, their stats, schedules and relaxations."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pydantic import ValidationError

from shrink import surgery
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.methods.heads.dsp import soft_top_k, temperature_at
from shrink.methods.heads.gates import fold_head_values, split_layers, top_k_heads
from shrink.surgery.gates import Gates

from helpers import main_output, method_context, sharp, tiny_inputs, tiny_model

TOTAL = 12  # tiny models: 3 layers x 4 heads
FAST = {"max_steps": 40, "epochs": 100}  # 3 calibration batches, so many epochs


def context(seed: int = 0, arch: str = "bert"):
    return method_context(sharp(tiny_model(arch)), seed=seed)  # sharp: the losses react to the gates


def run(name: str, target: dict, options: dict, ctx=None):
    method = get_method(name)
    ctx = ctx or context()
    result = method.fn(ctx, method.target(**target), method.options(**options))
    surgery.apply(ctx.model, result.plan)
    return result, ctx


def kept_heads(model) -> int:
    return sum(surgery.heads_per_layer(model))


# --- heads.gates ------------------------------------------------------------------------------------


def test_gates_with_penalty_zero_and_no_target_keep_every_head_and_the_stats_are_sane():
    result, ctx = run("heads.gates", {}, {**FAST, "penalty": 0.0, "gate_lr": 0.3})
    stats = result.stats
    assert result.plan == [] and kept_heads(ctx.model) == TOTAL
    assert stats["heads_kept"] == TOTAL and stats["heads_removed"] == 0 and stats["kept_per_layer"] == [4, 4, 4]
    assert stats["decided_by"].startswith("penalty") and stats["steps"] == 40
    probability = stats["gate_probability"]
    assert 0 <= probability["min"] <= probability["mean"] <= probability["max"] <= 1
    assert len(probability["per_layer_mean"]) == 3
    assert stats["open_at_test_values"] == TOTAL and stats["removed_although_open"] == 0
    assert 0 < stats["expected_open_heads"]["end"] <= TOTAL
    assert stats["log"][0]["step"] == 0 and stats["log"][-1]["step"] == 39 and stats["seconds"] >= 0
    assert stats["loss_last"] < stats["loss_first"]  # the weights and gates learned something


@pytest.mark.parametrize("remove", [1, 5, 11])
def test_gates_with_a_target_keep_exactly_that_many(remove):
    result, ctx = run("heads.gates", {"heads_count": remove}, {**FAST, "gate_lr": 0.3, "fold_gates": remove == 5})
    assert result.stats["gates_folded"] == (remove == 5)
    assert kept_heads(ctx.model) == TOTAL - remove == result.stats["heads_kept"]
    assert sum(result.stats["kept_per_layer"]) == TOTAL - remove
    assert result.stats["decided_by"] == "Lagrangian + top-K" and len(result.stats["lambda"]) == 2
    ctx.model(**tiny_inputs(ctx.model))  # the slim model runs (layers may be headless)


def test_gates_target_by_fraction_with_a_penalty_uses_the_penalty_then_top_k():
    result, ctx = run("heads.gates", {"heads_fraction": 0.5}, {**FAST, "penalty": 0.01})
    assert kept_heads(ctx.model) == 6 and result.stats["decided_by"] == "penalty + top-K" and "lambda" not in result.stats


def test_a_larger_penalty_keeps_fewer_heads():
    kept = []
    for penalty in (0.0, 0.05, 1.0):
        result, _ = run("heads.gates", {}, {**FAST, "penalty": penalty, "gate_lr": 0.3})
        kept.append(result.stats["heads_kept"])
    assert kept[0] >= kept[1] >= kept[2] and kept[0] > kept[2], kept
    assert kept[0] == TOTAL


def test_gates_need_a_target_or_a_penalty_and_respect_the_floor_per_layer():
    with pytest.raises(BadInputError, match="how many heads"):
        run("heads.gates", {}, FAST)
    with pytest.raises(BadInputError, match="min_heads_per_layer"):
        run("heads.gates", {"heads_count": 11}, {**FAST, "min_heads_per_layer": 1})
    _, ctx = run("heads.gates", {"heads_count": 9}, {**FAST, "min_heads_per_layer": 1})
    assert surgery.heads_per_layer(ctx.model) == [1, 1, 1]
    _, ctx = run("heads.gates", {}, {**FAST, "penalty": 1.0, "gate_lr": 0.3, "min_heads_per_layer": 2})
    assert surgery.heads_per_layer(ctx.model) == [2, 2, 2]
    with pytest.raises(ValidationError, match="at most one"):
        get_method("heads.gates").target(heads_count=2, heads_fraction=0.5)


def test_gates_with_frozen_weights_change_no_weight_and_give_requires_grad_back():
    ctx = context()
    before = copy.deepcopy(ctx.model.state_dict())
    result, _ = run("heads.gates", {"heads_count": 4}, {**FAST, "train_model": False, "fold_gates": False}, ctx)
    assert result.stats["train_model"] is False
    kept = {k for k in ctx.model.state_dict()}
    unchanged = [k for k in kept if "attention" not in k]  # the attention projections were sliced by the plan
    assert all(torch.equal(ctx.model.state_dict()[k], before[k]) for k in unchanged)
    assert all(p.requires_grad for p in ctx.model.parameters())


def test_gates_are_seeded():
    a, _ = run("heads.gates", {"heads_count": 5}, FAST, context(seed=1))
    b, _ = run("heads.gates", {"heads_count": 5}, FAST, context(seed=1))
    assert a.plan == b.plan and a.stats["gate_probability"] == b.stats["gate_probability"]


@pytest.mark.parametrize("arch", ["bert", "distilbert", "electra"])
def test_folding_head_values_equals_gating_the_heads(arch):
    model = tiny_model(arch)
    values = torch.rand(TOTAL, generator=torch.Generator().manual_seed(0))
    values[3] = 1.0
    inputs = tiny_inputs(model)
    with Gates(model) as gates, torch.no_grad():
        gates.heads = split_layers(values, surgery.heads_per_layer(model))
        gated = main_output(model(**inputs))
    fold_head_values(model, split_layers(values, surgery.heads_per_layer(model)))
    with torch.no_grad():
        folded = main_output(model(**inputs))
    torch.testing.assert_close(folded, gated, rtol=1e-5, atol=1e-5)


def test_top_k_heads_is_global_and_keeps_the_floor():
    scores = torch.tensor([5.0, 4, 3, 2, -1, -2, -3, -4, 1, 0, 0.5, 0.2])
    assert top_k_heads(scores, [4, 4, 4], 5) == [[0, 1, 2, 3], [], [0]]  # layer 1 loses every head
    assert top_k_heads(scores, [4, 4, 4], 5, min_per_layer=1) == [[0, 1, 2], [0], [0]]
    assert top_k_heads(scores[:8], [4, 0, 4], 2) == [[0, 1], [], []]  # a layer already headless
    with pytest.raises(BadInputError):
        top_k_heads(scores, [4, 4, 4], 2, min_per_layer=1)


# --- heads.dsp --------------------------------------------------------------------------------------


@pytest.mark.parametrize("remove, mode", [(1, "pipeline"), (6, "pipeline"), (6, "joint"), (11, "pipeline")])
def test_dsp_keeps_exactly_k_heads(remove, mode):
    result, ctx = run("heads.dsp", {"heads_count": remove}, {**FAST, "mode": mode})
    assert kept_heads(ctx.model) == TOTAL - remove == result.stats["heads_kept"] == sum(result.stats["kept_per_layer"])
    if remove == 11:  # one head left: at least two layers lost all of theirs, and the slim model still runs
        assert len(result.stats["layers_without_heads"]) >= 2
    ctx.model(**tiny_inputs(ctx.model))
    assert result.stats["mode"] == mode and result.stats["steps"] == 40


def test_dsp_per_layer_floor_and_a_layer_that_loses_all_heads():
    result, ctx = run("heads.dsp", {"heads_count": 9}, {**FAST, "min_heads_per_layer": 1})
    assert surgery.heads_per_layer(ctx.model) == [1, 1, 1]
    # a layer whose heads do nothing is emptied by the global top-K
    model = sharp(tiny_model("bert"))
    with torch.no_grad():
        model.encoder.layer[1].attention.output.dense.weight.zero_()
    ctx = method_context(model)
    result, _ = run("heads.dsp", {"heads_count": 4}, {**FAST, "logit_lr": 0.2}, ctx)
    assert result.stats["kept_per_layer"] == [4, 0, 4] and result.stats["layers_without_heads"] == [1]
    assert surgery.heads_per_layer(ctx.model) == [4, 0, 4]


@pytest.mark.parametrize("anneal", ["exponential", "linear"])
def test_the_temperature_is_annealed_to_temperature_end(anneal):
    taus = [temperature_at(step, 50, 2.0, 0.01, anneal) for step in range(50)]
    assert taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.01)
    assert all(a > b for a, b in itertools.pairwise(taus))
    result, _ = run("heads.dsp", {"heads_count": 3}, {**FAST, "anneal": anneal, "temperature_start": 2.0, "temperature_end": 0.01})
    assert result.stats["temperature"]["last_used"] == pytest.approx(0.01)
    assert result.stats["log"][-1]["temperature"] == pytest.approx(0.01)


@pytest.mark.parametrize("k", [1, 3, 6, 11])
@pytest.mark.parametrize("temperature", [2.0, 0.5, 0.05])
def test_the_soft_top_k_mask_sums_to_k(k, temperature):
    scores = torch.randn(12, generator=torch.Generator().manual_seed(k), requires_grad=True)
    mask = soft_top_k(scores, k, temperature)
    assert float(mask.sum()) == pytest.approx(k, abs=1e-4)
    assert float(mask.min()) >= 0  # (an entry may exceed 1: the relaxation allows it, see soft_top_k)
    mask[0].backward()  # differentiable
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_the_soft_top_k_mask_tends_to_the_hard_top_k():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.9, 0.0, 1.5])
    for k in range(1, 6):
        hard = torch.zeros(6)
        hard[scores.topk(k).indices] = 1
        torch.testing.assert_close(soft_top_k(scores, k, 0.01), hard, atol=1e-3, rtol=0)
    # at temperature 1 it is the relaxation of Xie and Ermon: two heads, K = 2, scores log 3 and 0
    torch.testing.assert_close(soft_top_k(torch.tensor([torch.log(torch.tensor(3.0)), 0.0]), 2, 1.0), torch.tensor([1.25, 0.75]))


def test_dsp_pipeline_freezes_the_weights_and_joint_trains_them():
    for mode, changes in (("pipeline", False), ("joint", True)):
        ctx = context()
        ffn = copy.deepcopy(ctx.model.encoder.layer[0].intermediate.dense.weight)
        run("heads.dsp", {"heads_count": 2}, {**FAST, "mode": mode}, ctx)
        assert (not torch.equal(ctx.model.encoder.layer[0].intermediate.dense.weight, ffn)) == changes
        assert all(p.requires_grad for p in ctx.model.parameters())


def test_dsp_is_seeded_and_validates_its_temperatures():
    a, _ = run("heads.dsp", {"heads_count": 5}, FAST, context(seed=3))
    b, _ = run("heads.dsp", {"heads_count": 5}, FAST, context(seed=3))
    assert a.plan == b.plan and a.stats["logits"] == b.stats["logits"]
    with pytest.raises(ValidationError, match="temperature_end"):
        get_method("heads.dsp").options(temperature_start=0.1, temperature_end=1.0)
