"""Hidden-dim pruning (KeepHidden, CoFi's hidden dims): the residual stream loses the same dims
everywhere, on every family and task head; the result is the original with its LayerNorms
normalising over the kept dims only, it replays, reloads bit-exactly and exports."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from shrink import surgery
from shrink.errors import BadInputError
from shrink.measure.export import export_onnx
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.surgery import DropLayers, KeepFFN, KeepHeads, KeepHidden, LowRank, runtime

from helpers import ARCHITECTURES, main_output, tiny_inputs, tiny_model

TASKS = ["base", "seq", "tok", "qa", "mlm"]
KEEP = [0, 2, 3, 5, 8, 13, 21, 22, 30, 31]  # 10 of the tiny models' 32 hidden dims
AUTO = {"base": "AutoModel", "seq": "AutoModelForSequenceClassification", "tok": "AutoModelForTokenClassification",
        "qa": "AutoModelForQuestionAnswering", "mlm": "AutoModelForMaskedLM"}


def run(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def masked_reference(model, keep: list[int]):
    """The original model with the pruned dims held at zero on the stream, which is what the pruned
    model computes: every LayerNorm of the stream's width normalises over the kept dims only and writes
    zeros elsewhere (ELECTRA's embeddings_project output is masked instead of its narrower
    embeddings), so every reader of the stream sees zeros in the pruned dims."""
    index = torch.tensor(keep)

    def norm_hook(module, args, out):
        y = nn.functional.layer_norm(args[0][..., index], (len(keep),), module.weight[index], module.bias[index], module.eps)
        return torch.zeros_like(out).index_copy(-1, index, y)

    def mask_hook(module, args, out):
        return torch.zeros_like(out).index_copy(-1, index, out[..., index])

    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.normalized_shape == (32,):
            module.register_forward_hook(norm_hook)
    project = runtime.embeddings_project(surgery.adapter_of(model), model)
    if project is not None:
        project.register_forward_hook(mask_hook)
    return model


@pytest.mark.parametrize("task", TASKS)
def test_keeping_every_dim_is_the_identity(arch, task):
    model = tiny_model(arch, task)
    inputs = tiny_inputs(model)
    expected = run(model, inputs)
    surgery.apply(model, [KeepHidden(list(range(32)))])
    assert surgery.manifest_of(model)["ops"] == []
    assert torch.equal(run(model, inputs), expected)


@pytest.mark.parametrize("task", TASKS)
def test_pruned_model_is_the_masked_original(arch, task):
    model = tiny_model(arch, task)
    inputs = tiny_inputs(model)
    expected = run(masked_reference(tiny_model(arch, task), KEEP), inputs)
    surgery.apply(model, [KeepHidden(KEEP)])
    out = run(model, inputs)
    if task == "base":  # an embedding model's output gets narrower
        expected = expected[..., KEEP]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    assert surgery.hidden_size(model) == len(KEEP) and surgery.original_hidden_ids(model) == KEEP
    assert model.config.to_dict()[surgery.adapter_of(model).hidden_size_attr] == 32  # the config stays the original


def test_bert_embeddings_by_hand():
    """The pruned embeddings: each table's kept columns summed, then LayerNorm over them alone."""
    model = tiny_model("bert")
    inputs = tiny_inputs(model)
    ids, index = inputs["input_ids"], torch.tensor(KEEP)
    e = model.embeddings
    summed = e.word_embeddings.weight[ids] + e.position_embeddings.weight[: ids.shape[1]] + e.token_type_embeddings.weight[0]
    expected = nn.functional.layer_norm(summed[..., index], (len(KEEP),), e.LayerNorm.weight[index], e.LayerNorm.bias[index], e.LayerNorm.eps)
    surgery.prune_hidden(model, KEEP)
    with torch.no_grad():
        torch.testing.assert_close(model.embeddings(input_ids=ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_shapes_replay_reload_and_export(arch, task, tmp_path):
    model = tiny_model(arch, task)
    inputs = tiny_inputs(model)
    adapter = surgery.adapter_of(model)
    surgery.apply(model, [KeepHidden(KEEP)])
    layer = surgery.layers_of(model)[0]
    n = len(KEEP)
    assert layer.get_submodule(adapter.query).weight.shape == (32, n)  # heads keep their size
    assert layer.get_submodule(adapter.attention_out).weight.shape == (n, 32)
    assert layer.get_submodule(adapter.ffn_in).weight.shape == (37, n)  # FFNs keep their neurons
    assert layer.get_submodule(adapter.ffn_out).weight.shape == (n, 37)
    assert all(m.normalized_shape == (n,) for m in layer.modules() if isinstance(m, nn.LayerNorm))
    words = surgery.word_embeddings_of(model)
    assert words.weight.shape == (99, 24 if arch == "electra" else n)  # ELECTRA's embeddings keep their width
    if task == "mlm":
        assert model.get_output_embeddings().weight is words.weight  # still tied

    replayed = tiny_model(arch, task)
    runtime.apply_manifest(replayed, copy.deepcopy(surgery.manifest_of(model)))
    assert shapes(replayed) == shapes(model)

    expected = run(model, inputs)
    out = save_slim(model, tmp_path / "slim")
    assert torch.equal(run(load_model(str(out)), inputs), expected)
    export_onnx(model, tmp_path / "model.onnx", parity_batches=[inputs])  # raises on a parity miss


def test_reload_without_shrink_on_every_head(tmp_path):
    """trust_remote_code alone (no shrink importable) rebuilds every family and head exactly."""
    cases = {}
    for arch, task in itertools.product(ARCHITECTURES, TASKS):
        model = tiny_model(arch, task)
        inputs = tiny_inputs(model)
        surgery.apply(model, [KeepHeads({1: []}), KeepHidden(KEEP), KeepFFN({2: []})])
        path = save_slim(model, tmp_path / f"{arch}-{task}")
        torch.save(inputs, path / "inputs.pt")
        torch.save(run(model, inputs), path / "expected.pt")
        cases[str(path)] = AUTO[task]
    script = textwrap.dedent(
        """
        import json, sys, torch
        sys.modules["shrink"] = None
        import transformers
        results = {}
        for path, auto in json.loads(sys.argv[1]).items():
            model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True).eval()
            with torch.no_grad():
                out = model(**torch.load(path + "/inputs.pt"))
            out = out.logits if hasattr(out, "logits") else (
                torch.cat([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.last_hidden_state)
            results[path] = bool(torch.equal(out, torch.load(path + "/expected.pt")))
        print(json.dumps(results))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [path for path, exact in results.items() if not exact] == []


def test_chained_ops_name_original_dims(arch):
    chained, once = tiny_model(arch, "seq"), tiny_model(arch, "seq")
    surgery.apply(chained, [KeepHidden(list(range(1, 32, 2))), KeepHidden([0, 4, 5, 15])])  # 1, 3, ..., 31 -> 1, 9, 11, 31
    assert surgery.manifest_of(chained)["ops"][-1] == {"op": "hidden", "keep": [1, 9, 11, 31]}
    surgery.apply(once, [KeepHidden([1, 9, 11, 31])])
    assert all(torch.equal(a, b) for a, b in zip(chained.state_dict().values(), once.state_dict().values()))
    replayed = tiny_model(arch, "seq")
    runtime.apply_manifest(replayed, copy.deepcopy(surgery.manifest_of(chained)))
    assert shapes(replayed) == shapes(chained)


def test_any_order_with_the_other_ops_gives_one_model(arch, tmp_path):
    """Head, FFN and hidden pruning slice different axes (a removed block's bias included), so their
    order does not matter; layer 2 goes, the others are named by positions that stay put."""
    adapter = surgery.adapter_of(tiny_model(arch))
    plan = [KeepHidden(KEEP), KeepHeads({0: [1, 3], 1: []}), KeepFFN({0: [2, 7, 30], 1: []}), DropLayers([2])]
    low_rank = [LowRank(f"{adapter.layers}.0.{adapter.query}", 4), LowRank(f"{adapter.layers}.1.{adapter.ffn_in}", 3)]
    reference = None
    for order in itertools.permutations(plan):
        model = tiny_model(arch, "tok")
        surgery.apply(model, [*low_rank, *order])
        state = model.state_dict()
        if reference is None:
            reference, inputs = model, tiny_inputs(model)
            continue
        assert list(state) == list(reference.state_dict())
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in state.items()), order
    assert surgery.heads_per_layer(reference) == [2, 0] and surgery.ffn_per_layer(reference) == [3, 0]
    replayed = tiny_model(arch, "tok")
    runtime.apply_manifest(replayed, copy.deepcopy(surgery.manifest_of(reference)))
    assert shapes(replayed) == shapes(reference)
    expected = run(reference, inputs)
    assert torch.equal(run(load_model(str(save_slim(reference, tmp_path / "slim"))), inputs), expected)


@pytest.mark.parametrize("keep, match", [([], "at least one"), ([3, 32], "out of range"), ([-1, 2], "out of range"),
                                         ([2, 2, 5], "ascending without duplicates"), ([5, 2], "ascending")])
def test_bad_keep_lists_are_refused(keep, match):
    model = tiny_model("bert")
    with pytest.raises(BadInputError, match=match):
        surgery.apply(model, [KeepHidden(keep)])
    assert surgery.manifest_of(model)["ops"] == []


def test_compressed_word_embeddings_are_refused_untouched():
    model = tiny_model("bert")
    surgery.factorize_word_embeddings(model, rank=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BadInputError, match="compressed word embeddings"):
        surgery.apply(model, [KeepHidden(KEEP)])
    assert [op["op"] for op in surgery.manifest_of(model)["ops"]] == ["embedding"]
    assert shapes(model) == {k: tuple(v.shape) for k, v in before.items()}


def test_electra_keeps_compressed_embeddings_behind_its_projection():
    """ELECTRA's embeddings sit before embeddings_project, off the stream: they may be compressed."""
    model = tiny_model("electra")
    surgery.factorize_word_embeddings(model, rank=8)
    surgery.apply(model, [KeepHidden(KEEP)])
    assert model.embeddings_project.weight.shape == (len(KEEP), 24)


def test_a_hidden_op_naming_absent_dims_does_not_replay():
    manifest = {"format_version": 1, "ops": [{"op": "hidden", "keep": [0, 1, 2]}, {"op": "hidden", "keep": [1, 5]}]}
    with pytest.raises(ValueError, match="not present"):
        runtime.apply_manifest(tiny_model("bert"), manifest)
