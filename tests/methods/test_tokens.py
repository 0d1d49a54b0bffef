"""Token pruning (issue 19): the KeepTokens op and its runtime (runtime.TokenPruningEncoder: PoWER-BERT
significance, per-sample counts, drop-and-restore), its exact reload and ONNX export, the tokens.power
method, and real-text timing."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from shrink import surgery
from shrink.errors import BadInputError
from shrink.measure.bench.real_text import long_feed, real_text_section, text_feeds
from shrink.measure.export import export_onnx
from shrink.measure.onnx_session import graph_feed, session
from shrink.methods.catalog import get_method
from shrink.methods.tokens.power import mean_keep
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import run_step
from shrink.surgery import runtime

from helpers import ARCHITECTURES, method_context, slim_everything, tiny_model

SCHEDULE = {0: 0.6, 1: 0.3}  # tiny models have 3 layers: pruning after the first two


def padded_batch(model, lengths=(20, 12, 6), seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pruned(model, keep=SCHEDULE, fill="state"):
    model = copy.deepcopy(model)
    surgery.apply(model, [surgery.KeepTokens(keep, fill=fill)])
    return model


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("fill", ["state", "kept_mean"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keeping_every_token_is_the_unpruned_model_and_a_padded_batch_is_each_sample_alone(arch, fill):
    model = tiny_model(arch)
    batch = padded_batch(model)
    real = batch["attention_mask"].bool()
    reference = hidden(model, batch)
    # ceil(0.999 x L) = L for these lengths: the whole gather / restore path runs and drops nothing
    near_one = hidden(pruned(model, {0: 0.999, 1: 0.999}, fill), batch)
    assert torch.equal(near_one[real], reference[real])
    slim = pruned(model, fill=fill)
    together = hidden(slim, batch)
    assert together.shape == reference.shape  # restore keeps [batch, sequence, hidden]
    assert (together[real] - reference[real]).abs().max() > 1e-3  # tokens really were dropped
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        alone = hidden(slim, {"input_ids": batch["input_ids"][row : row + 1, :n]})
        torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_a_schedule_of_ones_records_nothing_and_bad_schedules_are_refused():
    model = tiny_model("bert")
    surgery.apply(model, [surgery.KeepTokens({0: 1.0, 1: 1.0})])
    assert surgery.manifest_of(model)["ops"] == []
    for op, fragment in ((surgery.KeepTokens({0: 0.3, 1: 0.6}), "keeps more tokens"), (surgery.KeepTokens({0: 0.0}), "(0, 1]"),
                         (surgery.KeepTokens({5: 0.5}), "out of range"), (surgery.KeepTokens({0: True}), "(0, 1]"),
                         (surgery.KeepTokens({0: 0.5}, fill="zeros"), "unknown fill")):
        with pytest.raises(BadInputError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            surgery.apply(copy.deepcopy(model), [op])
    surgery.apply(model, [surgery.KeepTokens({0: 0.5})])
    assert surgery.manifest_of(model)["ops"] == [{"op": "tokens", "keep": [0.5, 0.5, 0.5], "restore": True, "significance": "attention", "fill": "state"}]
    with pytest.raises(BadInputError, match="already prunes tokens"):
        surgery.apply(model, [surgery.KeepTokens({1: 0.2})])
    with pytest.raises(BadInputError, match="restore"):
        surgery.apply(tiny_model("bert"), [surgery.KeepTokens({0: 0.5}, restore=False)])


def test_the_first_token_is_always_kept_padding_never_and_counts_are_per_sample():
    # significance: the first token lowest, padding highest; counts 2 and 1
    significance = torch.tensor([[0.0, 5.0, 1.0, 3.0, 9.0], [0.0, 1.0, 2.0, 9.0, 9.0]])
    real = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    index, kept = runtime.kept_slots(significance, real, torch.tensor([2, 1]))
    assert index.tolist()[0] == [0, 1] and index.tolist()[1][0] == 0  # in their original order
    assert kept.tolist() == [[1.0, 1.0], [1.0, 0.0]]  # row 2 is padded to the batch's largest count


def test_significance_is_the_attention_received_summed_over_heads_and_real_queries():
    model = tiny_model("bert")
    model.config._attn_implementation = "eager"  # eager attention returns its probabilities
    batch = padded_batch(model, lengths=(9, 5))
    layer = surgery.layers_of(model)[0]
    captured = {}
    hooks = [layer.attention.self.query.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             layer.attention.self.key.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
             layer.attention.self.register_forward_hook(lambda m, i, o: captured.__setitem__("probs", o[1]))]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    real = batch["attention_mask"].float()
    expected = (captured["probs"] * real[:, None, :, None]).sum(dim=(1, 2))
    got = runtime.token_significance(captured["q"], captured["k"], real, head_size=8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[1, 5:] == 0).all()  # padding receives nothing


def test_kept_counts_follow_each_samples_real_length():
    model = tiny_model("bert")
    slim = pruned(model, {0: 0.5})
    seen = []
    layer = surgery.layers_of(slim)[1]
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[1], runtime.key_padding(args[1], args[0]).sum(1).tolist())))
    hidden(slim, padded_batch(slim, lengths=(20, 7)))
    hook.remove()
    assert seen == [(10, [10.0, 4.0])]  # ceil(0.5 x 20), ceil(0.5 x 7): short inputs are cut less in tokens


RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["shrink"] = None  # trust_remote_code alone, no shrink
    from transformers import AutoModel
    results = {}
    for path in json.loads(sys.argv[1]):
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(**torch.load(path + "/inputs.pt")).last_hidden_state
        results[path] = bool(torch.equal(out, torch.load(path + "/expected.pt")))
    print(json.dumps(results))
    """
)


def test_exact_reload_with_shrink_and_with_trust_remote_code_alone(tmp_path):
    paths = []
    for arch in ARCHITECTURES:
        model = slim_everything(tiny_model(arch))  # heads, a headless layer, FFN, a dropped layer, low rank
        surgery.apply(model, [surgery.KeepTokens({0: 0.5}, fill="kept_mean" if arch in ("bert", "mpnet") else "state")])
        surgery.apply(model, [surgery.KeepHeads({0: [1]})])  # structure changed after the tokens op
        batch = padded_batch(model)
        expected = hidden(model, batch)
        out = tmp_path / arch
        save_slim(model, out)
        torch.save(batch, out / "inputs.pt")
        torch.save(expected, out / "expected.pt")
        assert torch.equal(hidden(load_model(str(out)), batch), expected), arch
        paths.append(str(out))
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(paths)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(json.loads(done.stdout.strip().splitlines()[-1]).values())


@pytest.mark.parametrize(("arch", "fill"), [("bert", "state"), ("bert", "kept_mean"), ("distilbert", "state"), ("mpnet", "kept_mean")])
def test_onnx_export_passes_parity_and_stays_dynamic_at_other_lengths_and_batches(arch, fill, tmp_path):
    model = pruned(tiny_model(arch), fill=fill)
    report = export_onnx(model, tmp_path / "model.onnx", parity_batches=[padded_batch(model)])
    sess = session(tmp_path / "model.onnx")
    for lengths in ((5,), (60, 31, 9, 2)):  # the graph was traced at 2 x 8
        batch = padded_batch(model, lengths)
        feed = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}
        got = sess.run(["last_hidden_state"], graph_feed(sess, {k: feed[k] for k in report["inputs"]}))[0]
        np.testing.assert_allclose(got, hidden(model, batch).numpy(), atol=1e-4, rtol=1e-4)


def test_power_meets_its_target_and_each_round_takes_the_cheapest_cut():
    model = tiny_model("bert")
    batches = [padded_batch(model, lengths=(24, 16, 10, 30), seed=s) for s in range(2)]
    ctx = method_context(model, batches)
    method = get_method("tokens.power")
    options = method.options(step=0.25, calibration_samples=8, max_length=32)
    result, _ = run_step(ctx, method, options, method.target(keep_fraction=0.7))
    stats = result.stats
    assert stats["mean_keep"] <= 0.7 and mean_keep(stats["kept_fractions"]) == pytest.approx(stats["mean_keep"], abs=1e-4)
    assert surgery.manifest_of(ctx.model)["ops"][-1]["op"] == "tokens"
    # the first round, recomputed with the shipped op on copies of the original: the cheapest cut per token saved
    from shrink.train.objectives import objective_loss

    original = ctx.teacher  # ctx.model now carries the plan
    base = objective_loss(original, ctx.objective, batches)
    prices = {}
    for position in (0, 1):
        trial = pruned(original, {position: 0.75})
        saved = mean_keep([1.0, 1.0, 1.0]) - mean_keep([1.0 if p < position else 0.75 for p in range(3)])
        prices[position] = (objective_loss(trial, ctx.objective, batches) - base) / saved
    assert stats["rounds"][0]["layer"] == min(prices, key=prices.get)
    assert stats["loss_before"] == pytest.approx(base, abs=1e-5)


def test_real_text_timing_uses_unpadded_rows_and_a_long_input_of_real_tokens():
    model = tiny_model("bert")
    batches = [padded_batch(model, lengths=(20, 12, 6))]
    feeds = text_feeds(batches)
    assert [f["input_ids"].shape[1] for f in feeds] == [20, 12, 6]
    assert torch.equal(feeds[1]["input_ids"][0], batches[0]["input_ids"][1, :12])
    long = long_feed(batches, length=30)
    ids = batches[0]["input_ids"]
    expected = torch.cat([ids[0, :1], ids[0, 1:19], ids[1, 1:11], ids[0, 19:20]])
    assert torch.equal(long["input_ids"][0], expected) and long["input_ids"].shape[1] == 30

    from shrink.measure.bench.targets import torch_target

    targets = [torch_target(model, "dense", None, (None, "")), torch_target(pruned(model), "tokens", None, (None, ""))]
    section = real_text_section(targets, lambda i: batches, samples=3, long_length=30, warmup=0, rounds=2, tick=lambda: None)
    assert section["own_lengths"]["tokens"] == {"min": 6, "max": 20, "mean": 12.7}
    assert section["long"]["tokens"] == 30 and [r["model"] for r in section["long"]["models"]] == ["dense", "tokens"]
    assert "own lengths" in section["inputs"] and math.isclose(section["own_lengths"]["models"][0]["speedup"], 1.0)


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_a_dropped_token_keeps_the_state_of_the_layer_that_dropped_it(arch):
    model = tiny_model(arch)
    batch = padded_batch(model, lengths=(20, 11))
    with torch.no_grad():
        after_first = model(**batch, output_hidden_states=True).hidden_states[1]  # layer 0 sees every token either way
    out = hidden(pruned(model, {0: 0.3}), batch)
    for row, n in enumerate((20, 11)):
        restored = [p for p in range(n) if torch.equal(out[row, p], after_first[row, p])]
        assert len(restored) == n - math.ceil(0.3 * n)  # exactly the dropped ones come back as layer 0 left them
        assert 0 not in restored  # the first token went on through the later layers


def saved_long_model(tmp_path):
    import transformers as T

    from helpers import SENTENCES, tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=300)).eval()  # the bench uses 128, the long input 256
    model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text("\n".join(SENTENCES) + "\n")


def prune_cli(*args):
    from typer.testing import CliRunner

    from shrink.cli import app

    return CliRunner().invoke(app, ["prune", *map(str, args), "--json", "--max-samples", "16", "--eval-samples", "8"])


def test_prune_with_token_power_times_real_texts_and_says_so(tmp_path):
    saved_long_model(tmp_path)
    result = prune_cli(tmp_path / "model", "--recipe", "token-power", "--data", tmp_path / "data.txt", "-o", tmp_path / "out",
                       "--set", "steps.0.options.calibration_samples=8", "--set", "steps.0.options.step=0.25",
                       "--set", "steps.1.options.max_steps=2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    onnx = report["onnx"]
    assert "real texts at their own lengths (b=1, unpadded" in onnx["timed_inputs"]
    assert onnx["bench"]["real_text"]["long"]["tokens"] == 256
    assert [r["model"] for r in onnx["bench"]["real_text"]["own_lengths"]["models"]] == [m["name"] for m in onnx["bench"]["models"]]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["shrink"]["ops"][-1]["op"] == "tokens"


def test_kept_mean_fill_makes_mean_pooling_the_mean_over_the_kept_tokens():
    from shrink.train.objectives import mean_pool

    model = tiny_model("bert")
    batch = padded_batch(model, lengths=(20, 11))
    out = hidden(pruned(model, {0: 0.5, 1: 0.3}, fill="kept_mean"), batch)
    pooled = mean_pool(out, batch["attention_mask"])
    for row, n in enumerate((20, 11)):
        filled = torch.isclose(out[row, :n], pooled[row], atol=1e-6).all(dim=-1)
        kept = out[row, :n][~filled]
        assert len(kept) == math.ceil(0.3 * n) and not filled[0]  # the first token went through every layer
        torch.testing.assert_close(kept.mean(0), pooled[row], atol=1e-5, rtol=1e-5)


def test_token_power_chains_after_a_structured_recipe(tmp_path):
    saved_long_model(tmp_path)
    result = prune_cli(tmp_path / "model", "--recipe", "l0-ffn", "--recipe", "token-power", "--data", tmp_path / "data.txt",
                       "-o", tmp_path / "out", "--no-export", "--set", "l0-ffn.steps.0.target.flops_fraction=0.9",
                       "--set", "l0-ffn.steps.0.options.max_steps=3",
                       "--set", "l0-ffn.steps.1.options.max_steps=1", "--set", "token-power.steps.0.options.calibration_samples=8",
                       "--set", "token-power.steps.0.options.step=0.25", "--set", "token-power.steps.1.options.max_steps=1")
    assert result.exit_code == 0, result.output
    ops = json.loads((tmp_path / "out" / "config.json").read_text())["shrink"]["ops"]
    assert {op["op"] for op in ops[:-1]} == {"ffn"} and ops[-1]["op"] == "tokens" and ops[-1]["fill"] == "kept_mean"
    reloaded = load_model(str(tmp_path / "out"))
    assert runtime.token_keep(surgery.adapter_of(reloaded), reloaded) == ops[-1]["keep"]
