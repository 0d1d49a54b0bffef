"""LadaBERT pieces on tiny models: data-aware low rank with a global budget (lowrank.svd), gradual
magnitude pruning (weights.magnitude), their recipes, exact reload and ONNX export."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.measure.export import export_onnx
from shrink.methods import lowrank
from shrink.methods import magnitude as weight_pruning
from shrink.methods.catalog import get_method
from shrink.models.flops import model_flops
from shrink.models.slim import load_slim, save_slim
from shrink.prune.pipeline import run_step
from shrink.prune.recipe import load_recipe
from shrink.surgery.runtime import LowRankLinear

from helpers import main_output, method_context, tiny_inputs, tiny_model

runner = CliRunner()


def context(arch="bert", task="base", seed=0):
    return method_context(tiny_model(arch, task=task, seed=seed))


def step(ctx, name, target, **options):
    method = get_method(name)
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def matrix_costs(model) -> dict[str, int]:
    return {m.path: m.bias_free_cost for m in lowrank.candidates(model, list(lowrank.MODULES))}


@pytest.mark.parametrize("weighting", ["none", "diag", "whiten"])
def test_full_rank_factors_reproduce_every_matrix(weighting):
    ctx = context()
    matrices = lowrank.candidates(ctx.model, list(lowrank.MODULES))
    stats = lowrank.input_statistics(ctx.model, matrices, ctx.calibration, full=weighting == "whiten")
    for m, (moment, mean) in zip(matrices, stats):
        m.mean = mean  # centered: the bias absorbs the mean's error, which is none at full rank
        lowrank.weighted_spectrum(m, lowrank.centered(moment, mean), weighting, damping=1e-2)
        first, second, bias = lowrank.factors(m, m.max_rank)
        torch.testing.assert_close((second.double() @ first.double()).float(), m.module.weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(bias, m.module.bias, atol=1e-5, rtol=0)


def test_full_rank_factorized_model_matches(arch):
    ctx = context(arch)
    inputs = tiny_inputs(ctx.model)
    expected = main_output(ctx.model(**inputs))
    matrices = lowrank.candidates(ctx.model, list(lowrank.MODULES))
    stats = lowrank.input_statistics(ctx.model, matrices, ctx.calibration, full=True)
    for m, (moment, mean) in zip(matrices, stats):
        m.mean = mean
        lowrank.weighted_spectrum(m, lowrank.centered(moment, mean), "whiten", damping=1e-2)
        surgery.factorize_linear(ctx.model, m.path, m.max_rank, lowrank.factors(m, m.max_rank))
    torch.testing.assert_close(main_output(ctx.model(**inputs)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fraction", [0.4, 0.6, 0.8])
def test_params_budget_is_respected_and_no_matrix_gets_dearer(fraction):
    ctx = context()
    before = matrix_costs(ctx.model)
    result = step(ctx, "lowrank.svd", {"params_fraction": fraction}, rank_multiple=4)
    after = matrix_costs(ctx.model)
    assert lowrank.layer_params(ctx.model) <= fraction * lowrank.layer_params(ctx.teacher)
    assert result.stats["layer_params_after"] == lowrank.layer_params(ctx.model)
    assert all(after[p] <= before[p] for p in before)
    for m in lowrank.candidates(ctx.model, list(lowrank.MODULES)):  # factorized only where it is cheaper
        if isinstance(m.module, LowRankLinear):
            assert m.module.rank * (m.module.in_features + m.module.out_features) < m.module.in_features * m.module.out_features
            assert m.module.rank % 4 == 0


def test_flops_budget_is_respected():
    ctx = context()
    step(ctx, "lowrank.svd", {"flops_fraction": 0.75}, seq_length=64, rank_multiple=4)
    flops = lambda m: model_flops(m, 64)["attention"] + model_flops(m, 64)["ffn"]  # noqa: E731
    assert flops(ctx.model) <= 0.75 * flops(ctx.teacher)


def test_allocator_prefers_the_matrix_with_the_flat_spectrum():
    """Two matrices of one shape: rank goes where a unit of rank keeps the most energy."""
    steep = lowrank.Matrix("a", torch.nn.Linear(32, 32), torch.zeros(32, 32), 1024, 32, sigma2=torch.logspace(0, -8, 32))
    flat = lowrank.Matrix("b", torch.nn.Linear(32, 32), torch.zeros(32, 32), 1024, 32, sigma2=torch.ones(32))
    ranks = lowrank.allocate([steep, flat], budget=24 * 64, multiple=4, min_rank=4)
    assert ranks[1] > ranks[0] and sum(m.cost(r) for m, r in zip([steep, flat], ranks)) <= 24 * 64


def test_data_aware_svd_beats_plain_svd_on_skewed_inputs():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    scales = torch.ones(48)
    scales[:6] = 20.0  # a few input features carry most of the activation energy (as in real encoders)
    x = torch.randn(2000, 48) * scales
    errors = {}
    for weighting in ("none", "diag", "whiten"):
        m = lowrank.Matrix("w", linear, linear.weight.detach().double(), 48 * 40, 40)
        stats = (x.double().T @ x.double()) / len(x) if weighting == "whiten" else (x.double() ** 2).mean(dim=0)
        lowrank.weighted_spectrum(m, stats, weighting, damping=0.0)
        first, second = lowrank.factors(m, 8)
        errors[weighting] = float(((x @ (linear.weight.detach() - second @ first).T) ** 2).mean())
    assert errors["whiten"] < errors["diag"] < errors["none"]
    assert errors["whiten"] < 0.5 * errors["none"]


def test_centering_folds_the_input_mean_into_the_bias():
    """Inputs with a large mean (like post-GELU activations): centered whitening plus the bias
    correction beats whitening by the raw second moment on the layer's actual output error."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40)
    x = torch.randn(2000, 48) * torch.linspace(0.2, 3, 48) + 4.0 * torch.rand(48)
    moment, mean = (x.double().T @ x.double()) / len(x), x.double().mean(dim=0)
    errors = {}
    for center in (False, True):
        m = lowrank.Matrix("w", linear, linear.weight.detach().double(), 48 * 40, 40, mean=mean if center else None)
        lowrank.weighted_spectrum(m, lowrank.centered(moment, mean) if center else moment, "whiten", damping=0.0)
        first, second, *bias = lowrank.factors(m, 3)
        approx = x @ (second @ first).T + (bias[0] if bias else linear.bias.detach())
        errors[center] = float(((linear(x).detach() - approx) ** 2).mean())
    assert errors[True] < 0.95 * errors[False]


def test_iterated_low_rank_reloads_exactly(tmp_path):
    ctx = context(task="seq")
    step(ctx, "lowrank.svd", {"params_fraction": 0.8})
    first_ranks = {m.path: m.module.rank for m in lowrank.candidates(ctx.model, list(lowrank.MODULES)) if isinstance(m.module, LowRankLinear)}
    step(ctx, "lowrank.svd", {"params_fraction": 0.5}, rank_multiple=4)
    for m in lowrank.candidates(ctx.model, list(lowrank.MODULES)):
        if m.path in first_ranks:
            assert m.module.rank <= first_ranks[m.path]
    assert lowrank.layer_params(ctx.model) <= 0.5 * lowrank.layer_params(ctx.teacher)
    out = save_slim(ctx.model, tmp_path / "slim")
    reloaded = load_slim(out)
    inputs = tiny_inputs(ctx.model)
    assert torch.equal(main_output(reloaded(**inputs)), main_output(ctx.model(**inputs)))


def test_target_below_the_minimum_rank_is_bad_input():
    ctx = context()
    with pytest.raises(BadInputError, match="target is below"):
        step(ctx, "lowrank.svd", {"params_fraction": 0.05})


def test_cubic_schedule():
    values = [weight_pruning.cubic_sparsity(t, 100, 0.5, end=0.7) for t in range(101)]
    assert values[0] == 0 and values[70] == values[100] == 0.5
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[10] - values[0] > values[60] - values[50]  # fast first, slow near the end


def test_gradual_pruning_reaches_the_sparsity_and_reloads_exactly(tmp_path):
    ctx = context(task="seq")
    step(ctx, "lowrank.svd", {"params_fraction": 0.6})
    result = step(ctx, "weights.magnitude", {"sparsity": 0.5}, max_steps=12, prune_every=2, lr=1e-3)
    stats = result.stats
    weights = surgery.encoder_weights(ctx.model)
    for name, w in weights.items():
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name  # per matrix, exactly
    assert stats["sparsity"] == 0.5 and stats["pruned_weights_nonzero"] == stats["pruned_weights"] // 2
    assert stats["params_nonzero"] < stats["params_nonzero_before"]
    assert [s for _, s in stats["schedule"]] == sorted(s for _, s in stats["schedule"])
    assert stats["schedule"][-1][1] == 0.5 and stats["deflate_bytes"] < stats["dense_bytes"]
    out = save_slim(ctx.model, tmp_path / "slim")
    reloaded = load_slim(out)
    for (name, a), (_, b) in zip(ctx.model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_global_scope_prunes_the_total():
    ctx = context()
    step(ctx, "weights.magnitude", {"sparsity": 0.3}, max_steps=3, scope="global")
    weights = surgery.encoder_weights(ctx.model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.3 * sum(w.numel() for w in weights.values()))


def test_distill_after_pruning_keeps_the_zeros():
    ctx = context(task="seq")
    step(ctx, "weights.magnitude", {"sparsity": 0.5}, max_steps=3)
    zeros_before = {n: (w == 0).clone() for n, w in surgery.encoder_weights(ctx.model).items()}
    before = {n: w.clone() for n, w in surgery.encoder_weights(ctx.model).items()}
    step(ctx, "distill", {}, max_steps=4, lr=1e-2)
    after = surgery.encoder_weights(ctx.model)
    assert any(not torch.equal(before[n], w) for n, w in after.items())  # it did train
    for name, w in after.items():
        assert torch.equal(w == 0, zeros_before[name]), name  # the same weights are zero, no others


def test_distill_on_a_dense_model_holds_nothing():
    from shrink.methods.distill import sparsity_keeper

    assert sparsity_keeper(context().model) is None


def test_magnitude_pruning_refuses_early_stop():
    with pytest.raises(ValueError, match="early_stop_patience"):
        weight_pruning.MagnitudeOptions(early_stop_patience=2)


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet"])
def test_onnx_export_of_factorized_and_sparse_shapes(arch, tmp_path):
    ctx = context(arch, task="seq")
    step(ctx, "lowrank.svd", {"params_fraction": 0.7}, rank_multiple=4)
    surgery.prune_heads(ctx.model, {0: [1, 3]})  # slicing a factor pair's rows keeps it a pair
    step(ctx, "weights.magnitude", {"sparsity": 0.5}, max_steps=2)
    report = export_onnx(ctx.model, tmp_path / "m.onnx")
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_recipes_load():
    svd = load_recipe("svd-kd")
    assert [s.method for s in svd.steps] == ["lowrank.svd", "distill"]
    assert svd.steps[0].target["params_fraction"] == 0.5
    lada = load_recipe("lada")
    assert [s.method for s in lada.steps][-1] == "weights.magnitude"
    assert lada.steps[-1].target["sparsity"] == 0.5


@pytest.mark.parametrize("override, message", [
    ("steps.0.target.params_fraction=1.5", "params_fraction"),
    ("steps.0.target={params_fraction: 0.5, flops_fraction: 0.5}", "exactly one"),
    ("steps.0.options.weighting=svd", "weighting"),
    ("steps.0.options.modules=[query, gate]", "modules"),
])
def test_bad_low_rank_targets_exit_2(tmp_path, override, message):
    result = runner.invoke(app, ["prune", "minilm", "--recipe", "svd-kd", "--set", override, "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_sparsity_exits_2(tmp_path):
    result = runner.invoke(app, ["prune", "minilm", "--recipe", "lada", "--set", "steps.4.target.sparsity=1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "sparsity" in result.output


def test_lada_prune_end_to_end(tmp_path):
    from helpers import write_model_and_data

    write_model_and_data(tmp_path)
    args = [
        "prune", str(tmp_path / "model"), "--recipe", "lada", "--data", str(tmp_path / "data.txt"), "-o", str(tmp_path / "out"),
        "--json", "--no-export", "--max-samples", "16", "--eval-samples", "8", "--max-length", "32",
        "--set", "steps.0.target.params_fraction=0.8", "--set", "steps.2.target.params_fraction=0.6",
        "--set", "steps.1.options.max_steps=2", "--set", "steps.3.options.max_steps=2", "--set", "steps.4.options.max_steps=4",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"][2]["stats"]["layer_params_fraction"] <= 0.6
    assert report["steps"][4]["stats"]["sparsity"] == 0.5
    reloaded = load_slim(tmp_path / "out")
    assert any(isinstance(m, LowRankLinear) for m in reloaded.modules())


def test_svd_kd_on_a_labeled_classifier(tmp_path):
    """The svd-kd recipe through `shrink prune` on a sequence classifier with labeled CSV data."""
    from helpers import SENTENCES, tiny_tokenizer

    model = tiny_model("bert", task="seq", num_labels=2)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    rows = "\n".join(f"\"{s}\",{'pos' if 'sun' in s or 'cat' in s else 'neg'}" for s in SENTENCES)
    (tmp_path / "data.csv").write_text("text,label\n" + rows + "\n")
    args = [
        "prune", str(tmp_path / "model"), "--recipe", "svd-kd", "--data", str(tmp_path / "data.csv"), "--label-column", "label", "-o", str(tmp_path / "out"),
        "--json", "--no-export", "--max-samples", "24", "--eval-samples", "8", "--max-length", "32",
        "--set", "steps.0.options.rank_multiple=4", "--set", "steps.1.options.max_steps=2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["objective"] == "task" and "accuracy" in report["quality"]["after"]
    assert report["steps"][0]["stats"]["layer_params_fraction"] <= 0.5
    reloaded = load_slim(tmp_path / "out")
    assert type(reloaded).__name__ == "BertForSequenceClassification"
