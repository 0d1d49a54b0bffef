"""Slim checkpoints reload bit-exactly, with shrink and through trust_remote_code without shrink."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from shrink import surgery
from shrink.errors import (
    CorruptCheckpointError,
    ManifestVersionError,
    OutputExistsError,
)
from shrink.models.hub import load_model
from shrink.models.slim import load_slim, save_slim

from helpers import REMOTE, main_output, slim_everything, tiny_inputs, tiny_model


@pytest.mark.parametrize("task", ["base", "seq"])
def test_round_trip_is_bit_exact(arch, task, tmp_path):
    model = slim_everything(tiny_model(arch, task=task))
    inputs = tiny_inputs(model)
    out = save_slim(model, tmp_path / "slim")
    reloaded = load_model(str(out))
    assert type(reloaded) is type(model)
    assert surgery.heads_per_layer(reloaded) == surgery.heads_per_layer(model) == [2, 3]
    for (name, a), (name_b, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(reloaded(**inputs)))
    config = json.loads((out / "config.json").read_text())
    assert config["shrink"]["format_version"] == 1
    assert "AutoModel" in config["auto_map"]


@pytest.mark.parametrize("arch_task", [("bert", "seq"), ("mpnet", "base"), ("distilbert", "base")])
def test_trust_remote_code_without_shrink(arch_task, tmp_path):
    arch, task = arch_task
    model = slim_everything(tiny_model(arch, task=task))
    inputs = tiny_inputs(model)
    out = save_slim(model, tmp_path / "slim")
    torch.save(inputs, out / "inputs.pt")
    cls_name = "AutoModelForSequenceClassification" if task == "seq" else "AutoModel"
    result = subprocess.run(
        [sys.executable, "-c", REMOTE, str(out), cls_name], capture_output=True, text=True, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = main_output(model(**inputs))
    torch.testing.assert_close(torch.load(out / "remote_out.pt"), expected, atol=1e-6, rtol=0)


def test_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        save_slim(tiny_model("bert"), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_slim(tiny_model("bert"), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import shrink.models.slim as slim

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(slim, "provenance", boom)  # inside write_checkpoint, in the temporary directory
    with pytest.raises(KeyboardInterrupt):
        save_slim(tiny_model("bert"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_an_error(tmp_path):
    out = save_slim(slim_everything(tiny_model("bert")), tmp_path / "slim")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="cannot load"):
        load_slim(out)


def test_weights_that_do_not_match_the_manifest_are_an_error(tmp_path):
    out = save_slim(slim_everything(tiny_model("bert")), tmp_path / "slim")
    config = json.loads((out / "config.json").read_text())
    config["shrink"]["ops"] = config["shrink"]["ops"][1:]  # forget the first heads op
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="size mismatch|cannot load"):
        load_model(str(out))


def test_newer_manifest_format_is_refused(tmp_path):
    out = save_slim(slim_everything(tiny_model("bert")), tmp_path / "slim")
    config = json.loads((out / "config.json").read_text())
    config["shrink"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestVersionError, match="newer shrink"):
        load_model(str(out))
