"""heads.importance iterative (Michel et al. 2019) and its normalisation, Scheduled DropHead in distill
(Zhou et al. 2020), and heads.cascade (a static SpAtten-style cascade, Wang et al. 2021), on tiny models."""

from __future__ import annotations

import copy
import itertools
from typing import ClassVar

import pytest
import torch
import transformers as T
from pydantic import ValidationError

from shrink import surgery
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.methods.distill import DistillOptions, DropHeadOptions, HeadDropper, drophead_rate
from shrink.methods.heads import cascade as cascade_module
from shrink.methods.heads import importance as importance_module
from shrink.methods.heads.cascade import removal_schedule
from shrink.surgery import runtime
from shrink.surgery.gates import Gates

from helpers import ARCHITECTURES, labeled_method_context, main_output, method_context, sharp, tiny_config, tiny_inputs, tiny_model

TOTAL = 12  # tiny models: 3 layers x 4 heads


def run(name: str, ctx, target: dict, options: dict):
    method = get_method(name)
    result = method.fn(ctx, method.target(**target), method.options(**options))
    surgery.apply(ctx.model, result.plan)
    return result


def labeled(dominant: int | None = None):
    """A labeled tiny classifier (the task loss has real gradients at the unpruned model). With
    `dominant`: the other layers' attention output projections scaled by 0.02, so that layer's
    gradient importances are an order of magnitude above theirs."""
    model = sharp(tiny_model("bert", task="seq"))
    if dominant is not None:
        with torch.no_grad():
            for i, layer in enumerate(model.bert.encoder.layer):
                if i != dominant:
                    layer.attention.output.dense.weight.mul_(0.02)
    return labeled_method_context(model)


def original_kept(model) -> dict[int, list[int]]:
    """Layer -> the original ids of the heads the model still has (from its manifest)."""
    manifest, ids = surgery.manifest_of(model), surgery.original_layer_ids(model)
    return {layer: runtime.kept_head_ids(manifest, ids[layer], model.config.num_attention_heads) for layer in range(len(ids))}


# --- heads.importance: one shot is what it was, iterations, normalisation ----------------------------


def reference_one_shot(ctx, n_remove: int, per_layer: bool) -> list:
    """The one-shot method written out from scratch: |dL/dgate| at gates 1, summed over the
    calibration batches weighted by their size, L2 per layer or raw, the n lowest removed."""
    model = ctx.model
    counts = surgery.heads_per_layer(model)
    gates_ = [torch.ones(n, requires_grad=True) for n in counts]
    totals = [torch.zeros(n) for n in counts]
    with Gates(model) as gates:
        gates.heads = gates_
        for batch in ctx.calibration:
            with torch.no_grad():
                targets = ctx.objective.targets(batch)
            grads = torch.autograd.grad(ctx.objective(model, batch, targets), gates_)
            for total, grad in zip(totals, grads):
                total += grad * batch["input_ids"].shape[0]
    scores = [t.abs() for t in totals]
    if per_layer:
        scores = [s / s.norm().clamp_min(1e-12) for s in scores]
    ranked = sorted((float(s), layer, h) for layer, row in enumerate(scores) for h, s in enumerate(row))
    gone = [(layer, h) for _, layer, h in ranked[:n_remove]]
    keep = {layer: [h for h in range(n) if (layer, h) not in gone] for layer, n in enumerate(counts) if any(l == layer for l, _ in gone)}
    return [surgery.KeepHeads(keep)]


@pytest.mark.parametrize("options", [{}, {"iterations": 1}, {"iterations": 1, "normalize": "layer"}, {"normalize_per_layer": False}, {"normalize": "none"}])
def test_one_iteration_is_the_one_shot_plan(options):
    method = get_method("heads.importance")
    result = method.fn(labeled(), method.target(heads_count=5), method.options(**options))
    per_layer = method.options(**options).per_layer()
    assert result.plan == reference_one_shot(labeled(), 5, per_layer)
    assert set(result.stats) == {"heads_before", "heads_removed", "calibration_samples"}  # the one-shot stats, nothing added


@pytest.mark.parametrize("iterations, remove", [(2, 6), (3, 5), (4, 6), (5, 3)])
def test_iterations_remove_exactly_the_target_in_rounds(iterations, remove):
    ctx = labeled()
    result = run("heads.importance", ctx, {"heads_count": remove}, {"iterations": iterations})
    stats = result.stats
    assert sum(surgery.heads_per_layer(ctx.model)) == TOTAL - remove
    rounds = min(iterations, remove)
    assert stats["iterations"] == rounds and len(stats["rounds"]) == rounds and sum(stats["round_sizes"]) == remove
    assert max(stats["round_sizes"]) - min(stats["round_sizes"]) <= 1
    removed = [tuple(pair) for r in stats["rounds"] for pair in r["removed"]]  # original positions
    assert len(set(removed)) == remove
    kept = original_kept(ctx.model)  # what the manifest says is left, in original ids
    assert {(layer, h) for layer in range(3) for h in range(4) if h not in kept[layer]} == set(removed)
    assert stats["kept_per_layer"] == surgery.heads_per_layer(ctx.model)
    replayed = tiny_model("bert", task="seq")  # every round is in the manifest
    runtime.apply_manifest(replayed, copy.deepcopy(surgery.manifest_of(ctx.model)))
    assert surgery.heads_per_layer(replayed) == surgery.heads_per_layer(ctx.model)


def test_each_round_is_scored_on_the_model_the_last_one_left(monkeypatch):
    seen = []
    real = importance_module.gradient_importance

    def spy(ctx, batches):
        seen.append(sum(surgery.heads_per_layer(ctx.model)))
        return real(ctx, batches)

    monkeypatch.setattr(importance_module, "gradient_importance", spy)
    run("heads.importance", labeled(), {"heads_count": 6}, {"iterations": 3})
    assert seen == [12, 10, 8]  # physically smaller each round, not a gated copy


def test_recovery_trains_between_rounds_and_is_seeded():
    def once(seed):
        ctx = labeled()
        ctx.seed = seed
        result = run("heads.importance", ctx, {"heads_count": 6}, {"iterations": 3, "recovery_steps": 2, "recovery_lr": 1e-3})
        return result, ctx.model

    a, model_a = once(0)
    b, model_b = once(0)
    assert [r.get("recovery", {}).get("steps") for r in a.stats["rounds"]] == [2, 2, None]  # none after the last round
    assert a.stats == {**b.stats, "seconds": a.stats["seconds"]} and a.plan == b.plan
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    ctx = labeled()
    untrained = run("heads.importance", ctx, {"heads_count": 6}, {"iterations": 3})
    assert "recovery" not in untrained.stats["rounds"][0]
    assert sum(surgery.heads_per_layer(model_a)) == TOTAL - 6


def test_layer_normalisation_changes_the_ranking_when_one_layer_dominates():
    plans = {}
    for normalize in ("none", "layer"):
        ctx = labeled(dominant=1)
        run("heads.importance", ctx, {"heads_count": 4}, {"normalize": normalize})
        plans[normalize] = surgery.heads_per_layer(ctx.model)
    assert plans["none"][1] == 4  # raw scores: the dominant layer keeps every head, the others pay
    assert plans["layer"][1] < 4  # per-layer L2: every layer competes on its own scale
    assert plans["none"] != plans["layer"]


def test_normalize_and_normalize_per_layer_must_agree():
    options = get_method("heads.importance").options
    assert options(normalize="none", normalize_per_layer=False).per_layer() is False
    assert options(normalize="none").per_layer() is False and options().per_layer() is True
    with pytest.raises(ValidationError, match="contradicts"):
        options(normalize="layer", normalize_per_layer=False)


# --- Scheduled DropHead in distill -------------------------------------------------------------------


def test_drophead_schedule_values():
    assert [round(drophead_rate(s, 11, 0.1), 6) for s in range(11)] == [0.1, 0.08, 0.06, 0.04, 0.02, 0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    assert drophead_rate(0, 10, 0.2) == pytest.approx(0.2) and drophead_rate(9, 10, 0.2) == pytest.approx(0.2)
    assert min(drophead_rate(s, 10, 0.2) for s in range(10)) == pytest.approx(0.2 / 9)  # the middle falls between two steps
    assert {drophead_rate(s, 7, 0.3, "constant") for s in range(7)} == {0.3}
    assert drophead_rate(0, 1, 0.3) == 0.3


def distill(ctx, **options):
    method = get_method("distill")
    return method.fn(ctx, method.target(), method.options(max_steps=4, epochs=2, lr=1e-3, **options))


def test_drophead_off_and_p_zero_train_exactly_as_without():
    base = tiny_model("bert")
    runs = {}
    for name, extra in {"without": {}, "p0": {"drophead": {"p": 0.0}}, "p0-constant": {"drophead": {"p": 0.0, "schedule": "constant"}}}.items():
        ctx = method_context(copy.deepcopy(base))
        result = distill(ctx, **extra)
        runs[name] = (result.stats["distill"]["losses"], ctx.model.state_dict())
    losses, state = runs["without"]
    for name in ("p0", "p0-constant"):
        assert runs[name][0] == losses
        assert all(torch.equal(state[k], v) for k, v in runs[name][1].items())
    assert DistillOptions().drophead is None


class Recorder(HeadDropper):
    """HeadDropper that records, per model call, the gates it left and whether training had armed it."""

    calls: ClassVar[list] = []

    def draw(self, module, args, kwargs):
        out = super().draw(module, args, kwargs)
        Recorder.calls.append((self.armed, [None if g is None else g.clone() for g in self.gates.heads]))
        return out


def test_drophead_drops_whole_heads_per_sample_while_training_only(monkeypatch):
    import shrink.methods.distill as distill_module

    Recorder.calls = []
    monkeypatch.setattr(distill_module, "HeadDropper", Recorder)
    ctx = method_context(tiny_model("bert"))
    ctx.calibration = ctx.calibration * 4  # 12 batches: early stopping evaluates on batch 0 and 10
    result = distill(ctx, drophead={"p": 0.5, "schedule": "constant"}, early_stop_patience=5)
    armed = [gates for is_armed, gates in Recorder.calls if is_armed]
    idle = [gates for is_armed, gates in Recorder.calls if not is_armed]
    assert len(armed) == 4 and idle  # the training passes, and the evaluations (before, during, after)
    assert all(g is None for gates in idle for g in gates)  # evaluations see every head
    zeros = 0
    for gates in armed:
        for g in gates:
            assert g.shape == (4, 4)  # per sample
            kept = (g > 0).sum(dim=1)
            assert (kept >= 1).all()
            assert torch.allclose(g[g > 0], (4 / kept.float()).repeat_interleave(kept))  # N / kept
            zeros += int((g == 0).sum())
    assert zeros > 0
    summary = result.stats["distill"]["drophead"]
    assert summary["p"] == 0.5 and 0.2 < summary["dropped_fraction"] < 0.8
    # no hooks are left behind: the trained model runs as a plain model
    assert not ctx.model._forward_pre_hooks and not ctx.model.encoder.layer[0].attention.output.dense._forward_pre_hooks
    assert result.stats["distill"]["steps"] == 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_drophead_gates_heads_on_every_family_and_then_steps_aside(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(model, batch=3)
    with torch.no_grad():
        expected = main_output(model(**inputs))
    with Gates(model) as gates:
        dropper = HeadDropper(model, gates, DropHeadOptions(p=0.6, schedule="constant"), seed=0, total=10)
        dropper.before_step(0)
        with torch.no_grad():
            dropped = main_output(model(**inputs))
        assert all(g.shape == (3, 4) for g in gates.heads) and any(bool((g == 0).any()) for g in gates.heads)
        assert not torch.allclose(dropped, expected)
        dropper.after_step(1, 10)
        with torch.no_grad():
            assert torch.equal(main_output(model(**inputs)), expected)  # disarmed: exactly the ungated model
        dropper.remove()


def test_drophead_is_seeded_and_rejected_where_it_would_be_ignored():
    def dropped(seed):
        model = tiny_model("bert")
        with Gates(model) as gates:
            dropper = HeadDropper(model, gates, DropHeadOptions(p=0.5), seed=seed, total=3)
            dropper.before_step(0)
            model(**tiny_inputs(model, batch=4))
            return [g.clone() for g in gates.heads]

    assert all(torch.equal(a, b) for a, b in zip(dropped(1), dropped(1)))
    assert not all(torch.equal(a, b) for a, b in zip(dropped(1), dropped(2)))
    with pytest.raises(ValidationError, match="distill step only"):
        get_method("weights.magnitude").options(drophead={"p": 0.1})
    with pytest.raises(ValidationError):
        DistillOptions(drophead={"p": 1.0})
    with pytest.raises(ValidationError):
        DistillOptions(drophead={"p": 0.1, "schedule": "w"})


# --- heads.cascade -----------------------------------------------------------------------------------


def deep_context(layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = T.BertModel(tiny_config("bert", num_hidden_layers=layers)).eval()
    return method_context(model, seed=seed)


@pytest.mark.parametrize("counts, n, power", [([4] * 6, 12, 1.0), ([4] * 6, 23, 1.0), ([12] * 12, 72, 1.0), ([4] * 3, 5, 2.0),
                                              ([4] * 6, 1, 1.0), ([4] * 6, 24, 1.0), ([4, 0, 4, 4], 5, 1.0)])
def test_removal_schedule_sums_to_the_target_and_grows_with_depth(counts, n, power):
    removal = removal_schedule(counts, n, power)
    assert sum(removal) == n
    assert all(0 <= r <= c for r, c in zip(removal, counts))
    with_heads = [r for r, c in zip(removal, counts) if c]
    assert with_heads == sorted(with_heads)
    assert removal_schedule([4] * 6, 12, 0.0) == [2] * 6  # power 0: uniform
    with pytest.raises(BadInputError):
        removal_schedule([4, 4], 9)


@pytest.mark.parametrize("cascade", ["index", "layer"])
@pytest.mark.parametrize("remove", [1, 7, 12, 23])
def test_cascade_removes_exactly_the_target_deeper_layers_keeping_fewer(cascade, remove):
    ctx = deep_context()
    result = run("heads.cascade", ctx, {"heads_count": remove}, {"cascade": cascade})
    counts = surgery.heads_per_layer(ctx.model)
    assert sum(counts) == 24 - remove == sum(result.stats["kept_per_layer"])
    assert counts == result.stats["kept_per_layer"] == sorted(counts, reverse=True)  # deeper layers keep fewer
    if remove >= 6:
        assert counts[0] > counts[-1]
    if cascade == "index":  # a head index removed in one layer is gone from every later layer
        kept = [set(result.stats["kept"][str(layer)]) for layer in range(6)]
        assert all(later <= earlier for earlier, later in itertools.pairwise(kept))
    ctx.model(**tiny_inputs(ctx.model))


def test_cascade_scores_each_layer_with_the_earlier_removals_in_place(monkeypatch):
    seen = []
    real = cascade_module.head_magnitudes

    def spy(ctx, batches, gates, layer):
        seen.append((layer, [None if g is None else g.tolist() for g in gates.heads]))
        return real(ctx, batches, gates, layer)

    monkeypatch.setattr(cascade_module, "head_magnitudes", spy)
    result = run("heads.cascade", deep_context(4), {"heads_count": 8}, {})
    assert [layer for layer, _ in seen] == [0, 1, 2, 3]
    for layer, gates in seen:
        assert all(g is None for g in gates[layer:])
        for earlier in range(layer):
            kept = result.stats["kept"][str(earlier)]
            assert gates[earlier] == [1.0 if h in kept else 0.0 for h in range(4)]


def test_a_silent_head_goes_first_and_stays_gone_with_the_index_cascade():
    ctx = deep_context(4)
    with torch.no_grad():  # head 2 of layer 0 outputs zeros: its value rows are zero
        value = ctx.model.encoder.layer[0].attention.self.value
        value.weight[16:24] = 0
        value.bias[16:24] = 0
    result = run("heads.cascade", ctx, {"heads_count": 4}, {"depth_power": 0})
    assert result.stats["removed_per_layer"] == [1, 1, 1, 1]
    assert all(2 not in result.stats["kept"][str(layer)] for layer in range(4))
    layer_mode = run("heads.cascade", deep_context(4), {"heads_count": 4}, {"cascade": "layer", "depth_power": 0})
    assert 2 in layer_mode.stats["kept"]["1"] or 2 in layer_mode.stats["kept"]["2"] or 2 in layer_mode.stats["kept"]["3"]


def test_cascade_is_deterministic_and_index_refuses_uneven_layers():
    a = run("heads.cascade", deep_context(), {"heads_fraction": 0.5}, {})
    b = run("heads.cascade", deep_context(), {"heads_fraction": 0.5}, {})
    assert a.plan == b.plan and a.stats["kept"] == b.stats["kept"]
    ctx = deep_context(3)
    surgery.apply(ctx.model, [surgery.KeepHeads({1: [0, 1]})])
    with pytest.raises(BadInputError, match="same number of heads"):
        run("heads.cascade", ctx, {"heads_count": 3}, {})
    result = run("heads.cascade", ctx, {"heads_count": 3}, {"cascade": "layer"})
    assert sum(surgery.heads_per_layer(ctx.model)) == 10 - 3
    assert result.stats["kept_per_layer"] == surgery.heads_per_layer(ctx.model)
