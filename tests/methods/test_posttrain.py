"""posttrain (Kwon et al. 2022): per-example Fisher of unit gates, a budgeted mask search, within-layer
rearrangement and least-squares mask tuning folded into the weights by ScaleUnits."""

from __future__ import annotations

import copy

import pytest
import torch

from shrink import surgery
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.methods.l0.hard_concrete import LinearCost
from shrink.methods.posttrain import fisher, model_output, rearrange, search
from shrink.models.slim import load_slim, save_slim
from shrink.prune.pipeline import run_step
from shrink.prune.recipe import load_recipe, validated
from shrink.surgery import KeepFFN, KeepHeads, runtime
from shrink.surgery.gates import Gates
from shrink.surgery.plan import ScaleUnits

from helpers import labeled_method_context, main_output, method_context, sharp, tiny_inputs, tiny_model


def labeled_context():
    """A tiny classifier with labels: the objective is the task loss (Kwon's empirical Fisher)."""
    return labeled_method_context(sharp(tiny_model("bert", "seq")), labels=(0, 1, 2), length=8)


def step(ctx, target, **options):
    method = get_method("posttrain")
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def fake_cost(monkeypatch, base=2.0, per_head=1.0, per_neuron=0.1):
    cost = LinearCost("latency_ms", base=base, att_fixed=0.5, per_head=per_head, ffn_fixed=0.5, per_neuron=per_neuron)
    monkeypatch.setattr("shrink.methods.posttrain.latency_cost", lambda model, seq_len, threads, rounds: (cost, {"coefficients_ms": {}, "p50_ms": {}, "cached": None}))
    return cost


def one_example(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def test_fisher_is_the_sum_of_squared_per_example_gate_gradients():
    ctx = labeled_context()
    info = fisher(ctx, ctx.calibration)
    # the reference: one example at a time, its own loss, one gate vector per unit kind
    heads, ffn = torch.zeros(4, dtype=torch.float64), torch.zeros(37, dtype=torch.float64)
    block = torch.zeros(4, 4, dtype=torch.float64)
    for batch in ctx.calibration:
        for i in range(batch["input_ids"].shape[0]):
            example = one_example(batch, i)
            head_gate, ffn_gate = torch.ones(4, requires_grad=True), torch.ones(37, requires_grad=True)
            with Gates(ctx.model) as gates:
                gates.heads[1], gates.ffn[2] = head_gate, ffn_gate
                loss = ctx.objective(ctx.model, example, ctx.objective.targets(example))
            g_head, g_ffn = (g.double() for g in torch.autograd.grad(loss, [head_gate, ffn_gate]))
            heads += g_head**2
            ffn += g_ffn**2
            block += torch.outer(g_head, g_head)
    assert torch.allclose(info["heads"][1], heads, rtol=1e-4, atol=1e-10)
    assert torch.allclose(info["ffn"][2], ffn, rtol=1e-4, atol=1e-10)
    assert torch.allclose(info["head_blocks"][1], block, rtol=1e-4, atol=1e-10)
    assert torch.allclose(info["head_blocks"][1].diagonal(), info["heads"][1])


def test_without_labels_the_fisher_projects_the_output_at_random():
    """A distillation loss has no gradient at gates 1; the surrogate <v_i, f(x_i)> does, per example."""
    ctx = method_context(sharp(tiny_model("bert")))
    info = fisher(ctx, ctx.calibration, blocks=False)
    assert all(s.sum() > 0 for s in info["heads"] + info["ffn"])
    generator, expected = torch.Generator().manual_seed(ctx.seed), torch.zeros(4, dtype=torch.float64)
    for batch in ctx.calibration:
        with torch.no_grad():
            probe = torch.randn(model_output(ctx.model, batch).shape, generator=generator)
        for i in range(batch["input_ids"].shape[0]):
            gate = torch.ones(4, requires_grad=True)
            with Gates(ctx.model) as gates:
                gates.heads[0] = gate
                loss = (probe[i:i + 1] * model_output(ctx.model, one_example(batch, i))).sum()
            expected += torch.autograd.grad(loss, gate)[0].double() ** 2
    assert torch.allclose(info["heads"][0], expected, rtol=1e-4)


def test_search_keeps_the_most_fisher_within_the_budget():
    cost = LinearCost("ms", base=1.0, att_fixed=0.0, per_head=1.0, ffn_fixed=0.0, per_neuron=0.25)
    heads = [torch.tensor([9.0, 1.0]), torch.tensor([0.5, 8.0])]
    ffn = [torch.tensor([3.0, 2.0, 0.1]), torch.tensor([0.2, 2.5, 0.3])]
    found = search(heads, ffn, cost, budget=1.0 + 2 * 1.0 + 2 * 0.25)
    # two heads + two neurons (9 + 8 + 3 + 2.5) beat one head + six neurons and three heads + none
    assert [m.tolist() for m in found["heads"]] == [[True, False], [False, True]]
    assert [m.tolist() for m in found["ffn"]] == [[True, False, False], [False, True, False]]
    assert found["cost"] <= 3.5
    assert search(heads, ffn, cost, budget=0.5) is None


def test_speedup_target_respects_the_measured_budget(monkeypatch):
    cost = fake_cost(monkeypatch)
    ctx = method_context(sharp(tiny_model("bert")))
    dense = cost.of_counts([4] * 3, [37] * 3)
    result = step(ctx, {"speedup": 1.8}, rearrange=False, tune=False)
    heads, ffn = surgery.heads_per_layer(ctx.model), surgery.ffn_per_layer(ctx.model)
    assert (heads, ffn) == (result.stats["heads_per_layer"], result.stats["ffn_per_layer"])
    spent = cost.of_counts(heads, ffn)
    assert spent <= dense / 1.8
    assert result.stats["predicted_speedup"] == pytest.approx(dense / spent, abs=1e-3)
    # maximal: one more neuron in a layer that still has its FFN would break the budget
    assert spent + cost.per_neuron > dense / 1.8 or all(n in (0, 37) for n in ffn)


def test_an_unreachable_speedup_is_one_clear_error(monkeypatch):
    fake_cost(monkeypatch, base=10.0)
    with pytest.raises(BadInputError, match=r"posttrain cannot reach a 50.0x speedup: removing every head and FFN neuron leaves 3\.61x"):
        step(method_context(tiny_model("bert")), {"speedup": 50})


def test_rearrangement_never_raises_the_block_fisher_loss():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(40, 12, generator=g, dtype=torch.float64)
    block = grads.T @ grads
    mask = torch.tensor([True] * 5 + [False] * 7)
    new, swaps, before, after = rearrange(mask, block, max_swaps=50)
    assert int(new.sum()) == 5 and after <= before and swaps > 0
    z = (~new).double()
    assert after == pytest.approx(float(z @ block @ z))
    # a local optimum: no single swap lowers it further
    for i in (~new).nonzero().flatten():
        for j in new.nonzero().flatten():
            trial = new.clone()
            trial[i], trial[j] = True, False
            zt = (~trial).double()
            assert float(zt @ block @ zt) >= after - 1e-9


def pre_norm(model, batch, position: int) -> dict:
    """The LayerNorm inputs (residual + sub-layer output) of layer `position`, real tokens only."""
    adapter, layer = surgery.adapter_of(model), surgery.layers_of(model)[position]
    store, handles = {}, []
    for kind, inp, out in (("attention", adapter.query, adapter.attention_out), ("ffn", adapter.ffn_in, adapter.ffn_out)):
        handles.append(runtime.get_module(layer, inp).register_forward_pre_hook(lambda m, a, k=kind: store.__setitem__(k + "in", a[0])))
        handles.append(runtime.get_module(layer, out).register_forward_hook(lambda m, a, o, k=kind: store.__setitem__(k + "out", o)))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    mask = batch["attention_mask"].bool()
    return {k: (store[k + "in"] + store[k + "out"])[mask] for k in ("attention", "ffn")}


def test_mask_tuning_lowers_every_sublayer_error_and_the_plan_equals_the_scaled_gates(tmp_path):
    ctx = method_context(sharp(tiny_model("bert")))
    dense, inputs = copy.deepcopy(ctx.model), tiny_inputs(ctx.model)
    result = step(ctx, {"params_fraction": 0.5}, calibration_samples=12)
    scale, keep_heads, keep_ffn = result.plan[0], result.plan[1], result.plan[2]
    assert [type(op) for op in result.plan] == [ScaleUnits, KeepHeads, KeepFFN]
    for entry in result.stats["tuning"]:
        for kind in ("attention", "ffn"):
            if kind in entry:
                assert entry[kind]["error_after"] <= entry[kind]["error_before"] + 1e-9
    assert any(entry[k]["error_after"] < 0.9 * entry[k]["error_before"] for entry in result.stats["tuning"] for k in ("attention", "ffn") if k in entry)

    # the reference: the dense model with gates = mask x scale
    def gates_of(scales, keep, n):
        values = []
        for i in range(3):
            g = torch.tensor(scales.get(i, [1.0] * n))
            if i in keep:
                g = g * torch.isin(torch.arange(n), torch.tensor(keep[i], dtype=torch.long)).float()
            values.append(g)
        return values

    with Gates(dense) as gates, torch.no_grad():
        gates.heads = gates_of(scale.heads, keep_heads.keep, 4)
        gates.ffn = gates_of(scale.ffn, keep_ffn.keep, 37)
        reference = main_output(dense(**inputs))
        unscaled = copy.deepcopy(gates.heads), copy.deepcopy(gates.ffn)
    with torch.no_grad():
        assert torch.allclose(main_output(ctx.model(**inputs)), reference, atol=1e-5)

    # layer 0 sees the same input with or without tuning: the scaled sub-layers are closer to the dense ones
    errors = {"tuned": 0.0, "untuned": 0.0}
    for batch in ctx.calibration:
        target = pre_norm(dense, batch, 0)
        for name, scaled in (("tuned", True), ("untuned", False)):
            with Gates(dense) as gates:
                heads, ffn = unscaled
                gates.heads = [h if scaled else (h != 0).float() for h in heads]
                gates.ffn = [f if scaled else (f != 0).float() for f in ffn]
                got = pre_norm(dense, batch, 0)
            errors[name] += float(((got["attention"] - target["attention"]) ** 2).sum())
    assert errors["tuned"] <= errors["untuned"]
    if 0 in keep_heads.keep:  # heads were removed in layer 0: tuning has something to fix
        assert errors["tuned"] < errors["untuned"]

    reloaded = load_slim(save_slim(ctx.model, tmp_path / "slim"))
    with torch.no_grad():
        assert torch.equal(main_output(reloaded(**inputs)), main_output(ctx.model(**inputs)))


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet"])
def test_scale_units_changes_the_weights_and_the_slim_checkpoint_reloads_exactly(arch, tmp_path):
    model = tiny_model(arch)
    gated, inputs = copy.deepcopy(model), tiny_inputs(model)
    adapter = surgery.adapter_of(model)
    out = runtime.get_module(surgery.layers_of(model)[1], adapter.attention_out)
    before = out.weight.detach().clone()
    heads, ffn = [2.0, -0.5, 1.0, 3.0], [0.5 + j / 37 for j in range(37)]
    surgery.apply(model, [ScaleUnits(heads={1: heads}, ffn={2: ffn}), KeepHeads({1: [0, 3]}), KeepFFN({2: list(range(0, 37, 2))})])
    assert torch.equal(out.weight, out.weight)  # a handle on the pre-surgery module
    assert torch.allclose(out.weight, before * torch.tensor(heads).repeat_interleave(8)[None, :])
    assert [op["op"] for op in surgery.manifest_of(model)["ops"]] == ["heads", "ffn"]  # scales are weights, not structure

    with Gates(gated) as gates, torch.no_grad():
        gates.heads[1] = torch.tensor(heads) * torch.tensor([1.0, 0.0, 0.0, 1.0])
        gates.ffn[2] = torch.tensor(ffn) * (torch.arange(37) % 2 == 0).float()
        expected = main_output(gated(**inputs))
    with torch.no_grad():
        got = main_output(model(**inputs))
    assert torch.allclose(got, expected, atol=1e-5)
    reloaded = load_slim(save_slim(model, tmp_path / "slim"))
    with torch.no_grad():
        assert torch.equal(main_output(reloaded(**inputs)), got)


def test_scale_units_with_the_wrong_count_is_refused():
    with pytest.raises(BadInputError, match="layer 0 has 4 heads, got 2 factors"):
        surgery.apply(tiny_model("bert"), [ScaleUnits(heads={0: [1.0, 2.0]})])


def test_a_layer_may_lose_every_unit(monkeypatch):
    """A cheap FFN and costly heads: the search removes whole attention sub-layers."""
    fake_cost(monkeypatch, per_head=5.0, per_neuron=0.01)
    ctx = method_context(sharp(tiny_model("distilbert")))
    step(ctx, {"speedup": 3.0}, calibration_samples=12)
    assert 0 in surgery.heads_per_layer(ctx.model)
    with torch.no_grad():
        ctx.model(**tiny_inputs(ctx.model))


def test_recipes_and_target_validation():
    for name, speedup in (("posttrain", 2.0), ("posttrain-1.5x", 1.5)):
        recipe = load_recipe(name)
        method, options, target = validated(recipe.steps[0])
        assert (method.name, target.speedup, options.calibration_samples, options.tune) == ("posttrain", speedup, 1024, False)
    method = get_method("posttrain")
    with pytest.raises(ValueError, match="exactly one of speedup, params_fraction"):
        method.target(speedup=2, params_fraction=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        method.target()
