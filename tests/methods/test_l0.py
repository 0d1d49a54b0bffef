"""L0 structured pruning (shrink.methods.l0.method, shrink.methods.l0.hard_concrete, shrink.methods.l0.latency_table) on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.measure.export import export_onnx
from shrink.methods.catalog import get_method
from shrink.methods.l0.hard_concrete import KINDS, L0Gates, LinearCost, keep_probability, sample
from shrink.methods.l0.method import (
    L0Options,
    flops_cost,
    fold_gates,
    params_cost,
    train_gates,
)
from shrink.methods.stream import gate_stream
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import run_step
from shrink.surgery.gates import Gates

from helpers import ARCHITECTURES, assert_exit, labeled_method_context, main_output, method_context, tiny_inputs, tiny_model, write_model_and_data

runner = CliRunner()


def random_batches(n: int, rows: int = 4, tokens: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(n):
        ids = torch.randint(5, 99, (rows, tokens), generator=g)
        made.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return made


def test_hard_concrete_gives_exact_zeros_and_ones_and_its_l0_matches_sampling():
    alpha = torch.tensor([-3.0, 0.0, 3.0]).repeat(20000, 1)
    z = sample(alpha)
    assert ((z == 0) | (z == 1)).float().mean() > 0.5  # the stretch-and-clip gives exact 0s and 1s
    empirical = (z > 0).float().mean(dim=0)
    assert torch.allclose(empirical, keep_probability(alpha[0]), atol=0.02)


@pytest.mark.slow  # ~5 s: 120 training steps
def test_gates_reach_the_target_on_a_toy_objective():
    model = tiny_model("bert")
    teacher = copy.deepcopy(model)
    gates = L0Gates(surgery.heads_per_layer(model), surgery.ffn_per_layer(model))
    cost = params_cost(model)
    options = L0Options(max_steps=120, epochs=1000, gate_lr=0.08, lambda_lr=0.08)
    history = train_gates(model, teacher, random_batches(4), gates, cost, 0.4, options, ["distill", "hidden_mse"], progress=False)
    assert history["start_fraction"] > 0.9
    assert abs(history["end_fraction"] - 0.4) < 0.03, history["log"][-3:]
    heads, blocks, _, _ = gates.final_values(cost, 0.4)
    kept_heads = [int((h > 0).sum()) for h in heads]
    kept_ffn = [int((f > 0).sum()) for f in gates.expand(blocks)]
    achieved = cost.of_counts(kept_heads, kept_ffn) / gates.full_cost(cost)
    assert 0.3 < achieved <= 0.4 + 1e-9


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("task", ["base", "seq"])
def test_surgery_equals_the_gated_model_at_deterministic_gates_and_reloads(model_type, task, tmp_path):
    import shrink

    model = tiny_model(model_type, task)
    heads, ffn = surgery.heads_per_layer(model), surgery.ffn_per_layer(model)
    gates = L0Gates(heads, ffn, ffn_block=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for alpha in gates.learned():
            alpha.normal_(0, 2.5)  # a mix of removed, partly open and fully open units
    head_values, blocks, _, _ = gates.final_values(flops_cost(model, 16), 0.5)
    ffn_values = gates.expand(blocks)
    assert any(0 < float(v) < 1 for h in head_values for v in h)  # fractional values get folded
    ids = torch.randint(5, 99, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    out = lambda m: m(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
    with torch.no_grad(), Gates(model) as hooks:
        hooks.heads, hooks.ffn = head_values, ffn_values
        gated = out(model)
    plan = fold_gates(model, head_values, ffn_values)
    surgery.apply(model, plan)
    assert surgery.heads_per_layer(model) == [int((h > 0).sum()) for h in head_values]
    assert surgery.ffn_per_layer(model) == [int((f > 0).sum()) for f in ffn_values]
    with torch.no_grad():
        slim = out(model)
    torch.testing.assert_close(slim, gated, atol=1e-5, rtol=0)
    shrink.save(model, tmp_path / "slim")
    with torch.no_grad():
        assert torch.equal(out(shrink.load(tmp_path / "slim")), slim)


def test_a_sublayer_gate_removes_the_whole_sublayer():
    model = tiny_model("bert")
    gates = L0Gates(surgery.heads_per_layer(model), surgery.ffn_per_layer(model))
    with torch.no_grad():
        gates.att_alpha[1].fill_(-10.0)
        gates.ffn_layer_alpha[2].fill_(-10.0)
    heads, blocks, _, _ = gates.final_values(params_cost(model), 0.99)
    plan = fold_gates(model, heads, gates.expand(blocks))
    surgery.apply(model, plan)
    assert surgery.heads_per_layer(model) == [4, 0, 4]
    assert surgery.ffn_per_layer(model) == [37, 37, 0]


# --- end to end through `shrink prune` ------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("l0"))


FAST = ["--set", "steps.0.options.max_steps=30", "--set", "steps.1.options.max_steps=2",
        "--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export"]


def prune(setup, out, recipe, *extra):
    args = ["prune", str(setup / "model"), "--recipe", recipe, "--data", str(setup / "data.txt"), "-o", str(out)]
    return runner.invoke(app, [*args, *FAST, *map(str, extra)])


def test_l0_structured_prunes_to_the_target_and_reports_it(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", "l0-structured", "--set", "steps.0.target={params_fraction: 0.5}", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stats = report["steps"][0]["stats"]
    assert stats["target_fraction"] == 0.5 and stats["achieved_fraction"] <= 0.5
    assert stats["heads_per_layer"] == report["after"]["heads_per_layer"]
    assert stats["ffn_per_layer"] == report["after"]["ffn_per_layer"]
    slim = load_model(str(tmp_path / "slim"))
    assert surgery.ffn_per_layer(slim) == stats["ffn_per_layer"]


def test_l0_ffn_touches_only_the_ffn(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", "l0-ffn", "--set", "steps.0.target.flops_fraction=0.9", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["after"]["heads_per_layer"] == [4, 4, 4]
    assert sum(report["after"]["ffn_per_layer"]) < 3 * 37
    assert report["steps"][0]["stats"]["flops_fraction"] <= 0.9


@pytest.mark.parametrize("assignment, fragments", [
    ("steps.0.target.speedup=1.0", ["steps.0.target.speedup", "greater than 1"]),
    ("steps.0.target={flops_fraction: 1.5}", ["flops_fraction", "less than 1"]),
    ("steps.0.target={params_fraction: 0}", ["params_fraction", "greater than 0"]),
    ("steps.0.target={speedup: 2, params_fraction: 0.5}", ["exactly one"]),
    ("steps.0.options.prune=[neurons]", ["steps.0.options.prune"]),
])
def test_bad_targets_exit_2(setup, tmp_path, assignment, fragments):
    assert_exit(prune(setup, tmp_path / "o", "l0-structured", "--set", assignment), 2, *fragments)


def test_an_unreachable_target_exits_2(setup, tmp_path):
    # with only the FFN gated, the attention alone is more than 5% of the FLOPs
    result = prune(setup, tmp_path / "o", "l0-ffn", "--set", "steps.0.target.flops_fraction=0.05")
    assert_exit(result, 2, "out of reach")


def test_latency_table_is_measured_once_and_cached(monkeypatch, tmp_path):
    from shrink.methods.l0.latency_table import latency_cost

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    model = tiny_model("bert")
    cost, table = latency_cost(model, seq_len=16, rounds=3)
    assert table["cached"] is None and set(table["p50_ms"]) == {"full", "half_heads", "half_ffn", "no_attention", "no_ffn"}
    assert min(cost.base, cost.att_fixed, cost.per_head, cost.ffn_fixed, cost.per_neuron) >= 0
    assert (cost.per_head_hidden, cost.per_neuron_hidden) == (cost.per_head, cost.per_neuron)  # hidden kind: units scale with r
    full = cost.of_counts(surgery.heads_per_layer(model), surgery.ffn_per_layer(model))
    assert full >= table["p50_ms"]["full"] * (1 - 1e-9)  # the fit reproduces it (more only if noise clipped the base)
    _, again = latency_cost(model, seq_len=16, rounds=3)
    assert again["cached"] and again["coefficients_ms"] == table["coefficients_ms"]


def test_l0_loss_is_the_shared_objectives_with_one_forward_pass():
    from shrink.errors import BadInputError
    from shrink.methods.l0.method import l0_objective

    seq, base = tiny_model("bert", "seq"), tiny_model("bert")
    options = L0Options(hidden_weight=0.25)
    objective = l0_objective(seq, seq, ["task", "distill", "hidden_mse"], options)
    assert objective.name == "task+logits_kl+hidden_mse" and objective.weights == [1.0, 1.0, 0.25]
    assert l0_objective(base, base, ["distill", "hidden_mse"], options).name == "embedding_cosine+embedding_relation+hidden_mse"
    assert l0_objective(base, base, ["distill", "hidden_mse"], L0Options(hidden_weight=0)).name == "embedding_cosine+embedding_relation"
    with pytest.raises(BadInputError, match="no loss left"):
        l0_objective(base, base, ["hidden_mse"], L0Options(hidden_weight=0))


# --- the hidden kind (CoFi's z_hidden: one gate vector on the residual stream) ---------------------


def labeled_context(seed: int = 0):
    return labeled_method_context(tiny_model("bert", "seq", seed=seed), batches=3, evaluation=1)


def run_l0(ctx, target: dict, **options):
    method = get_method("l0")
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def test_hidden_is_opt_in_and_validated():
    assert L0Options().prune == ["heads", "ffn", "attention_layers", "ffn_layers"]
    assert L0Options(prune=["heads", "hidden"], hidden_block=4).hidden_block == 4
    with pytest.raises(ValidationError):
        L0Options(hidden_block=0)
    with pytest.raises(ValueError, match="hidden size"):
        L0Gates([4], [37], ["hidden"])
    assert L0Gates([4], [37]).hidden_values() is None


def test_expected_cost_with_hidden_gates_is_the_hand_computation():
    """One layer, 2 heads, 3 neurons, 5 hidden dims in blocks of 2 (2, 2, 1): every per-unit cost's
    H-proportional part scales with r = E[kept hidden dims] / H; base and the sub-layer costs do not."""
    gates = L0Gates([2], [3], KINDS, ffn_block=1, hidden=5, hidden_block=2)
    values = {"head_alpha": [0.5, -1.0], "att_alpha": [2.0], "ffn_alpha": [1.0, 0.0, -2.0], "ffn_layer_alpha": [3.0]}
    with torch.no_grad():
        for name, alpha in values.items():
            getattr(gates, name)[0].copy_(torch.tensor(alpha))
        gates.hidden_alpha.copy_(torch.tensor([1.5, -0.5, 0.0]))
    cost = LinearCost("c", base=7.0, att_fixed=3.0, per_head=11.0, ffn_fixed=2.0, per_neuron=5.0, per_head_hidden=8.0, per_neuron_hidden=4.0)
    p = lambda *a: keep_probability(torch.tensor(a))  # noqa: E731
    h, a, f, layer, z = p(0.5, -1.0), p(2.0)[0], p(1.0, 0.0, -2.0), p(3.0)[0], p(1.5, -0.5, 0.0)
    r = (2 * z[0] + 2 * z[1] + 1 * z[2]) / 5
    expected = (7.0 + 3.0 * a * (1 - (1 - h[0]) * (1 - h[1])) + (11.0 - 8.0 * (1 - r)) * a * h.sum()
                + 2.0 * layer * (1 - torch.prod(1 - f)) + (5.0 - 4.0 * (1 - r)) * layer * f.sum())
    got = gates.expected_cost(cost)
    torch.testing.assert_close(got, expected)
    got.backward()
    assert gates.hidden_alpha.grad.abs().min() > 0  # the gradient reaches every hidden gate
    # at the deterministic end: r = kept dims / H in of_counts; the params coefficients match the model
    model = tiny_model("bert")
    heads, ffn = surgery.heads_per_layer(model), surgery.ffn_per_layer(model)
    params = params_cost(model)
    counted = lambda m: sum(  # noqa: E731  q, k, v (weights, biases), attention out and FFN weights, FFN-in bias
        w.numel() for n, w in m.encoder.layer.named_parameters()
        if "attention.self" in n or n.endswith("dense.weight") or "intermediate.dense.bias" in n)
    assert params.of_counts(heads, ffn) == counted(model)
    surgery.apply(model, [surgery.KeepHeads({0: [1, 3]}), surgery.KeepFFN({2: list(range(20))}), surgery.KeepHidden(list(range(0, 32, 2)))])
    assert params.of_counts(surgery.heads_per_layer(model), surgery.ffn_per_layer(model), 16 / 32) == counted(model)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_hidden_gates_fold_exactly_and_removed_dims_change_only_the_layernorm_statistics(model_type):
    for dead in ([], [3, 17, 30]):
        model = tiny_model(model_type, "seq")
        gates = L0Gates(surgery.heads_per_layer(model), surgery.ffn_per_layer(model), KINDS, 4, hidden=32)
        torch.manual_seed(1)
        with torch.no_grad():
            for alpha in gates.learned():
                alpha.uniform_(-1.5, 3.0)  # every value in (0, 1]: all folded, none removed
            gates.hidden_alpha[dead] = -10.0
        heads, ffn = gates.values("deterministic")
        hidden = gates.hidden_values("deterministic")
        assert 0 < float(hidden[hidden > 0].min()) < 1
        inputs = tiny_inputs(model)
        with torch.no_grad(), Gates(model) as hooks:
            hooks.heads, hooks.ffn = heads, ffn
            handles = gate_stream(model, lambda hidden=hidden: hidden)
            gated = main_output(model(**inputs))
            for handle in handles:
                handle.remove()
        plan = fold_gates(model, heads, ffn, hidden)
        surgery.apply(model, plan)
        with torch.no_grad():
            slim = main_output(model(**inputs))
        if not dead:
            assert plan == []
            torch.testing.assert_close(slim, gated, atol=1e-6, rtol=0)  # folding into the LayerNorms is exact
        else:
            assert plan == [surgery.KeepHidden([i for i in range(32) if i not in dead])]
            assert surgery.hidden_size(model) == 29
            difference = float((slim - gated).abs().max())
            assert 0 < difference < 0.02 * float(gated.abs().max())  # close, not equal: LayerNorms over 29 dims


def test_hidden_kind_prunes_the_stream_and_the_slim_model_reloads_and_exports(tmp_path):
    ctx = labeled_context()
    result = run_l0(ctx, {"params_fraction": 0.7}, prune=["hidden"], max_steps=8, hidden_block=2)
    stats, model = result.stats, ctx.model
    assert [type(op) for op in result.plan] == [surgery.KeepHidden]
    assert stats["hidden_before"] == 32 and stats["hidden_kept"] == len(result.plan[0].keep) == surgery.hidden_size(model)
    assert stats["heads_per_layer"] == surgery.heads_per_layer(model) == [4, 4, 4]
    assert 0.6 < stats["achieved_fraction"] <= 0.7 and stats["params_fraction"] == stats["achieved_fraction"]
    removed = stats["removed_to_meet_target"]
    assert stats["units_removed_to_meet_target"] == sum(removed.values()) == removed["hidden_blocks"]
    assert surgery.manifest_of(model)["ops"][0]["op"] == "hidden"
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = main_output(model(**inputs))
    save_slim(model, tmp_path / "slim")
    with torch.no_grad():
        assert torch.equal(main_output(load_model(str(tmp_path / "slim"))(**inputs)), expected)
    export_onnx(model, tmp_path / "model.onnx", parity_batches=[inputs])  # raises when parity fails


@pytest.mark.slow  # ~1-5 s: 120 training steps
def test_gates_with_hidden_reach_a_params_target():
    ctx = labeled_context()
    model = ctx.model
    gates = L0Gates(surgery.heads_per_layer(model), surgery.ffn_per_layer(model), KINDS, hidden=32, hidden_block=2)
    cost = params_cost(model)
    options = L0Options(prune=list(KINDS), max_steps=120, epochs=1000, gate_lr=0.08, lambda_lr=0.08)
    history = train_gates(model, ctx.teacher, ctx.calibration, gates, cost, 0.4, options, ["task", "distill"], progress=False)
    assert abs(history["end_fraction"] - 0.4) < 0.03, history["log"][-3:]
    assert float(gates.expected_hidden_fraction()) < 0.99  # the hidden gates took part
    heads, blocks, hidden, stats = gates.final_values(cost, 0.4)
    kept_heads = [int((h > 0).sum()) for h in heads]
    kept_ffn = [int((f > 0).sum()) for f in gates.expand(blocks)]
    achieved = cost.of_counts(kept_heads, kept_ffn, int((hidden > 0).sum()) / 32) / gates.full_cost(cost)
    assert 0.3 < achieved <= 0.4 + 1e-9
    assert set(stats["removed_to_meet_target"]) == {"heads", "ffn_blocks", "hidden_blocks"}


def test_hidden_on_an_embedding_model_needs_the_width_change_allowed():
    ctx = method_context(tiny_model("bert"))
    with pytest.raises(BadInputError, match="narrower"):
        run_l0(ctx, {"params_fraction": 0.8}, prune=["heads", "hidden"], max_steps=2)
    assert surgery.manifest_of(ctx.model)["ops"] == []
    result = run_l0(ctx, {"params_fraction": 0.8}, prune=["hidden"], max_steps=2, allow_embedding_width_change=True)
    assert surgery.hidden_size(ctx.model) == result.stats["hidden_kept"] < 32
