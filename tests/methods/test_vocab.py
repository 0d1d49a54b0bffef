"""embedding.vocab (recipe vocab-prune): the KeepVocab op (word embeddings, tied MLM decoder, config
ids), exact reload both ways, chaining with other ops, the pipeline end to end (rewritten tokenizer
saved, the student's data re-tokenized while the teacher keeps its own, held-out change stats, ONNX),
ids-only contexts, and the refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModel, AutoTokenizer, BertConfig, PreTrainedTokenizerFast
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.data.corpus import sentences
from shrink.data.examples import read_examples, split_examples
from shrink.errors import BadInputError
from shrink.measure.evaluate import evaluate
from shrink.methods.catalog import get_method
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import RenumberedBatches, run_step
from shrink.prune.recipe import load_recipe
from shrink.surgery.runtime import apply_manifest
from shrink.train.objectives import HiddenMSE, choose_objective

from helpers import REMOTE, main_output, method_context, tiny_inputs, tiny_model

runner = CliRunner()
TEXTS = sentences("bundled")


def keep_ids(size: int = 99) -> list[int]:
    return sorted({0, 1, 2, 3} | set(range(10, 80, 3)) | {size - 1})


def renumbered(ids: torch.Tensor, keep: list[int]) -> torch.Tensor:
    position = {k: i for i, k in enumerate(keep)}
    return torch.tensor([[position[i] for i in row] for row in ids.tolist()])


def kept_inputs(keep: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(keep)[torch.randint(0, len(keep), (3, 11), generator=g)]
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- the op ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["base", "seq", "mlm"])
def test_keep_vocab_is_exact_on_kept_tokens(arch, task):
    model = tiny_model(arch, task)
    original, keep = copy.deepcopy(model), keep_ids()
    surgery.apply(model, [surgery.KeepVocab(keep)])
    inputs = kept_inputs(keep)
    with torch.no_grad():
        before = main_output(original(**inputs))
        after = main_output(model(**{**inputs, "input_ids": renumbered(inputs["input_ids"], keep)}))
    if task == "mlm":  # the decoder keeps the rows (and bias) of the kept tokens, still tied
        before = before[..., keep]
        assert model.get_output_embeddings().weight is surgery.word_embeddings_of(model).weight
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert model.config.vocab_size == len(keep) == surgery.word_embeddings_of(model).num_embeddings
    assert surgery.manifest_of(model)["ops"] == [{"op": "vocab", "keep": keep}]
    assert surgery.original_token_ids(model) == keep
    replayed = tiny_model(arch, task)  # the original architecture, the manifest alone
    apply_manifest(replayed, copy.deepcopy(surgery.manifest_of(model)))
    assert {k: v.shape for k, v in replayed.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_special_token_ids_of_the_config_follow():
    model = tiny_model("roberta")
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = 1, 0, 40
    keep = [0, 1] + list(range(30, 60))
    surgery.prune_vocab(model, keep)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (1, 0, keep.index(40))
    assert surgery.word_embeddings_of(model).padding_idx == 1 == model.base_model.embeddings.padding_idx


def test_vocab_only_checkpoint_is_standard_and_loads_in_vanilla_transformers(tmp_path):
    model = tiny_model("bert", "mlm")
    surgery.prune_vocab(model, keep_ids())
    out = save_slim(model, tmp_path / "slim")
    config = json.loads((out / "config.json").read_text())
    assert "shrink" not in config and config["vocab_size"] == len(keep_ids()) and (out / "shrink.json").exists()
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(main_output(type(model).from_pretrained(out)(**inputs)), main_output(model(**inputs)))


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta", "distilbert"])
def test_with_other_ops_reloads_exactly_with_shrink_and_trust_remote_code(arch, tmp_path):
    model = tiny_model(arch, "mlm")
    surgery.prune_vocab(model, keep_ids())
    surgery.prune_heads(model, {0: [1, 3]})
    out = save_slim(model, tmp_path / "slim")
    assert (out / "modeling_shrink.py").exists()  # heads need the runtime
    inputs = tiny_inputs(model)
    with torch.no_grad():
        expected = main_output(model(**inputs))
        assert torch.equal(main_output(load_model(str(out))(**inputs)), expected)
    torch.save(inputs, out / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", REMOTE, str(out), "AutoModelForMaskedLM"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(out / "remote_out.pt"), expected)


def test_vocab_then_compressed_embeddings_reload_exactly(tmp_path):
    model = tiny_model("bert")
    surgery.prune_vocab(model, keep_ids())
    surgery.factorize_word_embeddings(model, 6)  # built from the pruned table: len(keep) codes
    assert surgery.word_embeddings_of(model).num_embeddings == len(keep_ids())
    out = save_slim(model, tmp_path / "slim")
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(main_output(load_model(str(out))(**inputs)), main_output(model(**inputs)))


def test_keep_vocab_refusals():
    model = tiny_model("bert")
    with pytest.raises(BadInputError, match="padding token"):
        surgery.prune_vocab(model, list(range(1, 50)))
    with pytest.raises(BadInputError, match="out of range"):
        surgery.prune_vocab(model, [0, 5, 120])
    with pytest.raises(BadInputError, match="ascending"):
        surgery.prune_vocab(model, [0, 7, 5])
    surgery.prune_vocab(model, list(range(60)))
    with pytest.raises(BadInputError, match="already pruned"):
        surgery.prune_vocab(model, list(range(30)))
    other = tiny_model("bert")
    surgery.factorize_word_embeddings(other, 4)
    with pytest.raises(BadInputError, match="already replaced"):
        surgery.prune_vocab(other, list(range(30)))


# --- the method on ids only (no tokenizer, as the contract test runs it) ---------------------------


def test_ids_only_context_gets_its_data_renumbered():
    model = tiny_model("bert")
    batches = [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(3)]
    ctx = method_context(model, batches, evaluation=batches[:1])
    method = get_method("embedding.vocab")
    result, _ = run_step(ctx, method, method.options(), method.target())
    keep = surgery.original_token_ids(ctx.model)
    assert result.stats["vocab_after"] == len(keep) < 99 and result.tokenizer is None
    assert isinstance(ctx.calibration, RenumberedBatches) and len(ctx.calibration) == 3
    for batch in list(ctx.calibration) + ctx.evaluation + ctx.calibration_batches(None, 0, 0):
        real = batch["attention_mask"].bool()
        assert torch.equal(torch.tensor(keep)[batch["input_ids"]][real], batch["teacher"]["input_ids"][real])
        with torch.no_grad():  # the pruned student on the new ids is the teacher on the old ones
            torch.testing.assert_close(ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[real],
                                       ctx.teacher(**{k: batch["teacher"][k] for k in ("input_ids", "attention_mask")}).last_hidden_state[real],
                                       rtol=0, atol=1e-5)
    quality = evaluate(ctx.model, ctx.evaluation, teacher=ctx.teacher, progress=False)
    assert quality["embedding_cosine"] > 0.99999


def test_objectives_feed_the_teacher_its_own_tokens():
    model = tiny_model("bert")
    batches = [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(2)]
    ctx = method_context(model, batches, evaluation=batches)
    method = get_method("embedding.vocab")
    run_step(ctx, method, method.options(), method.target())
    objective = choose_objective(ctx.model, ctx.teacher, has_labels=False)
    for batch in ctx.evaluation:
        assert objective(ctx.model, batch, objective.targets(batch)) < 1e-5  # exact: nothing to learn
    with pytest.raises(BadInputError, match="hidden_mse"):
        mse = HiddenMSE(ctx.teacher)
        mse.per_sample(ctx.model, ctx.evaluation[0], mse.targets(ctx.evaluation[0]))


@pytest.mark.parametrize("task", ["tok", "qa", "mlm"])
def test_per_token_heads_are_refused(task):
    ctx = method_context(tiny_model("bert", task))
    method = get_method("embedding.vocab")
    with pytest.raises(BadInputError, match="per token"):
        run_step(ctx, method, method.options(), method.target())


def test_the_recipe_loads():
    recipe = load_recipe("vocab-prune")
    assert [s.method for s in recipe.steps] == ["embedding.vocab"]


# --- the pipeline end to end ------------------------------------------------------------------------


def wordpiece_tokenizer():
    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator(TEXTS[:2000], trainers.WordPieceTrainer(vocab_size=1500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT with a trained 1500-piece WordPiece tokenizer, and 150 sentences of data."""
    root = tmp_path_factory.mktemp("vocab")
    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                             vocab_size=len(tokenizer), max_position_embeddings=128)).eval()
    model.config.architectures = ["BertModel"]
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(TEXTS[3000:3150]) + "\n")
    return root


def prune(setup, out, *extra):
    args = ["prune", str(setup / "model"), "--recipe", "vocab-prune", "--data", str(setup / "data.txt"), "-o", str(out),
            "--max-length", "64", "--eval-samples", "30", "--json", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_prune_writes_the_rewritten_tokenizer_and_is_exact_on_kept_text(setup, tmp_path):
    out = tmp_path / "slim"
    report = prune(setup, out, "--set", "steps.0.options.keep_most_frequent=100")
    stats = report["steps"][0]["stats"]
    assert stats["tokenizer"] == "WordPiece" and stats["vocab_after"] < stats["vocab_before"] == 1500
    change = stats["held_out_tokenization"]
    assert change["texts"] == 30 and 0 < change["token_change_rate"] < 0.5  # held-out text uses tokens calibration did not
    assert report["checkpoint"]["kind"] == "standard" and (out / "model.onnx").exists()  # parity-gated export

    old_tokenizer, new_tokenizer = AutoTokenizer.from_pretrained(setup / "model"), AutoTokenizer.from_pretrained(out)
    assert len(new_tokenizer) == stats["vocab_after"] == json.loads((out / "config.json").read_text())["vocab_size"]
    calibration, held_out = split_examples(read_examples(str(setup / "data.txt")), 0.2, 0)
    original, slim = load_model(str(setup / "model")), load_model(str(out))
    for texts in (calibration.texts[:40], held_out.texts):
        old = old_tokenizer(texts, padding=True, return_tensors="pt")
        new = new_tokenizer(texts, padding=True, return_tensors="pt")
        same = [old_tokenizer.tokenize(t) == new_tokenizer.tokenize(t) for t in texts]
        with torch.no_grad():
            a, b = original(**old).last_hidden_state, slim(**new).last_hidden_state
        for i, unchanged in enumerate(same):
            if unchanged:  # the same pieces, new ids: the same outputs
                n = int(old["attention_mask"][i].sum())
                torch.testing.assert_close(b[i, :n], a[i, :n], rtol=0, atol=1e-5)
        assert texts is held_out.texts or all(same)  # calibration text is made of kept tokens
    quality = report["quality"]["after"]
    assert 0.5 < quality["embedding_cosine"] <= 1.0


def test_vocab_prune_chains_with_distillation(setup, tmp_path):
    (tmp_path / "chain.yaml").write_text(
        "name: chain\nsteps:\n  - method: embedding.vocab\n  - method: distill\n    options: {max_steps: 2}\n")
    args = ["prune", str(setup / "model"), "--recipe", str(tmp_path / "chain.yaml"), "--data", str(setup / "data.txt"),
            "-o", str(tmp_path / "chained"), "--max-length", "64", "--eval-samples", "30", "--no-export", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    chained = json.loads(result.stdout)
    assert [s["method"] for s in chained["steps"]] == ["embedding.vocab", "distill"]
    assert chained["after"]["params"]["embeddings"] < chained["before"]["params"]["embeddings"]
    assert chained["steps"][0]["stats"]["held_out_tokenization"]["texts"] == 30


def test_shrink_eval_feeds_the_teacher_its_own_tokenizer(setup, tmp_path):
    prune(setup, tmp_path / "slim", "--no-export", "--set", "steps.0.options.keep_most_frequent=0")
    calibration, _ = split_examples(read_examples(str(setup / "data.txt")), 0.2, 0)
    (tmp_path / "kept.txt").write_text("\n".join(calibration.texts[:40]) + "\n")  # made of kept tokens
    result = runner.invoke(app, ["eval", str(tmp_path / "slim"), "--data", str(tmp_path / "kept.txt"), "--teacher", str(setup / "model"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["embedding_cosine"] > 0.99999
