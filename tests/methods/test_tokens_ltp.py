"""Learned token pruning (tokens.ltp): hard thresholds on the attention a token receives (the kept
count follows the scores, per sample), their exact reload and ONNX export, the soft training mode and
the method reaching its target."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import ARCHITECTURES, method_context, tiny_model
from test_tokens import hidden, padded_batch

from shrink import surgery
from shrink.measure.export import export_onnx
from shrink.measure.onnx_session import graph_feed, session
from shrink.methods.catalog import get_method
from shrink.models.hub import load_model
from shrink.models.slim import save_slim
from shrink.prune.pipeline import run_step
from shrink.surgery import runtime


def thresholded(model, thresholds, fill="state"):
    model = copy.deepcopy(model)
    surgery.apply(model, [surgery.KeepTokens({}, fill=fill, thresholds=thresholds)])
    return model


def layer0_scores(model, batch) -> torch.Tensor:
    """The scores after layer 0 computed here from its query/key projections: received attention / heads."""
    captured = {}
    layer = model.encoder.layer[0].attention.self
    hooks = [getattr(layer, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in ("query", "key")]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].float()
    significance = runtime.token_significance(captured["query"], captured["key"], real, 8)
    return significance / 4


def test_the_kept_count_is_the_tokens_scoring_at_least_the_threshold():
    model = tiny_model("bert")
    batch = padded_batch(model, lengths=(20, 12, 6))
    scores = layer0_scores(model, batch)
    real = batch["attention_mask"].bool()
    threshold = float(scores[real].median())
    slim = thresholded(model, {0: threshold})
    hidden(slim, batch)
    _, counts = runtime.encoder_of(runtime.adapter_for(slim.config), slim).shrink_kept_counts
    first = torch.zeros_like(real)
    first[:, 0] = True
    expected = (((scores >= threshold) | first) & real).sum(1)
    assert counts[0].tolist() == expected.tolist() and 1 < expected.min() and expected.max() < 20
    assert (expected.float() / real.sum(1)).std() > 0  # not one fraction for all: the count follows the scores


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_threshold_zero_is_the_unpruned_model_and_a_padded_batch_is_each_sample_alone(arch):
    model = tiny_model(arch)
    batch = padded_batch(model)
    real = batch["attention_mask"].bool()
    reference = hidden(model, batch)
    assert torch.equal(hidden(thresholded(model, {0: 1e-9}), batch)[real], reference[real])
    slim = thresholded(model, {0: 0.8, 1: 1.0})
    together = hidden(slim, batch)
    assert (together[real] - reference[real]).abs().max() > 1e-3
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        alone = hidden(slim, {"input_ids": batch["input_ids"][row : row + 1, :n]})
        torch.testing.assert_close(together[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_thresholds_reload_exactly_and_export_with_parity(tmp_path):
    model = thresholded(tiny_model("bert"), {0: 0.8, 1: 1.0}, fill="kept_mean")
    batch = padded_batch(model)
    expected = hidden(model, batch)
    save_slim(model, tmp_path / "slim")
    assert torch.equal(hidden(load_model(str(tmp_path / "slim")), batch), expected)
    report = export_onnx(model, tmp_path / "model.onnx", parity_batches=[batch])
    sess = session(tmp_path / "model.onnx")
    for lengths in ((5,), (60, 31, 9, 2)):
        other = padded_batch(model, lengths)
        feed = {**other, "token_type_ids": torch.zeros_like(other["input_ids"])}
        got = sess.run(["last_hidden_state"], graph_feed(sess, {k: feed[k] for k in report["inputs"]}))[0]
        np.testing.assert_allclose(got, hidden(model, other).numpy(), atol=1e-4, rtol=1e-4)


def test_bad_thresholds_are_refused():
    from shrink.errors import BadInputError

    model = tiny_model("bert")
    with pytest.raises(BadInputError, match="threshold"):
        surgery.apply(model, [surgery.KeepTokens({}, thresholds={0: -1.0})])
    with pytest.raises(BadInputError, match="out of range"):
        surgery.apply(model, [surgery.KeepTokens({}, thresholds={7: 1.0})])


def test_ltp_learns_thresholds_towards_its_target_and_leaves_a_plain_encoder():
    model = tiny_model("bert")
    batches = [padded_batch(model, lengths=(24, 16, 10, 30), seed=s) for s in range(3)]
    ctx = method_context(model, batches)
    method = get_method("tokens.ltp")
    result, _ = run_step(ctx, method, method.options(epochs=20, threshold_lr=0.05, penalty=50.0, train_model=False, dropout=False),
                         method.target(keep_fraction=0.6))
    stats = result.stats
    tokens = model.encoder.shrink_tokens  # run_step applied the plan: the hard thresholds, no soft mode left
    assert "soft" not in tokens and tokens["thresholds"][:2] == [t if t > 0 else 0.0 for t in stats["thresholds"][:2]]
    assert stats["log"][0]["work"] > 0.9 and stats["soft_mean_keep"] < 0.8  # the penalty pulled the work down
    assert any(t > 0 for t in stats["thresholds"]) and stats["hard_mean_keep"] < 0.9
    assert [type(op).__name__ for op in result.plan] == ["KeepTokens"] and result.plan[0].thresholds
