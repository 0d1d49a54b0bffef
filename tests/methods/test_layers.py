"""layers.drop: top, every-other and speedup-priced dropping, greedy removal by measured damage and by
representation similarity (both checked against physical removal), and LayerDrop training (distill)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModel
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.prune.pipeline import run_step
from shrink.train.objectives import choose_objective, objective_loss

from helpers import method_context, sharp, tiny_config, tiny_inputs, write_model_and_data


def context(arch="bert", layers=4):
    """A tiny model with `layers` layers (four make the greedy order meaningful)."""
    torch.manual_seed(0)
    depth = {"n_layers": layers} if arch == "distilbert" else {"num_hidden_layers": layers}
    model = AutoModel.from_config(tiny_config(arch, **depth)).eval()
    return method_context(model, [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(2)])


def step(ctx, target, **options):
    method = get_method("layers.drop")
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def test_top_strategy_drops_the_top_layers():
    ctx = context(layers=4)
    result = step(ctx, {"layers_count": 2}, strategy="top")
    assert result.stats["removed_layers"] == [2, 3]
    assert surgery.original_layer_ids(ctx.model) == [0, 1]


def greedy_removal(model, score, rounds: int = 2):
    """The reference of the greedy strategies: each round physically removes (surgery) the layer
    whose removal leaves the highest score(trial model). Returns the layers left and [(removed, score)]."""
    model, present, removed = copy.deepcopy(model), list(range(len(surgery.layers_of(model)))), []
    for _ in range(rounds):
        scores = {}
        for layer in present:
            trial = copy.deepcopy(model)
            surgery.drop_layers(trial, [present.index(layer)])
            scores[layer] = score(trial)
        best = max(scores, key=scores.get)
        surgery.drop_layers(model, [present.index(best)])
        present.remove(best)
        removed.append((best, scores[best]))
    return present, removed


@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_importance_is_greedy_by_the_loss_of_physical_removal(arch):
    ctx = context(arch, layers=4)
    batches, teacher = ctx.calibration, ctx.teacher
    # the reference: greedy with physical removal (surgery), two rounds
    present, expected = greedy_removal(ctx.model, lambda trial: -objective_loss(trial, choose_objective(trial, teacher, False), batches))
    expected = [(layer, -loss) for layer, loss in expected]
    result = step(ctx, {"layers_count": 2}, strategy="importance")
    assert [r["removed"] for r in result.stats["rounds"]] == [layer for layer, _ in expected]
    for got, (_, loss) in zip(result.stats["rounds"], expected):
        assert got["loss"] == pytest.approx(loss, abs=1e-5)  # a zero layer gate is exactly removal
    assert surgery.original_layer_ids(ctx.model) == present


def gram_cka(x, y):
    """Linear CKA the textbook way (Kornblith et al. 2019): HSIC of the centred n x n Gram matrices."""
    x, y = x.double(), y.double()
    centre = torch.eye(len(x), dtype=torch.float64) - 1.0 / len(x)
    k, l = centre @ x @ x.T @ centre, centre @ y @ y.T @ centre
    return float((k * l).sum() / (k.norm() * l.norm()))


def final_rows(model, batches, features):
    """The dense reference's rows: unpadded tokens' final hidden states, or each example's mean of them."""
    rows = []
    with torch.no_grad():
        for b in batches:
            hidden, mask = model(**b).last_hidden_state, b["attention_mask"].bool()
            rows.append(hidden[mask] if features == "tokens" else torch.stack([h[m].mean(0) for h, m in zip(hidden, mask)]))
    return torch.cat(rows)


@pytest.mark.parametrize("arch, features", [("bert", "tokens"), ("distilbert", "tokens"), ("bert", "mean")])
def test_similarity_is_greedy_by_the_cka_of_physical_removal(arch, features):
    ctx = context(arch, layers=4)
    sharp(ctx.model, 4.0)  # tiny random layers barely move the residual stream; sharpened, CKA tells them apart
    batches = ctx.calibration
    dense = final_rows(ctx.model, batches, features)
    # the reference: greedy with physical removal (surgery), CKA against the dense model, two rounds
    present, expected = greedy_removal(ctx.model, lambda trial: gram_cka(dense, final_rows(trial, batches, features)))
    result = step(ctx, {"layers_count": 2}, strategy="similarity", features=features)
    assert [r["removed"] for r in result.stats["rounds"]] == [layer for layer, _ in expected]
    for got, (_, cka) in zip(result.stats["rounds"], expected):
        assert got["cka"] == pytest.approx(cka, abs=1e-5)  # streamed CKA of gated layers = CKA of removal
    assert surgery.original_layer_ids(ctx.model) == present


def test_removing_every_layer_is_refused():
    with pytest.raises(BadInputError, match="leave none"):
        step(context(layers=3), {"layers_count": 3})


def test_layer_drop_recipe_end_to_end(tmp_path):
    root = write_model_and_data(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "prune", str(root / "model"), "--recipe", "layer-drop", "--data", str(root / "data.txt"), "-o", str(out),
        "--set", "steps.1.options.max_steps=2", "--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert (report["before"]["num_layers"], report["after"]["num_layers"]) == (3, 1)  # round(0.5 * 3) = 2 go


@pytest.mark.parametrize("count, kept", [(1, [0, 1, 2, 3, 4]), (2, [0, 1, 2, 4]), (3, [0, 2, 4]), (4, [0, 2])])
def test_every_other_strategy_removes_alternate_layers_from_the_top(count, kept):
    ctx = context(layers=6)
    step(ctx, {"layers_count": count}, strategy="every_other")
    assert surgery.original_layer_ids(ctx.model) == kept


def distill_step(ctx, **options):
    method = get_method("distill")
    result, _ = run_step(ctx, method, method.options(**options), method.target())
    return result


def test_layerdrop_bypasses_layers_only_while_training(monkeypatch):
    from shrink.surgery.gates import Gates

    seen = []
    original = Gates._layer_hook

    def spy(self, i):
        hook = original(self, i)

        def recording(*args, **kwargs):
            if i == 0:
                seen.append(None if self.layers is None else self.layers.clone())
            return hook(*args, **kwargs)

        return recording

    monkeypatch.setattr(Gates, "_layer_hook", spy)
    ctx = context(layers=4)
    steps = distill_step(ctx, epochs=4, layerdrop=0.5).stats["distill"]["steps"]
    sampled = [g for g in seen if g is not None]
    assert steps == 4 * len(ctx.calibration) and len(seen) == len(sampled) == steps  # one mask per training pass
    assert any((g == 0).any() for g in sampled) and all(g.sum() >= 1 for g in sampled)
    assert len(surgery.layers_of(ctx.model)) == 4  # nothing removed; the final model has every layer


def test_layerdrop_zero_trains_exactly_as_before():
    plain, dropped = context(layers=3), context(layers=3)
    distill_step(plain, max_steps=3)
    distill_step(dropped, max_steps=3, layerdrop=0.0)
    for a, b in zip(plain.model.parameters(), dropped.model.parameters()):
        assert torch.equal(a, b)


def test_speedup_target_removes_the_fewest_layers_that_reach_it(monkeypatch):
    from shrink.methods.l0.hard_concrete import LinearCost

    cost = LinearCost("latency_ms", base=1.0, att_fixed=0.5, per_head=1.0, ffn_fixed=0.5, per_neuron=0.1)
    monkeypatch.setattr("shrink.methods.layers.latency_cost", lambda model: (cost, {"fake": True}))
    ctx = context(layers=4)  # a layer costs 0.5 + 4 + 0.5 + 3.7 = 8.7 ms, the model 35.8 ms
    result = step(ctx, {"speedup": 1.9})  # 2 layers left: 18.4 ms, 1.95x; 3 left: 27.1 ms, 1.32x
    assert surgery.original_layer_ids(ctx.model) == [0, 1]
    assert result.stats["predicted_speedup"] == pytest.approx(35.8 / 18.4, abs=1e-3)
    with pytest.raises(BadInputError, match="cannot reach a 10.0x speedup"):
        step(context(layers=4), {"speedup": 10})


def test_target_takes_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of layers_count, layers_fraction, speedup"):
        get_method("layers.drop").target(layers_count=1, speedup=2)
