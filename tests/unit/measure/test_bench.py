"""shrink bench: analytic FLOPs against hand counts, the result schema, interleaved rounds, gates
and every bad input. Tiny shapes and 2 rounds: these tests check behaviour, never timings."""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.measure.bench import bench
from shrink.measure.export import export_onnx
from shrink.models.flops import model_flops
from shrink.models.slim import save_slim

from helpers import ARCHITECTURES, slim_everything, tiny_model, tiny_tokenizer

FAST = dict(batch_sizes=(1, 2), seq_lengths=(8,), warmup=1, rounds=2)
FAST_CLI = ["--batch-sizes", "1,2", "--seq-lengths", "8", "--warmup", "1", "--rounds", "2"]
LABELS = {0: "neg", 1: "pos", 2: "neutral"}

# The tiny BERT of conftest: hidden 32, 4 heads of 8, FFN 37, 3 layers.
H, HEADS, D, F, LAYERS = 32, 4, 8, 37, 3


def classifier():
    model = tiny_model("bert", "seq")
    model.config.id2label, model.config.label2id = dict(LABELS), {v: k for k, v in LABELS.items()}
    model.config.architectures = ["BertForSequenceClassification"]
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A classifier, its slim version (with model.onnx beside it), an ONNX file with no checkpoint
    beside it, and labelled data."""
    root = tmp_path_factory.mktemp("bench")
    full = classifier()
    full.save_pretrained(root / "full")
    tiny_tokenizer().save_pretrained(root / "full")
    slim = slim_everything(copy.deepcopy(full))
    slim_dir = save_slim(slim, root / "slim", tiny_tokenizer())
    export_onnx(slim, slim_dir / "model.onnx")
    (root / "alone").mkdir()
    export_onnx(slim, root / "alone" / "slim.onnx")
    data = root / "labeled.csv"
    texts = ["a good film", "bad", "it was fine", "great acting", "dull", "so so"]
    data.write_text("text,label\n" + "".join(f"{t},{LABELS[i % 3]}\n" for i, t in enumerate(texts)))
    return {
        "root": root, "full": str(root / "full"), "slim": str(slim_dir), "onnx": str(slim_dir / "model.onnx"),
        "lonely_onnx": str(root / "alone" / "slim.onnx"), "data": str(data),
    }


# --- FLOPs --------------------------------------------------------------------------------------


def test_flops_of_the_tiny_bert_by_hand():
    s = 16
    flops = model_flops(tiny_model("bert"), s)
    projections = 4 * 2 * s * H * H  # q, k, v, out
    matmuls = 2 * (2 * s * s * HEADS * D)  # scores and context
    assert flops["attention"] == LAYERS * (projections + matmuls)
    assert flops["ffn"] == LAYERS * 2 * (2 * s * H * F)
    assert flops["head"] == 2 * H * H  # the pooler sees only the first token
    assert flops["embeddings"] == 0  # lookups are free
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")


def test_removing_half_the_heads_removes_exactly_their_share():
    s = 16
    model = tiny_model("bert")
    before = model_flops(model, s)
    surgery.prune_heads(model, {i: [0, 1] for i in range(LAYERS)})
    after = model_flops(model, s)
    half_projections = 4 * 2 * s * H * (H // 2)
    half_matmuls = 2 * (2 * s * s * (HEADS // 2) * D)
    assert before["attention"] - after["attention"] == LAYERS * (half_projections + half_matmuls)
    assert after["ffn"] == before["ffn"] and after["head"] == before["head"]


def test_headless_layers_neuronless_ffn_low_rank_and_classifier_head():
    s = 8
    model = tiny_model("bert", "seq")  # 3 labels
    surgery.prune_heads(model, {0: []})  # layer 0: no attention at all
    surgery.prune_ffn(model, {1: []})  # layer 1: no FFN
    surgery.factorize_linear(model, "encoder.layer.2.intermediate.dense", rank=5)
    flops = model_flops(model, s)
    full_attention = 4 * 2 * s * H * H + 2 * (2 * s * s * HEADS * D)
    assert flops["attention"] == 2 * full_attention
    ffn_out = 2 * s * F * H
    assert flops["ffn"] == (2 * s * H * F + ffn_out) + (2 * s * 5 * (H + F) + ffn_out)
    assert flops["head"] == 2 * H * H + 2 * H * 3  # pooler + classifier, first token only


def _linear_work_measured(model, s: int) -> int:
    """FLOPs of every nn.Linear call in a real forward pass, seen by hooks."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        total += 2 * args[0].numel() * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(input_ids=torch.randint(5, 99, (1, s)), attention_mask=torch.ones(1, s, dtype=torch.long))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("task", ["base", "seq", "tok", "qa", "mlm"])
def test_analytic_flops_equal_the_linear_work_of_a_real_forward(arch, task):
    """The walk through the adapter finds every Linear the forward pass runs, on the right number
    of tokens (pooler and sequence heads on one), in pruned models of every family and head."""
    model = slim_everything(tiny_model(arch, task))
    s = 12
    flops = model_flops(model, s)
    matmuls = sum(2 * (2 * s * s * h * D) for h in surgery.heads_per_layer(model))
    assert flops["total"] - matmuls == _linear_work_measured(model, s)


# --- the library ------------------------------------------------------------------------------


ROW_KEYS = {"batch", "seq", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput", "speedup", "latency_ratio"}


def test_result_schema(dirs):
    result = bench([dirs["full"], dirs["slim"], dirs["onnx"], dirs["lonely_onnx"]], **FAST)
    assert result["settings"]["batch_sizes"] == [1, 2] and result["settings"]["threads"] == 1
    assert result["settings"]["baseline"] == dirs["full"]
    full, slim, onnx_beside, lonely = result["models"]
    assert [m["backend"] for m in result["models"]] == ["torch", "torch", "onnx", "onnx"]
    for model in result["models"]:
        assert {"name", "path", "backend", "params", "params_total", "flops_g", "size_mb", "p50_ms", "results"} <= set(model)
        assert [(r["batch"], r["seq"]) for r in model["results"]] == [(1, 8), (2, 8)]
        assert model["p50_ms"] == model["results"][0]["p50_ms"]
        for row in model["results"]:
            assert set(row) == ROW_KEYS
            assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["throughput"] > 0
            assert row["speedup"] * row["latency_ratio"] == pytest.approx(1.0)
        assert model["size_mb"] > 0
    assert all(r["speedup"] == 1.0 for r in full["results"])
    assert slim["params_total"] < full["params_total"] and slim["params"].keys() == full["params"].keys()
    assert slim["flops_g"]["8"] < full["flops_g"]["8"]
    # the checkpoint beside model.onnx gives the same static figures as the checkpoint itself
    assert onnx_beside["flops_g"] == slim["flops_g"] and onnx_beside["params"] == slim["params"]
    assert lonely["flops_g"] == {"8": None} and set(lonely["params"]) == {"initializers"}
    # the flat cell-by-cell rows that `shrink prune` reads (rows[1] = second model, first cell)
    assert len(result["results"]) == 2 * 4 and result["results"][1]["model"] == slim["name"]
    from shrink.measure.thresholds import prune_speedup as speedup

    assert speedup({"onnx": {"bench": result}}) == slim["results"][0]["speedup"]
    json.dumps(result)  # plain JSON types only


def test_rounds_are_interleaved_and_inputs_have_the_requested_shape():
    models = [tiny_model("bert", seed=i) for i in range(3)]
    calls = []
    for i, model in enumerate(models):
        model.register_forward_pre_hook(lambda m, args, kwargs, i=i: calls.append((i, kwargs["input_ids"])), with_kwargs=True)
    bench(models, batch_sizes=(1, 3), seq_lengths=(5,), warmup=1, rounds=3)
    order = [i for i, _ in calls]
    one_cell = [0, 1, 2] + [0, 1, 2] + [1, 2, 0] + [2, 0, 1]  # warm-up, then rounds rotating the order
    assert order == one_cell * 2
    shapes = [tuple(ids.shape) for _, ids in calls]
    assert shapes == [(1, 5)] * 12 + [(3, 5)] * 12
    first_cell = [ids for _, ids in calls[:12]]
    assert all(torch.equal(ids, first_cell[0]) for ids in first_cell), "every model gets the same ids"


def test_backend_onnx_exports_checkpoints_on_the_fly(dirs):
    result = bench([dirs["full"], dirs["slim"]], backend="onnx", batch_sizes=(1,), seq_lengths=(8,), warmup=1, rounds=2)
    for model in result["models"]:
        assert model["backend"] == "onnx" and model["export"]["max_abs_diff"] <= 1e-4
        assert model["flops_g"]["8"] is not None and "exported on the fly" in model["size_source"]
    assert result["models"][0]["path"] == dirs["full"]


def test_torch_thread_setting_is_restored():
    before = torch.get_num_threads()
    bench([tiny_model("bert")], batch_sizes=(1,), seq_lengths=(4,), warmup=0, rounds=1, threads=2)
    assert torch.get_num_threads() == before


def test_quality_uses_the_first_model_as_teacher(dirs):
    from shrink.data.examples import Examples, make_batches

    batches = make_batches(tiny_tokenizer(), Examples(["a good film", "bad", "so so"]), batch_size=2)
    result = bench([dirs["full"], dirs["slim"]], batch_sizes=(1,), seq_lengths=(8,), warmup=0, rounds=1, data_batches=batches)
    baseline, slim = (m["quality"] for m in result["models"])
    assert baseline["top1_agreement"] == 1.0 and 0 <= slim["top1_agreement"] <= 1


# --- the command --------------------------------------------------------------------------------


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_cli_json_is_the_only_thing_on_stdout(dirs):
    result = invoke(dirs["full"], dirs["onnx"], *FAST_CLI, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [m["name"] for m in document["models"]] == [dirs["full"], dirs["onnx"]]


def test_cli_table_and_markdown(dirs, tmp_path):
    target = tmp_path / "reports" / "bench.md"
    result = invoke(dirs["full"], dirs["slim"], *FAST_CLI, "--markdown", target)
    assert result.exit_code == 0, result.output
    assert "speedup" in result.stdout and "static figures" in result.stdout
    text = target.read_text()
    assert text.startswith("| model | backend | batch | seq | p50 ms |")
    assert text.count(f"| {dirs['slim']} | torch |") == 2 and "GFLOPs" in text


def test_cli_quality_from_data(dirs):
    result = invoke(dirs["full"], dirs["onnx"], *FAST_CLI, "--data", dirs["data"], "--label-column", "label", "--json")
    assert result.exit_code == 0, result.output
    baseline, onnx_model = (m["quality"] for m in json.loads(result.stdout)["models"])
    assert 0 <= baseline["accuracy"] <= 1 and "top1_agreement" in onnx_model


@pytest.mark.parametrize("gate, value, words", [
    ("--max-size-mb", 0.000001, "MB >"),
    ("--min-speedup", 1000, "speedup"),
    ("--max-latency-ratio", 0.0001, "latency ratio"),
])
def test_cli_gates_exit_1_and_say_which(dirs, gate, value, words):
    result = invoke(dirs["full"], dirs["slim"], *FAST_CLI, gate, value)
    assert result.exit_code == 1, result.output
    assert "threshold failed" in result.output and words in result.output and dirs["slim"] in result.output
    assert "p50 ms" in result.output, "results are printed before the gate fails"


def test_cli_quality_gate(dirs):
    impossible = invoke(dirs["full"], dirs["slim"], *FAST_CLI, "--data", dirs["data"], "--label-column", "label", "--max-quality-drop", -2)
    assert impossible.exit_code == 1 and "accuracy dropped" in impossible.output
    generous = invoke(dirs["full"], dirs["slim"], *FAST_CLI, "--data", dirs["data"], "--label-column", "label", "--max-quality-drop", 2, "--max-latency-ratio", 1000)
    assert generous.exit_code == 0, generous.output
    by_f1 = invoke(dirs["full"], dirs["slim"], *FAST_CLI, "--data", dirs["data"], "--label-column", "label", "--max-quality-drop", -2, "--quality-metric", "macro_f1")
    assert by_f1.exit_code == 1 and "macro_f1 dropped" in by_f1.output
    not_measured = invoke(dirs["full"], dirs["slim"], *FAST_CLI, "--data", dirs["data"], "--label-column", "label", "--max-quality-drop", 2, "--quality-metric", "neighbour_recall")
    assert not_measured.exit_code == 1 and "neighbour_recall was not measured" in not_measured.output


def _foreign_onnx(path):
    """A valid ONNX graph that is not an encoder: one float input `x`."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "does not exist"),
    ("missing_onnx", "does not exist"),
    ("text_file", "neither an .onnx file nor a model directory"),
    ("dir_without_config", "no config.json"),
    ("foreign_onnx", "an encoder takes input_ids and attention_mask"),
    ("corrupt_onnx", "cannot load"),
    ("zero_batch", "batch size 0 must be a positive integer"),
    ("negative_seq", "sequence length -4 must be a positive integer"),
    ("not_a_number", "expected comma-separated integers"),
    ("too_long", "above the maximum"),
    ("unknown_backend", "unknown backend"),
    ("torch_backend_onnx_file", "--backend torch runs checkpoints only"),
    ("quality_gate_without_data", "needs --data"),
])
def test_cli_bad_input_is_one_line_and_exit_2(dirs, tmp_path, case, message):
    root = dirs["root"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    args = {
        "missing_dir": [str(root / "nope")],
        "missing_onnx": [str(root / "nope.onnx")],
        "text_file": [str(tmp_path / "notes.txt")],
        "dir_without_config": [str(tmp_path / "empty")],
        "foreign_onnx": [_foreign_onnx(tmp_path / "foreign.onnx")],
        "corrupt_onnx": [str(tmp_path / "broken.onnx")],
        "zero_batch": [dirs["full"], "--batch-sizes", "1,0"],
        "negative_seq": [dirs["full"], "--seq-lengths=-4"],
        "not_a_number": [dirs["full"], "--batch-sizes", "one"],
        "too_long": [dirs["full"], dirs["onnx"], "--seq-lengths", "65"],  # max positions 64
        "unknown_backend": [dirs["full"], "--backend", "tensorrt"],
        "torch_backend_onnx_file": [dirs["onnx"], "--backend", "torch"],
        "quality_gate_without_data": [dirs["full"], "--max-quality-drop", "0.1"],
    }[case]
    result = invoke(*args, "--rounds", "1", "--warmup", "0")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output


def test_library_rejects_bad_sizes_before_loading_anything():
    with pytest.raises(BadInputError, match="batch size"):
        bench(["/does/not/matter"], batch_sizes=(0,))
