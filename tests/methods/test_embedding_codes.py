"""Word embeddings as compositional codes (embedding.codes) and binary codes (embedding.binary):
learning, storage dtypes and shapes, exact reload (shrink and trust_remote_code), ONNX parity,
chaining with head pruning, bad options."""

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
from shrink.methods.embedding.binary import learn_binary, pack_bits
from shrink.methods.embedding.codes import (
    add_frequent_tier,
    learn_codes,
    learn_product,
    row_weights,
    token_counts,
    weighted_error,
)
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.surgery.runtime import (
    BinaryEmbedding,
    CodeEmbedding,
    TieredCodeEmbedding,
    byte_bits_table,
)

from helpers import (
    REMOTE,
    assert_exit,
    main_output,
    tiny_inputs,
    tiny_model,
    write_model_and_data,
)

runner = CliRunner()


def structured_table(rows: int = 300, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Rows with low-rank structure plus noise, like real embeddings (random rows are incompressible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, generator=g) @ torch.randn(4, dim, generator=g) + 0.3 * torch.randn(rows, dim, generator=g)


def coded(model, kind="codes", **kw):
    """Install learned codes into a tiny model's word embeddings (as the pipeline does)."""
    table = surgery.word_embeddings_of(model).weight
    weights = torch.ones(table.shape[0])
    product = kw.pop("layout", "additive") == "product"
    layout = {"layout": "product"} if product else {}  # older manifests have no layout: additive
    if kind == "codes" and product:
        M, K = kw.pop("M", 4), kw.pop("K", 8)
        state, _ = learn_product(table, weights, M, K, iterations=5, progress=False)
        spec = {"codebooks": M, "codebook_size": K, **layout}
    elif kind == "codes":
        M, K = kw.pop("M", 4), kw.pop("K", 8)
        state, _ = learn_codes(table, weights, M, K, steps=60, progress=False, **kw)
        spec = {"codebooks": M, "codebook_size": K, "code_dim": kw.get("code_dim") or table.shape[1], "linear": kw.get("linear", False)}
    elif kind == "tiered_codes":
        counts = torch.arange(table.shape[0], dtype=torch.float64) % 7  # some tokens unseen
        M, E = (4, 8) if product else (2, 3)
        learn = {"iterations": 5} if product else {"steps": 40}
        state, _ = (learn_product if product else learn_codes)(table, weights, M, 8, progress=False, **learn)
        state, stats = add_frequent_tier(table, weights, counts, state, 20, E, 8, product, progress=False, **learn)
        spec = {"codebooks": M, "codebook_size": 8, "extra_codebooks": E, "frequent_tokens": stats["frequent_tokens"], **layout}
    else:
        state, _ = learn_binary(table, weights, kw.get("bits", 16), steps=60, progress=False)
        spec = {"bits": kw.get("bits", 16)}
    surgery.install_word_embeddings(model, kind, spec, state)
    return model


def test_reconstruction_improves_with_codebooks_and_size():
    table, weights = structured_table(), torch.ones(300)
    errors = [learn_codes(table, weights, M, K, steps=80, progress=False, seed=0)[1]["error"] for M, K in [(1, 4), (2, 8), (4, 16), (8, 32)]]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0], errors


def test_product_reconstruction_improves_with_codebooks_and_size():
    table, weights = structured_table(), torch.ones(300)
    errors = [learn_product(table, weights, M, K, progress=False)[1]["error"] for M, K in [(1, 4), (2, 8), (4, 16), (8, 64)]]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.2 * errors[0], errors


def test_product_codes_beat_additive_codes_of_the_same_bytes():
    """4 uint8 product codes of 256 values vs 4 uint8 additive codes of 16 (the Gumbel layout's usual K)."""
    table, weights = structured_table(rows=2000, dim=16), torch.ones(2000)
    product = learn_product(table, weights, 4, 256, progress=False)[1]["error"]
    additive = learn_codes(table, weights, 4, 16, steps=200, progress=False)[1]["error"]
    assert product < 0.7 * additive, (product, additive)


def test_product_codes_weigh_frequent_rows():
    table = structured_table()
    heavy = torch.ones(300)
    heavy[:30] = 50.0

    def first_rows_error(weights):  # 32 centroids per slice: room for the 30 heavy rows when they count
        state, _ = learn_product(table, weights, 2, 32, progress=False)
        module = CodeEmbedding(300, 16, 2, 32, product=True)
        module.load_state_dict(state)
        with torch.no_grad():
            return weighted_error(table[:30], module(torch.arange(30)), torch.ones(30))

    assert first_rows_error(heavy) < 0.3 * first_rows_error(torch.ones(300))


def test_product_tier_for_frequent_tokens_reduces_their_error():
    table, weights = structured_table(), torch.ones(300)
    counts = torch.zeros(300, dtype=torch.float64)
    counts[100:130] = torch.arange(30, 0, -1).double()
    state, _ = learn_product(table, weights, 2, 8, progress=False)
    tiered, stats = add_frequent_tier(table, weights, counts, state, 10, 8, 8, True, progress=False)
    assert stats["frequent_error_after"] < 0.5 * stats["frequent_error_before"]
    assert tiered["extra_books"].shape == (8 * 8, 2)  # 8 slices of 16 / 8 dims
    module = TieredCodeEmbedding(300, 16, 2, 8, extra_codebooks=8, frequent_tokens=10, product=True)
    module.load_state_dict(tiered)
    with torch.no_grad():
        assert weighted_error(table[100:110], module(torch.arange(100, 110)), torch.ones(10)) == pytest.approx(stats["frequent_error_after"], rel=1e-3)


def test_product_codes_need_codebooks_that_divide_the_dimensions():
    with pytest.raises(ValueError, match="divide the embedding size 16"):
        learn_product(structured_table(), torch.ones(300), 3, 8, progress=False)
    with pytest.raises(ValueError, match="no linear"):
        CodeEmbedding(10, 16, 4, 8, linear=True, product=True)


def test_refit_never_worse_than_the_autoencoder_decoder():
    _, stats = learn_codes(structured_table(), torch.ones(300), 4, 8, steps=100, progress=False)
    assert stats["error"] <= stats["error_autoencoder"] + 1e-6
    _, stats = learn_binary(structured_table(), torch.ones(300), 16, steps=100, progress=False)
    assert stats["error"] <= stats["error_autoencoder"] + 1e-6


def test_frequent_rows_are_reconstructed_better():
    table = structured_table()
    heavy = torch.ones(300)
    heavy[:30] = 50.0
    state_flat, _ = learn_codes(table, torch.ones(300), 2, 4, steps=150, progress=False)
    state_heavy, _ = learn_codes(table, heavy, 2, 4, steps=150, progress=False)

    def first_rows_error(state):
        module = CodeEmbedding(300, 16, 2, 4)
        module.load_state_dict(state)
        with torch.no_grad():
            return weighted_error(table[:30], module(torch.arange(30)), torch.ones(30))

    assert first_rows_error(state_heavy) < first_rows_error(state_flat)


def test_extra_codes_for_frequent_tokens_reduce_their_error():
    table, weights = structured_table(), torch.ones(300)
    counts = torch.zeros(300, dtype=torch.float64)
    counts[100:130] = torch.arange(30, 0, -1).double()  # 30 tokens seen; the 10 most frequent are 100..109
    state, _ = learn_codes(table, weights, 2, 8, steps=80, progress=False)
    tiered, stats = add_frequent_tier(table, weights, counts, state, 10, 4, 8, steps=80, progress=False)
    assert stats["frequent_tokens"] == 10 and stats["frequent_error_after"] < 0.8 * stats["frequent_error_before"]
    assert tiered["extra_row"][100:110].tolist() == list(range(10)) and (tiered["extra_row"][:100] == 10).all()
    assert tiered["extra_codes"].shape == (11, 4) and tiered["extra_books"].shape == (4 * 8, 16)
    module = TieredCodeEmbedding(300, 16, 2, 8, extra_codebooks=4, frequent_tokens=10)
    module.load_state_dict(tiered)
    base = CodeEmbedding(300, 16, 2, 8)
    base.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(module(torch.arange(100)), base(torch.arange(100)))  # others: base codes only
        assert weighted_error(table[100:110], module(torch.arange(100, 110)), torch.ones(10)) == pytest.approx(stats["frequent_error_after"], rel=1e-3)


def test_token_counts_ignore_padding_and_weights_stay_positive():
    batch = {"input_ids": torch.tensor([[5, 6, 6, 0], [6, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    counts = token_counts([batch], 10)
    assert counts[6] == 3 and counts[5] == 1 and counts[0] == 0
    weights = row_weights(counts, 1.0)
    assert (weights >= 1).all() and weights[6] > weights[5] > weights[0]


@pytest.mark.parametrize("K, dtype", [(16, torch.uint8), (256, torch.uint8), (300, torch.int16)])
def test_codes_dtype_and_shapes(K, dtype):
    state, _ = learn_codes(structured_table(rows=40), torch.ones(40), 3, K, steps=5, progress=False)
    assert state["codes"].dtype == dtype and state["codes"].shape == (40, 3)
    assert int(state["codes"].max()) < K and state["codebooks"].shape == (3 * K, 16)
    state, _ = learn_codes(structured_table(rows=40), torch.ones(40), 3, K, code_dim=4, linear=True, steps=5, progress=False)
    assert state["codebooks"].shape == (3 * K, 4) and state["proj.weight"].shape == (16, 4)


def test_code_embedding_is_the_sum_of_codebook_rows():
    module = CodeEmbedding(5, 3, num_codebooks=2, codebook_size=4)
    with torch.no_grad():
        module.codebooks.copy_(torch.arange(24, dtype=torch.float32).view(8, 3))
        module.codes.copy_(torch.tensor([[0, 0], [1, 3], [2, 1], [3, 2], [0, 3]], dtype=torch.uint8))
    out = module(torch.tensor([[1, 4]]))
    expected = torch.stack([module.codebooks[1] + module.codebooks[4 + 3], module.codebooks[0] + module.codebooks[4 + 3]])
    assert torch.equal(out[0], expected)


def test_product_code_embedding_concatenates_codebook_slices():
    module = CodeEmbedding(5, 4, num_codebooks=2, codebook_size=3, product=True)
    assert module.codebooks.shape == (6, 2)
    with torch.no_grad():
        module.codebooks.copy_(torch.arange(12, dtype=torch.float32).view(6, 2))
        module.codes.copy_(torch.tensor([[0, 0], [1, 2], [2, 1], [0, 2], [2, 2]], dtype=torch.uint8))
    out = module(torch.tensor([1, 3]))
    assert torch.equal(out, torch.stack([torch.cat([module.codebooks[1], module.codebooks[3 + 2]]),
                                         torch.cat([module.codebooks[0], module.codebooks[3 + 2]])]))


def test_bits_pack_and_unpack_exactly():
    bits = (torch.rand(7, 24, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    module = BinaryEmbedding(7, 4, 24)
    with torch.no_grad():
        module.packed.copy_(pack_bits(bits))
        module.bit_table.copy_(byte_bits_table())
    assert pack_bits(bits).dtype == torch.uint8 and pack_bits(bits).shape == (7, 3)
    assert torch.equal(module.unpacked(torch.arange(7)), bits)


CASES = [("codes", {}), ("codes", {"K": 300, "code_dim": 8, "linear": True}), ("binary", {}), ("tiered_codes", {}),
         ("codes", {"layout": "product", "K": 256}), ("tiered_codes", {"layout": "product"})]


@pytest.mark.parametrize("kind, kw", CASES)
@pytest.mark.parametrize("arch", ["bert", "distilbert"])
def test_reload_is_bit_exact_and_onnx_matches(kind, kw, arch, tmp_path):
    model = coded(tiny_model(arch, task="seq"), kind, **dict(kw))
    surgery.prune_heads(model, {0: [1, 3]})
    inputs = tiny_inputs(model)
    out = save_slim(model, tmp_path / "slim")
    reloaded = load_model(str(out))
    for (name, a), (name_b, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(reloaded(**inputs)))
    report = export_onnx(model, tmp_path / "m.onnx")
    assert max(report["max_abs_diff"].values()) <= 1e-4


def test_trust_remote_code_rebuilds_codes_and_bits(tmp_path):
    """One subprocess (importing transformers is the slow part) loads both checkpoints without shrink."""
    expected = {}
    for kind, kw in (CASES[0], CASES[2]):
        model = coded(tiny_model("bert", task="seq"), kind, **dict(kw))
        inputs = tiny_inputs(model)
        out = save_slim(model, tmp_path / kind)
        torch.save(inputs, out / "inputs.pt")
        with torch.no_grad():
            expected[kind] = main_output(model(**inputs))
    script = f"import sys\nfor path in sys.argv[3:]:\n    sys.argv[1] = path\n    exec({REMOTE!r})"
    result = subprocess.run(
        [sys.executable, "-c", script, "-", "AutoModelForSequenceClassification", *(str(tmp_path / k) for k in expected)],
        capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for kind, want in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / kind / "remote_out.pt"), want, atol=1e-6, rtol=0)


def test_second_embedding_replacement_is_refused():
    model = coded(tiny_model("bert"))
    with pytest.raises(BadInputError, match="already replaced"):
        surgery.install_word_embeddings(model, "binary", {"bits": 8}, {})


# --- the recipes through `shrink prune` -------------------------------------------------------------

FAST_CODES = [  # the recipe's 32 + 96 product codes do not divide the tiny model's 32 dimensions
    "--set", "embedding-codes.steps.0.options.iterations=3", "--set", "embedding-codes.steps.0.options.codebooks=4",
    "--set", "embedding-codes.steps.0.options.extra_codebooks=8", "--set", "embedding-codes.steps.0.options.frequent_tokens=5",
    "--set", "embedding-codes.steps.0.options.codebook_size=8", "--set", "embedding-codes.steps.1.options.max_steps=2"]
FAST_HEADS = [
    "--set", "heads-a-star.steps.0.target={heads_count: 4}", "--set", "heads-a-star.steps.0.options.calibration_samples=8",
    "--set", "heads-a-star.steps.0.options.max_evaluations=10", "--set", "heads-a-star.steps.1.options.max_steps=1",
]
FAST_BINARY = ["--set", "steps.0.options.steps=20", "--set", "steps.0.options.bits=16", "--set", "steps.1.options.max_steps=1"]
COMMON = ["--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_model_and_data(tmp_path_factory.mktemp("codes"))


def prune(setup, out, recipes, *extra):
    args = ["prune", str(setup / "model"), "--data", str(setup / "data.txt"), "-o", str(out), *COMMON]
    for recipe in recipes:
        args += ["--recipe", recipe]
    return runner.invoke(app, [*args, *map(str, extra)])


def test_chains_after_head_pruning(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", ["heads-a-star", "embedding-codes"], *FAST_HEADS, *FAST_CODES, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert sum(report["after"]["heads_per_layer"]) == 12 - 4
    stats = report["steps"][2]["stats"]
    assert stats["bytes_after"] < stats["bytes_before"] and 0 < stats["tokens_seen"] <= 99
    slim = load_model(str(tmp_path / "slim"))
    assert isinstance(surgery.word_embeddings_of(slim), CodeEmbedding)
    assert [op["op"] for op in slim.config.shrink["ops"]][-1] == "embedding"


@pytest.mark.parametrize("recipe", ["embedding-codes", "embedding-binary"])
def test_tokens_are_counted_on_the_whole_calibration_split(setup, tmp_path, recipe):
    seen = []
    for count in ([], ["--set", "steps.0.options.count_samples=4"]):
        fast = [a.replace("embedding-codes.", "") for a in FAST_CODES] if recipe == "embedding-codes" else FAST_BINARY
        result = prune(setup, tmp_path / f"slim{len(count)}", [recipe], *fast, *count, "--max-samples", "4", "--json")
        assert result.exit_code == 0, result.output
        seen.append(json.loads(result.stdout)["steps"][0]["stats"]["tokens_seen"])
    assert seen[0] > seen[1] > 0, seen  # default: every calibration example, not only the 4 used for training


@pytest.mark.parametrize("layout", ["product", "additive"])
def test_adaptive_codes_through_prune(setup, tmp_path, layout):
    fast = [*FAST_CODES, "--set", f"steps.0.options.layout={layout}", "--set", "steps.0.options.steps=30"]
    result = prune(setup, tmp_path / "slim", ["embedding-codes"], *(a.replace("embedding-codes.", "") for a in fast), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"][0]["stats"]["adaptive"]["frequent_tokens"] == 5
    module = surgery.word_embeddings_of(load_model(str(tmp_path / "slim")))
    assert isinstance(module, TieredCodeEmbedding) and int((module.extra_row < 5).sum()) == 5
    assert module.product == (layout == "product")


def test_binary_recipe_runs(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", ["embedding-binary"], *FAST_BINARY)
    assert result.exit_code == 0, result.output
    assert isinstance(surgery.word_embeddings_of(load_model(str(tmp_path / "slim"))), BinaryEmbedding)


@pytest.mark.parametrize("recipes, override, message", [
    (["embedding-codes"], "steps.0.options.codebooks=0", "codebooks"),
    (["embedding-codes"], "steps.0.options.code_dim=8", "has no linear map"),
    (["embedding-codes"], "steps.0.options={layout: additive, code_dim: 8}", "needs linear: true"),
    (["embedding-codes"], "steps.0.options.codebooks=5", "divide the hidden size 32; 5 does not"),
    (["embedding-codes"], "steps.0.options.codebook_size=1", "codebook_size"),
    (["embedding-binary"], "steps.0.options.bits=12", "multiple of 8"),
    (["embedding-codes"], "steps.0.options={frequent_tokens: 5, linear: true, code_dim: 8}", "does not combine"),
])
def test_bad_options_exit_2(setup, tmp_path, recipes, override, message):
    assert_exit(prune(setup, tmp_path / "o", recipes, "--set", override), 2, message)
    assert not (tmp_path / "o").exists()


def test_two_embedding_recipes_exit_2(setup, tmp_path):
    result = prune(setup, tmp_path / "o", ["embedding-codes", "embedding-binary"], *FAST_CODES)
    assert_exit(result, 2, "already replaced")
