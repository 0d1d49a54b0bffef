"""The shared training loop (shrink.train.loop.train) and shared-forward objectives."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from helpers import sharp, tiny_inputs, tiny_model

from shrink.train.loop import Hooks, batch_order, schedule, total_steps, train
from shrink.train.objectives import Objective, SumObjective, choose_objective


class Regression(Objective):
    """Mean squared error of a plain torch model on {"x", "y"} batches: the loop needs no transformer."""

    name = "regression"
    uses_teacher = False

    def per_sample(self, student, batch, targets):
        return ((student(batch["x"]) - batch["y"]) ** 2).mean(dim=-1)


def toy(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(dropout), torch.nn.Linear(8, 2))


def toy_batches(n: int = 6, sign: float = 1.0, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        made.append({"x": x, "y": sign * torch.stack([x.sum(-1), x[:, 0] - x[:, 1]], dim=-1)})
    return made


def test_hooks_run_in_order_once_per_micro_batch_and_step():
    events = []
    hooks = Hooks(
        before_step=lambda step: events.append(("before", step)),
        extra_loss=lambda step: events.append(("extra", step)) or torch.zeros(()),
        after_step=[lambda done, total, loss: events.append(("after", done, total)),
                    lambda done, total, loss: events.append(("after2", done))],
    )
    history = train(toy(), toy_batches(5), Regression(), epochs=1, grad_accum=2, lr=1e-2, hooks=hooks, progress=False)
    assert history["steps"] == 3 == total_steps(5, 1, 2)  # 5 micro-batches: 2 + 2 + the last one alone
    assert events == [
        ("before", 0), ("extra", 0), ("before", 0), ("extra", 0), ("after", 1, 3), ("after2", 1),
        ("before", 1), ("extra", 1), ("before", 1), ("extra", 1), ("after", 2, 3), ("after2", 2),
        ("before", 2), ("extra", 2), ("after", 3, 3), ("after2", 3),
    ]


def test_extra_loss_and_extra_optimizers_act():
    """A Lagrangian-like term: theta descends on loss + m * penalty while m ascends (maximize)."""
    model = toy()
    extra = torch.zeros(1, requires_grad=True)  # a parameter outside the model, its own optimizer
    multiplier = torch.zeros((), requires_grad=True)
    extra_optimizer = torch.optim.Adam([extra], lr=0.1)
    ascent = torch.optim.Adam([multiplier], lr=0.1, maximize=True)
    penalty = lambda: model[0].weight.pow(2).sum()
    before = float(penalty())
    seen = []
    hooks = Hooks(extra_loss=lambda step: ((extra - 3) ** 2).sum() + multiplier * penalty(),
                  after_step=[lambda done, total, loss: seen.append((float(extra), float(multiplier)))])
    history = train(model, toy_batches(), Regression(), epochs=5, lr=1e-2, warmup=0.0, hooks=hooks,
                    extra_optimizers=[extra_optimizer, ascent], progress=False)
    assert history["steps"] == 30
    assert abs(float(extra) - 3) < 1.0 and seen[0][0] > 0  # descended from 0 towards 3 from the first step
    assert float(multiplier) > 1.0 and all(a[1] < b[1] for a, b in pairwise(seen))  # ascent: penalty > 0
    assert extra.grad is None and multiplier.grad is None  # zeroed with the weights after each step
    plain = toy()
    train(plain, toy_batches(), Regression(), epochs=5, lr=1e-2, warmup=0.0, progress=False)
    # the growing price on the penalty reached the model's weights: smaller than without it
    assert float(penalty()) < float(plain[0].weight.pow(2).sum()) and float(penalty()) < before


def test_early_stop_restores_the_best_weights():
    model = toy()
    start = copy.deepcopy(model.state_dict())
    held_out = toy_batches(3, sign=-1.0, seed=1)  # training can only get worse at this
    objective = Regression()

    def evaluate():
        with torch.no_grad():
            return float(torch.cat([objective.per_sample(model, b, {}) for b in held_out]).mean())

    after = []
    history = train(model, toy_batches(), objective, epochs=10, lr=1e-2, evaluate=evaluate, eval_every=2,
                    early_stop_patience=3, hooks=Hooks(after_step=[lambda *a: after.append(a[0])]), progress=False)
    assert history["stopped_early"] and history["kept_best"]
    assert history["steps"] == 6 == len(after) and [e["step"] for e in history["evals"]] == [2, 4, 6]
    assert history["eval_loss_after"] == history["eval_loss_before"] < min(e["loss"] for e in history["evals"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]), name
    assert not model.training


def test_evaluate_without_patience_only_reports():
    model = toy()
    objective = Regression()
    batches = toy_batches()
    evaluate = lambda: float(torch.cat([objective.per_sample(model, b, {}) for b in batches]).mean())
    history = train(model, batches, objective, epochs=3, lr=1e-2, evaluate=evaluate, progress=False)
    assert not history["evals"] and not history["stopped_early"] and "kept_best" not in history
    assert history["eval_loss_after"] < history["eval_loss_before"]


def test_the_loop_is_deterministic_by_seed():
    """Same seed: the same batch order and dropout draws, so the same losses and weights."""
    runs = []
    for seed in (5, 5, 6):
        model = toy(dropout=0.3)
        history = train(model, toy_batches(), Regression(), epochs=3, lr=1e-2, seed=seed, progress=False)
        runs.append((history["losses"], model.state_dict()))
    assert runs[0][0] == runs[1][0] and runs[0][0] != runs[2][0]
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


def test_batch_order_shuffles_each_epoch_and_the_schedule_warms_up_then_decays():
    order = batch_order(4, 10, seed=0)
    assert len(order) == 10 and sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3]
    assert order == batch_order(4, 10, seed=0) and order[:6] == batch_order(4, 6, seed=0)  # a prefix
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler, lrs = schedule(optimizer, total_steps=10, warmup=0.2), []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in pairwise(lrs[2:]))
    assert total_steps(10, 1.5, grad_accum=4) == 4 and total_steps(10, 1.5, max_steps=3) == 3


class Counter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("task, kinds", [
    ("seq", ["task", "logits_kl", "hidden_mse", "embedding_cosine"]),
    ("base", ["embedding_cosine", "hidden_mse"]),
    ("tok", ["logits_kl", "hidden_mse"]),
])
def test_sum_objective_shares_one_forward_and_equals_the_weighted_sum_of_its_parts(task, kinds):
    teacher = sharp(tiny_model("bert", task))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = {**tiny_inputs(teacher, batch=3), "labels": torch.tensor([0, 2, 1])}
    parts = [choose_objective(student, teacher, True, kind) for kind in kinds]
    weights = [1.0, 0.5, 2.0, 1.0][: len(parts)]
    separate = sum(w * p.per_sample(student, batch, p.targets(batch)) for p, w in zip(parts, weights))
    objective = SumObjective(parts, weights)
    forwards = Counter(student), Counter(teacher)
    shared = objective.per_sample(student, batch, objective.targets(batch))
    assert [c.calls for c in forwards] == [1, 1]
    assert shared.shape == (3,)
    torch.testing.assert_close(shared, separate, atol=1e-6, rtol=0)
