"""Sparse weights files (sparse-bitmask-v1): exact round trips of the layout, and a 90%-sparse tiny
BERT that reloads bit-identically with shrink.load and with trust_remote_code in a process without
shrink, from a file whose sparse matrices take >= 5x fewer bytes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shrink.cli import app
from shrink.errors import BadInputError, CorruptCheckpointError, ManifestVersionError
from shrink.methods.magnitude import apply_masks, magnitude_masks
from shrink.models.hub import load_model
from shrink.models.slim import checkpoint_kind, load_slim, save_slim
from shrink.models.sparse import choose, encode, saved_state
from shrink.surgery import encoder_weights, runtime

from helpers import assert_exit, main_output, tiny_inputs, tiny_model, write_model_and_data


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def round_trip(state: dict) -> dict:
    tensors, metadata = encode(state)
    with_files = runtime.densify(tensors, json.loads(metadata[runtime.SPARSE_SHAPES_KEY]))
    return tensors, with_files


def sparse_tensor(shape, sparsity: float, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (17, 9), (2, 3, 7), (4, 8)])
def test_encode_decode_is_bit_exact(dtype, shape):
    state = {"a.weight": sparse_tensor(shape, 0.9, dtype), "b.bias": torch.zeros(shape[-1], dtype=dtype)}
    tensors, dense = round_trip(state)
    assert set(dense) == set(state)
    for name in state:
        assert same_bits(dense[name], state[name]), name
    sparse = state["a.weight"].count_nonzero() <= 0.5 * state["a.weight"].numel()
    assert ("a.weight.sparse_mask" in tensors) == bool(sparse)
    assert "b.bias.sparse_mask" not in tensors  # rank 1 stays dense


def test_all_zero_no_zero_negative_zero_and_nan_tensors():
    negative = torch.zeros(6, 5)
    negative[0, 0], negative[2, 3], negative[5, 4] = -0.0, 1.5, float("nan")
    state = {"zero": torch.zeros(4, 6), "full": torch.randn(4, 6) + 10, "neg": negative, "ints": torch.zeros(3, 3, dtype=torch.long)}
    tensors, dense = round_trip(state)
    assert tensors["zero"].numel() == 0 and "zero.sparse_signs" not in tensors
    assert "full.sparse_mask" not in tensors and "ints.sparse_mask" not in tensors  # dense, or not floating
    assert "neg.sparse_signs" in tensors  # -0.0 keeps its sign
    for name in state:
        assert same_bits(dense[name], state[name]), name
    assert torch.signbit(dense["neg"][0, 0]) and torch.isnan(dense["neg"][5, 4])


def test_bitmask_is_numpy_packbits_order():
    t = torch.zeros(1, 10)
    t[0, 1], t[0, 8] = 2.0, 3.0
    tensors, _ = encode({"w": t})
    assert tensors["w.sparse_mask"].tolist() == [0b01000000, 0b10000000]
    assert tensors["w.sparse_mask"].tolist() == np.packbits([0, 1, 0, 0, 0, 0, 0, 0, 1, 0]).tolist()
    assert tensors["w"].tolist() == [2.0, 3.0]  # nonzeros in row-major order


def test_a_damaged_sparse_file_is_one_clear_error():
    tensors, metadata = encode({"w": sparse_tensor((8, 8), 0.9, torch.float32)})
    shapes = json.loads(metadata[runtime.SPARSE_SHAPES_KEY])
    with pytest.raises(ValueError, match="bitmask marks"):
        runtime.densify({**tensors, "w": tensors["w"][:-1]}, shapes)
    with pytest.raises(ValueError, match="bitmask of sparse tensor w"):
        runtime.densify({"w": tensors["w"]}, shapes)
    with pytest.raises(ValueError, match="not a mapping of names to shapes"):
        runtime.densify(tensors, {"w": "8x8"})


def test_choose_follows_the_setting():
    state = {"w": sparse_tensor((64, 64), 0.9, torch.float32), "e": torch.randn(64, 64)}
    assert choose(state, "off") is None
    weights = choose(state, "auto")  # 2 x 16 KiB dense -> 16 KiB + ~2 KiB: 1.8x
    assert weights is not None and weights.sparse_tensors == 1 and weights.ratio > 1.5
    assert choose({**state, "e2": torch.randn(64, 128)}, "auto") is None  # 1.3x: not worth a non-standard file
    assert choose({**state, "e2": torch.randn(64, 128)}, "on") is not None
    assert choose({"e": torch.randn(8, 8)}, "on") is None  # nothing sparse
    with pytest.raises(BadInputError, match="sparse format 'maybe'"):
        choose(state, "maybe")


# --- a 90%-sparse tiny BERT, saved and reloaded -----------------------------------------------


def sparse_bert(task: str = "mlm", sparsity: float = 0.9):
    model = tiny_model("bert", task=task)
    weights = encoder_weights(model)
    apply_masks(weights, magnitude_masks(weights, sparsity, "per_matrix"))
    return model


def sparse_part_bytes(path) -> tuple[int, int]:
    """(dense bytes, stored bytes) of the tensors the file stores sparse."""
    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads(f.metadata()[runtime.SPARSE_SHAPES_KEY])
    tensors = load_file(str(path))
    stored = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.split(".sparse_")[0] in shapes)
    dense = sum(int(np.prod(shape)) * tensors[n].element_size() for n, shape in shapes.items())
    return dense, stored


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    models = {task: sparse_bert(task) for task in ("mlm", "base")}
    paths = {task: save_slim(model, root / task) for task, model in models.items()}
    dense = save_slim(models["mlm"], root / "dense", sparse_format="off")
    return models, paths, dense


def test_sparse_checkpoint_is_smaller_and_says_what_it_is(checkpoints):
    models, paths, dense = checkpoints
    weights = paths["mlm"] / "model.safetensors"
    dense_part, stored_part = sparse_part_bytes(weights)
    assert dense_part / stored_part >= 5  # the pruned matrices (embeddings stay dense; see the whole file)
    whole = (dense / "model.safetensors").stat().st_size / weights.stat().st_size
    assert whole >= 1.5
    config = json.loads((paths["mlm"] / "config.json").read_text())
    assert config["shrink"]["weights_format"] == "sparse-bitmask-v1" and config["shrink"]["format_version"] == 2
    assert "auto_map" in config and (paths["mlm"] / "modeling_shrink.py").exists()
    assert "stored sparse" in checkpoint_kind(paths["mlm"])["why"]
    assert checkpoint_kind(dense)["kind"] == "standard"  # off: the plain dense file, vanilla-loadable
    manifest = models["mlm"].config.shrink  # the live (dense) model's manifest is left as it was
    assert "weights_format" not in manifest and manifest["format_version"] == 1
    # the tensors the sparse file holds are the ones save_model wrote (tied ones once)
    assert {n for n in load_file(str(weights)) if ".sparse_" not in n} == set(load_file(str(dense / "model.safetensors")))


@pytest.mark.parametrize("task", ["mlm", "base"])
def test_shrink_load_is_bit_identical(checkpoints, task):
    models, paths, _ = checkpoints
    model, reloaded = models[task], load_model(str(paths[task]))
    assert type(reloaded) is type(model)
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert list(original) == list(loaded)
    for name in original:
        assert same_bits(original[name], loaded[name]), name
    inputs = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(reloaded(**inputs)))


REMOTE = textwrap.dedent(
    """
    import sys, torch
    sys.modules["shrink"] = None  # the checkpoint must not need shrink
    import transformers
    path, cls_name = sys.argv[1], sys.argv[2]
    model, info = getattr(transformers, cls_name).from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    inputs = torch.load(path + "/inputs.pt")
    with torch.no_grad():
        out = model.eval()(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save({"state": model.state_dict(), "out": out, "info": {k: sorted(map(str, v)) for k, v in info.items()}}, path + "/remote.pt")
    """
)


@pytest.mark.parametrize("task", ["mlm", "base"])
def test_trust_remote_code_without_shrink_is_bit_identical(checkpoints, task, tmp_path):
    models, paths, _ = checkpoints
    model, out = models[task], paths[task]
    inputs = tiny_inputs(model)
    torch.save(inputs, out / "inputs.pt")
    cls_name = "AutoModelForMaskedLM" if task == "mlm" else "AutoModel"
    result = subprocess.run([sys.executable, "-c", REMOTE, str(out), cls_name], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    remote = torch.load(out / "remote.pt")
    assert remote["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    original = model.state_dict()
    assert set(remote["state"]) == set(original)  # nothing initialised afresh, nothing left out
    for name, tensor in original.items():
        assert same_bits(tensor, remote["state"][name]), name
    with torch.no_grad():
        assert torch.equal(remote["out"], main_output(model(**inputs)))


def test_a_reloaded_sparse_model_saves_dense_or_sparse_again(checkpoints, tmp_path):
    models, paths, _ = checkpoints
    reloaded = load_model(str(paths["base"]))
    assert "weights_format" not in reloaded.config.shrink  # in memory it is dense
    dense = save_slim(reloaded, tmp_path / "dense", sparse_format="off")
    assert checkpoint_kind(dense)["kind"] == "standard"
    again = save_slim(load_model(str(dense)), tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["shrink"]["weights_format"] == "sparse-bitmask-v1"
    state = load_model(str(again)).state_dict()
    for name, tensor in models["base"].state_dict().items():
        assert same_bits(tensor, state[name]), name


def test_an_unknown_weights_format_asks_for_a_newer_shrink(tmp_path):
    out = save_slim(sparse_bert("base"), tmp_path / "slim")
    config = json.loads((out / "config.json").read_text())
    config["shrink"]["weights_format"] = "sparse-bitmask-v9"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestVersionError, match="sparse-bitmask-v9"):
        load_slim(out)


def test_a_loader_that_cannot_read_it_fails_instead_of_initialising(checkpoints):
    from transformers import BertForMaskedLM

    _, paths, _ = checkpoints
    with pytest.raises(Exception, match="mismatch|size"):  # the 1-D nonzeros under the matrix's name
        BertForMaskedLM.from_pretrained(str(paths["mlm"]))


def test_negative_zeros_survive_a_checkpoint(tmp_path):
    model = tiny_model("bert")
    weights = encoder_weights(model)
    masks = magnitude_masks(weights, 0.9, "per_matrix")
    with torch.no_grad():
        for name, w in weights.items():
            w.mul_(masks[name])  # -0.0 where a weight was negative
    assert any(torch.signbit(w[w == 0]).any() for w in weights.values())
    reloaded = load_slim(save_slim(model, tmp_path / "slim"))
    for name, tensor in model.state_dict().items():
        assert same_bits(tensor, reloaded.state_dict()[name]), name


def test_corrupt_sparse_weights_are_a_checkpoint_error(tmp_path):
    out = save_slim(sparse_bert(), tmp_path / "slim")
    weights = out / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith(".sparse_mask"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(CorruptCheckpointError, match="cannot load .*bitmask"):
        load_slim(out)


def test_saved_state_matches_save_model_names():
    model = tiny_model("bert", task="mlm")  # decoder weight tied to the word embeddings
    state = saved_state(model)
    assert "cls.predictions.decoder.weight" not in state and "bert.embeddings.word_embeddings.weight" in state


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_model_and_data(tmp_path_factory.mktemp("sparse-cli"))
    (root / "magnitude.yaml").write_text(textwrap.dedent(
        """
        name: magnitude-tiny
        steps:
          - method: weights.magnitude
            target: {sparsity: 0.9}
            options: {max_steps: 2, prune_every: 1}
        """
    ))
    return root


def prune(setup, out, *extra):
    args = ["prune", str(setup / "model"), "--recipe", str(setup / "magnitude.yaml"), "--data", str(setup / "data.txt"),
            "-o", str(out), "--no-export", "--max-samples", "8", "--eval-samples", "8", "--max-length", "16"]
    return CliRunner().invoke(app, [*args, *map(str, extra)])


def test_prune_sparse_format_on_writes_a_sparse_checkpoint_that_reloads(setup, tmp_path):
    result = prune(setup, tmp_path / "slim", "--sparse-format", "on", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["kind"] == "shrink" and report["checkpoint"]["weights"]["format"] == "sparse-bitmask-v1"
    assert "stored sparse" in report["checkpoint"]["why"]
    assert "stored sparse" in (tmp_path / "slim" / "report.md").read_text()
    assert "densifies them on load" in (tmp_path / "slim" / "README.md").read_text()
    model = load_model(str(tmp_path / "slim"))
    weights = encoder_weights(model)
    assert all(int((w == 0).sum()) == round(0.9 * w.numel()) for w in weights.values())


def test_prune_rejects_an_unknown_sparse_format(setup, tmp_path):
    assert_exit(prune(setup, tmp_path / "slim", "--sparse-format", "maybe"), 2, "sparse format 'maybe'")


# --- ONNX: dense by default, sparse initializers on request ------------------------------------


def test_sparse_onnx_export_is_smaller_and_matches(tmp_path):
    import onnx
    import onnxruntime as ort

    from shrink.measure.export import export_onnx

    model = sparse_bert("base")
    dense = export_onnx(model, tmp_path / "dense.onnx")
    sparse = export_onnx(model, tmp_path / "sparse.onnx", sparse=True)  # parity-gated like the dense one
    assert sparse["sparse"]["sparse_initializers"] == len(encoder_weights(model))
    assert sparse["size_bytes"] < 0.8 * dense["size_bytes"]
    onnx.checker.check_model(str(tmp_path / "sparse.onnx"))  # int64 indices: valid ONNX
    assert len(onnx.load(str(tmp_path / "dense.onnx")).graph.sparse_initializer) == 0
    feed = {k: v.numpy() for k, v in tiny_inputs(model).items()}
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    a = ort.InferenceSession(str(tmp_path / "dense.onnx")).run(None, feed)[0]
    b = ort.InferenceSession(str(tmp_path / "sparse.onnx")).run(None, feed)[0]
    assert np.array_equal(a, b)  # onnxruntime densifies them: the same graph runs


def test_export_refuses_sparse_onnx_with_int8(tmp_path):
    out = save_slim(sparse_bert("base"), tmp_path / "slim")
    result = CliRunner().invoke(app, ["export", str(out), "-o", str(tmp_path / "m.onnx"), "--sparse-onnx", "--int8"])
    assert_exit(result, 2, "--sparse-onnx and --int8")


def test_export_sparse_onnx_from_the_cli(tmp_path):
    out = save_slim(sparse_bert("base"), tmp_path / "slim")
    result = CliRunner().invoke(app, ["export", str(out), "-o", str(tmp_path / "m.onnx"), "--sparse-onnx", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sparse"]["sparse_initializers"] == 18 and max(report["max_abs_diff"].values()) < 1e-4
