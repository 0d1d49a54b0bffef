"""L0 structured pruning (shrink.methods.l0.method, shrink.methods.l0.hard_concrete, shrink.methods.l0.latency_table) on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.methods.l0.hard_concrete import L0Gates, keep_probability, sample
from shrink.methods.l0.method import (
    L0Options,
    flops_cost,
    fold_gates,
    params_cost,
    train_gates,
)
from shrink.models.hub import load_model
from shrink.surgery.gates import Gates

from helpers import ARCHITECTURES, assert_exit, tiny_model, write_model_and_data

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
    heads, blocks, _ = gates.final_values(cost, 0.4)
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
    head_values, blocks, _ = gates.final_values(flops_cost(model, 16), 0.5)
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
    heads, blocks, _ = gates.final_values(params_cost(model), 0.99)
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
