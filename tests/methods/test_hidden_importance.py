"""hidden.importance: the hidden dims with the largest |dL/dg| of a gate on the residual stream stay."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from shrink import surgery
from shrink.cli import app
from shrink.errors import BadInputError
from shrink.methods.catalog import get_method
from shrink.methods.hidden import hidden_importance
from shrink.prune.pipeline import run_step

from helpers import labeled_method_context, method_context, tiny_inputs, tiny_model, tiny_tokenizer, write_model_and_data

DEAD = [3, 7, 11]


def step(ctx, target, **options):
    method = get_method("hidden.importance")
    result, _ = run_step(ctx, method, method.options(**options), method.target(**target))
    return result


def labeled_context(model=None):
    return labeled_method_context(model if model is not None else tiny_model("bert", task="seq"))


def test_importance_is_the_per_example_derivative_of_scaling_a_stream_dim():
    """Against central finite differences, in float64: dim i of BERT's stream scaled by t after the
    embeddings' and every layer's LayerNorms, one example at a time."""
    ctx = labeled_context(tiny_model("bert", task="seq").double())
    scores = hidden_importance(ctx, ctx.calibration, "abs")
    model = ctx.model
    norms = [model.bert.embeddings.LayerNorm] + [m for layer in model.bert.encoder.layer
                                                 for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
    scale = torch.ones(32, dtype=torch.float64)
    handles = [m.register_forward_hook(lambda mod, a, out: out * scale) for m in norms]
    expected, eps = torch.zeros(32, dtype=torch.float64), 1e-5
    with torch.no_grad():
        for batch in ctx.calibration:
            for row in range(4):
                example = {k: v[row:row + 1] for k, v in batch.items()}
                targets = ctx.objective.targets(example)
                for i in range(32):
                    losses = []
                    for t in (1 + eps, 1 - eps):
                        scale[i] = t
                        losses.append(ctx.objective(model, example, targets))
                    scale[i] = 1.0
                    expected[i] += ((losses[0] - losses[1]) / (2 * eps)).abs()
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)


def test_dead_dims_go_first_and_the_plan_applies():
    """Dims whose LayerNorm weight and bias are zero everywhere are zero on the stream: no gradient."""
    model = tiny_model("bert", task="seq")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p[DEAD] = 0.0
    ctx = labeled_context(model)
    result = step(ctx, {"hidden_count": 29})
    kept = [i for i in range(32) if i not in DEAD]
    assert result.plan == [surgery.KeepHidden(kept)]
    assert surgery.manifest_of(ctx.model)["ops"] == [{"op": "hidden", "keep": kept}]
    assert surgery.hidden_size(ctx.model) == 29
    assert result.stats["hidden_before"] == 32 and result.stats["hidden_after"] == 29


def test_fraction_fisher_and_nothing_to_remove():
    ctx = labeled_context()
    assert step(ctx, {"hidden_fraction": 1.0}).plan == []
    result = step(ctx, {"hidden_fraction": 0.5}, score="fisher")
    assert len(result.plan[0].keep) == 16 and surgery.hidden_size(ctx.model) == 16
    assert len(step(ctx, {}).plan[0].keep) == 12  # the default keeps 0.75 of what is there


def test_an_embedding_model_needs_the_width_change_allowed():
    ctx = method_context(tiny_model("mpnet"))
    with pytest.raises(BadInputError, match="narrower"):
        step(ctx, {"hidden_count": 20})
    assert surgery.manifest_of(ctx.model)["ops"] == []
    step(ctx, {"hidden_count": 20}, allow_embedding_width_change=True)
    with torch.no_grad():
        assert ctx.model(**tiny_inputs(ctx.model)).last_hidden_state.shape[-1] == 20


def test_bad_targets():
    method = get_method("hidden.importance")
    with pytest.raises(ValidationError, match="not both"):
        method.target(hidden_fraction=0.5, hidden_count=3)
    with pytest.raises(ValidationError):
        method.target(hidden_fraction=0)
    with pytest.raises(BadInputError, match="cannot keep 40"):
        step(labeled_context(), {"hidden_count": 40})


def test_hidden_importance_recipe_end_to_end(tmp_path):
    root = write_model_and_data(tmp_path)
    model = tiny_model("bert", task="seq")
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(root / "seq")
    tiny_tokenizer().save_pretrained(root / "seq")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "prune", str(root / "seq"), "--recipe", "hidden-importance", "--data", str(root / "data.txt"), "-o", str(out),
        "--set", "steps.0.options.calibration_samples=8", "--set", "steps.1.options.max_steps=2",
        "--max-samples", "16", "--eval-samples", "8", "--max-length", "32", "--no-export",
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "config.json").read_text())["shrink"]
    assert [(op["op"], len(op["keep"])) for op in manifest["ops"]] == [("hidden", 24)]
    info = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["hidden_size"] == 24
