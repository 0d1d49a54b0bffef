"""Weight penalties (shrink.train.penalties): each penalty's gradient on toy tensors against its
closed form, the proximal step against the minimiser it claims, the groups, and the wiring into
distill (a penalty that works drives what it penalises towards zero)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_inputs, tiny_model
from pydantic import ValidationError

from shrink.methods.base import Context
from shrink.methods.catalog import get_method
from shrink.prune.pipeline import run_step
from shrink.train.penalties import LOSSES, Layer, PenaltyOptions, group_norms, layers_of_model, reweighted_soft_threshold
from shrink.train.objectives import choose_objective

torch.set_default_dtype(torch.float32)


def toy_layer(seed: int = 0, hidden: int = 6, heads: int = 2, ffn: int = 5) -> Layer:
    g = torch.Generator().manual_seed(seed)
    shapes = {"query": (hidden, hidden), "key": (hidden, hidden), "value": (hidden, hidden), "attention_out": (hidden, hidden),
              "ffn_in": (ffn, hidden), "ffn_out": (hidden, ffn)}
    return Layer({k: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True) for k, s in shapes.items()}, hidden // heads)


def grads(value: torch.Tensor, layer: Layer) -> dict[str, torch.Tensor]:
    tensors = list(layer.weights.values())
    found = torch.autograd.grad(value, tensors, allow_unused=True)  # a head penalty leaves the FFN alone
    return {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(layer.weights.items(), found)}


def test_l1_gradient_is_the_sign_over_the_count():
    layer = toy_layer()
    n = sum(w.numel() for w in layer.weights.values())
    got = grads(LOSSES["l1"]([layer], PenaltyOptions(name="l1", weight=1), []), layer)
    for name, w in layer.weights.items():
        torch.testing.assert_close(got[name], w.detach().sign() / n)


def test_group_lasso_on_heads_pulls_each_head_along_its_own_direction():
    layer = toy_layer()
    spec = PenaltyOptions(name="group_lasso", weight=1)  # groups: heads by default
    assert spec.groups == "heads"
    norms = group_norms([layer], "heads")[0]
    assert norms.shape == (2,)
    got = grads(LOSSES["group_lasso"]([layer], spec, []), layer)
    size, w = layer.head_size, {k: v.detach() for k, v in layer.weights.items()}
    for h in range(2):
        rows = slice(h * size, (h + 1) * size)
        norm = torch.sqrt(sum((w[k][rows] ** 2).sum() for k in ("query", "key", "value")) + (w["attention_out"][:, rows] ** 2).sum())
        for k in ("query", "key", "value"):  # d/dw mean_g ||w_g|| = w / (G ||w_g||)
            torch.testing.assert_close(got[k][rows], w[k][rows] / (2 * norm), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["attention_out"][:, rows], w["attention_out"][:, rows] / (2 * norm), rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(got["ffn_in"]) == 0  # the FFN is not a head


def test_group_lasso_on_neurons_couples_the_up_row_and_the_down_column():
    layer = toy_layer()
    got = grads(LOSSES["group_lasso"]([layer], PenaltyOptions(name="group_lasso", weight=1, groups="neurons"), []), layer)
    up, down = layer.weights["ffn_in"].detach(), layer.weights["ffn_out"].detach()
    norms = torch.sqrt((up ** 2).sum(1) + (down ** 2).sum(0))
    torch.testing.assert_close(got["ffn_in"], up / (5 * norms[:, None]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got["ffn_out"], down / (5 * norms[None, :]), rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(got["query"]) == 0


def test_hoyer_square_gradient_matches_its_closed_form_and_is_scale_invariant():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    layer = Layer({"ffn_in": w}, 1)
    spec = PenaltyOptions(name="hoyer_square", weight=1)  # rows: each row and each column a group
    value = LOSSES["hoyer_square"]([layer], spec, [])
    (got,) = torch.autograd.grad(value, [w])

    def hoyer_grad(norms_axis: int) -> torch.Tensor:  # H = S^2 / Q, S = sum n_g, Q = sum n_g^2, dn_g/dw = w / n_g
        n = torch.sqrt((w.detach() ** 2).sum(norms_axis, keepdim=True))
        s, q = n.sum(), (n ** 2).sum()
        return (2 * s / q - 2 * s ** 2 / q ** 2 * n) * w.detach() / n

    torch.testing.assert_close(got, (hoyer_grad(1) + hoyer_grad(0)) / 2, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        scaled = LOSSES["hoyer_square"]([Layer({"ffn_in": w * 7.5}, 1)], spec, [])
    torch.testing.assert_close(scaled, value.detach(), rtol=1e-5, atol=1e-8)
    one_row = torch.zeros(4, 3, dtype=torch.float64)
    one_row[1, 2] = 3.0  # a single nonzero group: the minimum, 1 (up to the 1e-4 norm EPS gives the empty groups)
    assert float(LOSSES["hoyer_square"]([Layer({"ffn_in": one_row}, 1)], spec, [])) == pytest.approx(1.0, abs=1e-3)
    assert float(value) > 1.5


def test_aligned_penalties_vanish_at_the_original_and_point_back_to_it():
    layer = toy_layer()
    originals = [w.detach().clone() for w in layer.weights.values()]
    for name in ("aligned_cosine", "aligned_frobenius"):
        assert float(LOSSES[name]([layer], PenaltyOptions(name=name, weight=1), originals)) == pytest.approx(0, abs=1e-6)
    moved = Layer({k: (v.detach() + 0.3 * torch.randn_like(v)).requires_grad_(True) for k, v in layer.weights.items()}, 3)
    got = grads(LOSSES["aligned_frobenius"]([moved], PenaltyOptions(name="aligned_frobenius", weight=1), originals), moved)
    for (name, w), o in zip(moved.weights.items(), originals):  # d/dW ||W - W0||^2 / ||W0||^2 / M
        torch.testing.assert_close(got[name], 2 * (w.detach() - o) / (o ** 2).sum() / 6)
    got = grads(LOSSES["aligned_cosine"]([moved], PenaltyOptions(name="aligned_cosine", weight=1), originals), moved)
    for (name, w), o in zip(moved.weights.items(), originals):  # -d cos / dW, averaged over 6 matrices
        w, a, b = w.detach().flatten(), None, None
        a, b = w.norm(), o.flatten().norm()
        cos = (w @ o.flatten()) / (a * b)
        expected = -(o.flatten() / (a * b) - cos * w / a ** 2) / 6
        torch.testing.assert_close(got[name].flatten(), expected, rtol=1e-5, atol=1e-9)


def test_every_loss_penalty_passes_gradcheck():
    layer = toy_layer(seed=5)
    originals = [w.detach() + 0.1 for w in layer.weights.values()]
    for name in LOSSES:
        groups = {"group_lasso": ["heads", "neurons", "rows"], "hoyer_square": ["rows", "heads", "neurons"]}.get(name, [None])
        for group in groups:
            spec = PenaltyOptions(name=name, weight=1, **({"groups": group} if group else {}))
            tensors = list(layer.weights.values())

            def f(*ws, spec=spec):
                return LOSSES[spec.name]([Layer(dict(zip(layer.weights, ws)), layer.head_size)], spec, originals)

            assert torch.autograd.gradcheck(f, tensors), (name, group)


def test_the_proximal_step_is_the_minimiser_of_the_reweighted_l1_problem():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, generator=g, dtype=torch.float64)
    a = torch.rand(50, generator=g, dtype=torch.float64) + 0.2
    x = v.clone()
    reweighted_soft_threshold(x, 0.4, a)
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64)  # brute force per coordinate, step 1e-4
    objective = 0.5 * (grid[None, :] - v[:, None]) ** 2 + 0.4 * a[:, None] * grid[None, :].abs()
    best = grid[objective.argmin(1)]
    torch.testing.assert_close(x, best, atol=2e-4, rtol=0)
    assert int((x == 0).sum()) == int((v.abs() <= 0.4 * a).sum()) > 0


def test_options_are_checked():
    with pytest.raises(ValidationError, match="groups"):
        PenaltyOptions(name="group_lasso", weight=1, groups="weights")
    with pytest.raises(ValidationError, match="single weights"):
        PenaltyOptions(name="l1", weight=1, groups="heads")
    with pytest.raises(ValidationError):
        PenaltyOptions(name="l2", weight=1)
    with pytest.raises(ValidationError):
        PenaltyOptions(name="l1", weight=0)


def test_layers_of_a_real_model_skip_removed_blocks():
    from shrink import surgery

    model = tiny_model("bert")
    surgery.prune_heads(model, {1: []})
    layers = layers_of_model(model)
    assert [sorted(layer.weights) for layer in layers][1] == ["ffn_in", "ffn_out"]
    assert [len(n) for n in group_norms(layers, "heads")] == [4, 4]


def _distill_with(penalties: list[dict], steps: int = 32):
    model, teacher = tiny_model("bert"), tiny_model("bert")
    batches = [tiny_inputs(model, batch=4, seed=s) for s in range(4)]
    ctx = Context(model=model, teacher=teacher, tokenizer=None, calibration=batches, calibration_batches=lambda *a: batches,
                  evaluation=[], objective=choose_objective(model, teacher, has_labels=False), has_labels=False)
    method = get_method("distill")
    options = method.options(epochs=steps // len(batches), lr=1e-3, dropout=False, warmup=0, penalties=penalties)
    result, _ = run_step(ctx, method, options, method.target())
    return model, result.stats


def test_penalties_in_distill_move_the_weights_the_way_they_say():
    plain, _ = _distill_with([])
    lasso, stats = _distill_with([{"name": "group_lasso", "weight": 5.0, "groups": "neurons"}])
    norm = lambda m: float(group_norms(layers_of_model(m), "neurons")[0].mean())  # noqa: E731
    assert norm(lasso) < 0.9 * norm(plain)
    assert stats["penalties"]["last_values"]["group_lasso"] > 0
    rpp, stats = _distill_with([{"name": "rpp", "weight": 20.0, "reweight_every": 5}])
    assert stats["penalties"]["zero_fraction"] > 0.05  # the proximal step makes exact zeros
    assert all(int((w == 0).sum()) == 0 for layer in layers_of_model(plain) for w in layer.weights.values())
