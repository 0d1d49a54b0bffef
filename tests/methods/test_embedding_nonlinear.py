"""embedding.nonlinear (recipe embedding-nonlinear): reconstruction (weighted-SVD start, better than a
random decoder and than its linear start on rows with nonlinear structure), the byte target, the
distillation (only the new embeddings train, the original is put back until the plan runs), exact
reload with shrink and trust_remote_code, ONNX parity, chaining after vocab-prune, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.measure.export import export_onnx
from shrink.methods.catalog import get_method
from shrink.methods.embedding.codes import weighted_error
from shrink.methods.embedding.nonlinear import embedding_bytes, learn_nonlinear, rank_for_bytes, weighted_svd
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import run_step
from shrink.surgery.runtime import NonlinearEmbedding
from shrink.train.objectives import objective_loss

from helpers import REMOTE, assert_exit, main_output, method_context, sharp, tiny_inputs, tiny_model, write_model_and_data

runner = CliRunner()
METHOD = get_method("embedding.nonlinear")


def curved_table(rows: int = 400, dim: int = 24, seed: int = 0) -> torch.Tensor:
    """Rows on a curved 3-dimensional manifold (a nonlinear map of 3 latent values) plus a little noise:
    a rank-3 linear decomposition cannot follow the curve, a nonlinear decoder of 3-value codes can."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 3, generator=g)
    return torch.tanh(2 * z @ torch.randn(3, 16, generator=g)) @ torch.randn(16, dim, generator=g) + 0.02 * torch.randn(rows, dim, generator=g)


def errors(table, module):
    with torch.no_grad():
        return weighted_error(table, module(torch.arange(table.shape[0])), torch.ones(table.shape[0]))


def test_reconstruction_beats_a_random_decoder_and_its_linear_start():
    table = curved_table()
    module, stats = learn_nonlinear(table, torch.ones(400), 3, width=32, steps=300, lr=1e-2, progress=False)
    torch.manual_seed(1)
    random = NonlinearEmbedding(400, 24, 3, 32)
    random.codes.weight.data.copy_(module.codes.weight)  # the same codes, an untrained decoder
    assert stats["error"] < 0.7 * stats["error_linear_start"], stats
    assert stats["error"] < 0.2 * errors(table, random)
    assert errors(table, module) == pytest.approx(stats["error_unweighted"], abs=1e-5)


def test_the_start_is_the_weighted_svd():
    """No steps: the MLP adds zero, codes @ skip is the projection on the top right singular vectors."""
    table, weights = curved_table(), torch.ones(400)
    module, stats = learn_nonlinear(table, weights, 5, width=8, steps=0, progress=False)
    _, s, _ = torch.linalg.svd(table.double(), full_matrices=False)
    svd_error = float((s[5:] ** 2).sum() / (s**2).sum())  # the best rank-5 error (Eckart-Young)
    assert stats["error"] == stats["error_linear_start"] == pytest.approx(svd_error, abs=1e-4)
    heavy = torch.ones(400)
    heavy[:40] = 100.0  # weighted: the heavy rows are reconstructed better than by the plain SVD
    basis, plain = weighted_svd(table, heavy, 5), weighted_svd(table, weights, 5)
    first = table[:40]
    assert weighted_error(first, first @ basis.T @ basis, torch.ones(40)) < weighted_error(first, first @ plain.T @ plain, torch.ones(40))


@pytest.mark.parametrize("residual", [True, False])
def test_rank_for_bytes_is_the_largest_that_fits(residual):
    budget = 40_000
    r = rank_for_bytes(budget, 300, 32, 16, residual)
    assert embedding_bytes(300, 32, r, 16, residual) <= budget < embedding_bytes(300, 32, r + 1, 16, residual)
    module = NonlinearEmbedding(300, 32, r, 16, residual=residual)
    assert sum(p.numel() * 4 for p in module.parameters()) == embedding_bytes(300, 32, r, 16, residual)
    with pytest.raises(BadInputError, match="do not fit even rank 1"):
        rank_for_bytes(100, 300, 32, 16, residual)


def run(model, target=None, batches=None, **options):
    ctx = method_context(model, batches)
    fast = {"width": 8, "reconstruct_steps": 20, "distill_steps": 3} | options
    result, _ = run_step(ctx, METHOD, METHOD.options(**fast), METHOD.target(**(target or {"bytes_fraction": 0.5})))
    return ctx, result


def test_the_step_meets_its_byte_target_and_only_the_embeddings_train():
    model = sharp(tiny_model("bert"))
    encoder = {k: v.clone() for k, v in model.state_dict().items() if "word_embeddings" not in k}
    ctx, result = run(model, {"bytes": 6000})
    stats = result.stats
    module = surgery.word_embeddings_of(ctx.model)
    assert isinstance(module, NonlinearEmbedding) and module.codes.weight.shape == (99, stats["rank"])
    assert stats["bytes_after"] == sum(p.numel() * 4 for p in module.parameters()) <= 6000 == stats["bytes_budget"]
    assert stats["bytes_after"] == embedding_bytes(99, 32, stats["rank"], 8, True) and stats["bytes_before"] == 99 * 32 * 4
    assert stats["distill"]["steps"] == 3 and stats["distill"]["scope"] == "embedding"
    after = ctx.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in encoder.items())  # the encoder is frozen in scope embedding
    assert all(p.requires_grad for p in ctx.model.parameters())  # and unfrozen afterwards
    assert [op["op"] for op in surgery.manifest_of(ctx.model)["ops"]] == ["embedding"]


def test_distillation_brings_the_outputs_closer_to_the_original():
    model = sharp(tiny_model("bert"))
    batches = [tiny_inputs(model, batch=8, length=10, seed=s) for s in range(4)]
    losses = {}
    for distill in (False, True):
        ctx, _ = run(sharp(tiny_model("bert")), {"bytes_fraction": 0.3}, batches, distill=distill, distill_steps=80, distill_lr=1e-2)
        losses[distill] = objective_loss(ctx.model, ctx.objective, batches)
    assert losses[True] < 0.7 * losses[False], losses


def test_scope_all_trains_the_encoder_and_the_original_embeddings_come_back_until_the_plan_runs():
    model = sharp(tiny_model("bert"))
    ctx = method_context(model)
    query = model.encoder.layer[0].attention.self.query.weight.clone()
    options = METHOD.options(rank=10, width=8, reconstruct_steps=5, distill_steps=3, distill_lr=1e-2, distill_scope="all")
    result = METHOD.fn(ctx, METHOD.target(), options)  # the method alone: its plan not applied yet
    assert isinstance(surgery.word_embeddings_of(model), torch.nn.Embedding) and not surgery.manifest_of(model)["ops"]
    assert not torch.equal(query, model.encoder.layer[0].attention.self.query.weight)
    assert result.stats["rank"] == 10  # no target: options.rank
    surgery.apply(model, result.plan)
    assert isinstance(surgery.word_embeddings_of(model), NonlinearEmbedding)


@pytest.mark.parametrize("arch, residual, activation", [("bert", True, "gelu"), ("xlm-roberta", False, "tanh"), ("distilbert", True, "relu")])
def test_reload_is_bit_exact_and_onnx_matches(arch, residual, activation, tmp_path):
    model = tiny_model(arch, task="seq")
    ctx, _ = run(model, residual=residual, activation=activation, distill_steps=2)
    inputs = tiny_inputs(model)
    out = save_slim(model, tmp_path / "slim")
    reloaded = load_model(str(out))
    assert isinstance(surgery.word_embeddings_of(reloaded), NonlinearEmbedding)
    for (name, a), (name_b, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(reloaded(**inputs)))
    report = export_onnx(model, tmp_path / "m.onnx")
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_trust_remote_code_rebuilds_it_without_shrink(tmp_path):
    model = tiny_model("bert", task="seq")
    run(model)
    inputs = tiny_inputs(model)
    out = save_slim(model, tmp_path / "slim")
    torch.save(inputs, out / "inputs.pt")
    result = subprocess.run([sys.executable, "-c", REMOTE, str(out), "AutoModelForSequenceClassification"], capture_output=True, text=True,
                            cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out / "remote_out.pt"), model(**inputs).logits, atol=1e-6, rtol=0)


# --- through `shrink prune` -------------------------------------------------------------------------

FAST = ["--set", "embedding-nonlinear.steps.0.options.width=8", "--set", "embedding-nonlinear.steps.0.options.reconstruct_steps=10",
        "--set", "embedding-nonlinear.steps.0.options.distill_steps=2", "--set", "embedding-nonlinear.steps.0.target={bytes_fraction: 0.5}"]
COMMON = ["--max-samples", "16", "--eval-samples", "8", "--max-length", "32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("nonlinear"))


def prune(setup, out, recipes, *extra):
    args = ["prune", str(setup / "model"), "--data", str(setup / "data.txt"), "-o", str(out), *COMMON]
    for recipe in recipes:
        args += ["--recipe", recipe]
    return runner.invoke(app, [*args, *map(str, extra)])


def test_chains_after_vocab_prune(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", ["vocab-prune", "embedding-nonlinear"], *FAST, "--no-export", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    vocab, nonlinear = report["steps"][0]["stats"], report["steps"][1]["stats"]
    assert vocab["vocab_after"] < vocab["vocab_before"] == 99
    slim = load_model(str(tmp_path / "slim"))
    module = surgery.word_embeddings_of(slim)
    assert isinstance(module, NonlinearEmbedding) and module.num_embeddings == vocab["vocab_after"]
    assert nonlinear["bytes_before"] == vocab["vocab_after"] * 32 * 4 and nonlinear["bytes_after"] <= nonlinear["bytes_budget"]
    assert [op["op"] for op in slim.config.shrink["ops"]] == ["vocab", "embedding"]
    report = export_onnx(slim, tmp_path / "m.onnx")  # (the pipeline's bench needs 128 positions, the tiny model has 64)
    assert max(report["max_abs_diff"].values()) <= 1e-4


@pytest.mark.parametrize("override, message", [
    ("steps.0.target={bytes: 10, bytes_fraction: 0.5}", "at most one of bytes, bytes_fraction"),
    ("steps.0.target={bytes: 10}", "do not fit even rank 1"),
    ("steps.0.options.activation=swish", "activation"),
    ("steps.0.options.distill_scope=head", "distill_scope"),
    ("steps.0.target={} ", "rank 64 out of range (1..32)"),
])
def test_bad_input_exits_2(setup, tmp_path, override, message):
    assert_exit(prune(setup, tmp_path / "o", ["embedding-nonlinear"], "--set", override), 2, message)
    assert not (tmp_path / "o").exists()


def test_after_another_embedding_replacement_exits_2(setup, tmp_path):
    codes = ["--set", "embedding-codes.steps.0.options={layout: product, codebooks: 4, codebook_size: 8, iterations: 2, frequent_tokens: 0}",
             "--set", "embedding-codes.steps.1.options.max_steps=1"]
    assert_exit(prune(setup, tmp_path / "o", ["embedding-codes", "embedding-nonlinear"], *codes, *FAST), 2, "already replaced")


def test_vocab_prune_then_embedding_codes(setup, tmp_path):
    """Vocabulary pruning first, then product codes of the kept rows only."""
    codes = ["--set", "embedding-codes.steps.0.options={layout: product, codebooks: 4, codebook_size: 8, iterations: 2, frequent_tokens: 0}",
             "--set", "embedding-codes.steps.1.options.max_steps=1"]
    result = prune(setup, tmp_path / "slim", ["vocab-prune", "embedding-codes"], *codes, "--no-export", "--json")
    assert result.exit_code == 0, result.output
    vocab = json.loads(result.stdout)["steps"][0]["stats"]
    slim = load_model(str(tmp_path / "slim"))
    assert [op["op"] for op in slim.config.shrink["ops"]] == ["vocab", "embedding"]
    assert surgery.word_embeddings_of(slim).num_embeddings == vocab["vocab_after"] < vocab["vocab_before"]
