"""A slim checkpoint written before plans became typed ops (tests/fixtures/legacy_v1, made by
tests/fixtures/make_legacy_v1.py with that code) still reloads bit-exactly: with shrink, and through
its own modeling_shrink.py with trust_remote_code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from shrink import surgery
from shrink.models.hub import load_model

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "legacy_v1"

REMOTE = textwrap.dedent(
    """
    import sys, torch
    sys.modules["shrink"] = None  # the checkpoint must not need shrink
    from safetensors.torch import load_file
    from transformers import AutoModel
    path = sys.argv[1]
    expected = load_file(path + "/expected.safetensors")
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state
    assert torch.equal(out, expected["last_hidden_state"]), (out - expected["last_hidden_state"]).abs().max()
    """
)


def test_legacy_checkpoint_loads_bit_exactly_with_shrink():
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    model = load_model(str(FIXTURE))
    assert surgery.heads_per_layer(model) == [2, 3]
    assert surgery.ffn_per_layer(model) == [12, 0]
    with torch.no_grad():
        out = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).last_hidden_state
    assert torch.equal(out, expected["last_hidden_state"])


def test_legacy_checkpoint_loads_bit_exactly_through_its_own_runtime(tmp_path):
    result = subprocess.run(  # a fresh HOME: transformers caches the remote code under it
        [sys.executable, "-c", REMOTE, str(FIXTURE)], capture_output=True, text=True, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
