"""Time budgets (issue 16): train() under a wall-time cap shortens its run and rescales its schedule;
the pipeline splits `--budget` among the steps that train; scoring methods keep their own sample
counts whatever the calibration split holds. A fake clock that advances one second per micro-batch
makes every decision deterministic (nothing sleeps)."""

from __future__ import annotations

import pytest
import torch
from helpers import method_context, tiny_model

from shrink.errors import BadInputError
from shrink.methods.catalog import all_methods
from shrink.prune.pipeline import PruneSettings, budget_share, check_budget, run_step
from shrink.train import loop
from shrink.train.loop import (
    WarmupDecay,
    format_duration,
    parse_duration,
    time_budget,
    train,
)
from shrink.train.objectives import Objective


class Regression(Objective):
    name = "regression"
    uses_teacher = False

    def per_sample(self, student, batch, targets):
        return ((student(batch["x"]) - batch["y"]) ** 2).mean(dim=-1)


def toy(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def toy_batches(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    made = []
    for _ in range(n):
        x = torch.randn(5, 4, generator=g)
        made.append({"x": x, "y": torch.stack([x.sum(-1), x[:, 0] - x[:, 1]], dim=-1)})
    return made


class Clock:
    """Seconds that pass only when a micro-batch starts (one each)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, step: int) -> None:
        self.now += 1.0


@pytest.fixture
def lrs(monkeypatch):
    """The learning rate of every optimizer step the loop takes, and its optimizers."""
    seen = {"lrs": [], "optimizers": []}

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["optimizers"].append(self)

        def step(self, closure=None):
            seen["lrs"].append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return seen


def budgeted(clock, budget_s=20.0, epochs=10, **kwargs):
    hooks = loop.Hooks(before_step=clock.tick, after_step=kwargs.pop("after_step", []))
    return train(toy(), toy_batches(), Regression(), epochs=epochs, lr=1e-2, warmup=0.1, hooks=hooks, progress=False,
                 budget_s=budget_s, clock=clock, **kwargs)


def test_a_tiny_budget_shortens_the_run_and_the_schedule_ends_at_its_last_step(lrs, monkeypatch):
    notes = []
    monkeypatch.setattr(loop, "note", notes.append)
    clock, totals = Clock(), []
    history = budgeted(clock, after_step=[lambda done, total, loss: totals.append((done, total))])
    # 60 planned steps of 1 s; after the 3 probe steps 17 s are left: 20 steps in all
    assert history["steps"] == 20 == len(history["losses"]) == len(lrs["lrs"])
    record = history["budget"]
    assert record["planned_steps"] == 60 and record["steps"] == 20 and record["shortened"] and not record["over_budget"]
    assert record["epochs_done"] == round(20 / 6, 3) and record["planned_epochs"] == 10 and record["seconds"] == 20
    assert record["trade"] == "3.3 of 10 epochs over 30 examples (20 of 60 steps, budget 20 s)"
    assert len(notes) == 1 and "60 steps do not fit in the budget of 20 s: training 20" in notes[0]
    # the hooks see the new total, so a schedule driven by them (weights.magnitude) ends with the run
    assert totals[-1] == (20, 20) and totals[0] == (1, 60)
    # from the decision on, the rates are exactly a 20-step warm-up + linear decay; the last one is
    # the smallest and the scheduler's next (final) rate is zero
    schedule = WarmupDecay(20, 0.1)
    assert lrs["lrs"][3:] == pytest.approx([1e-2 * schedule(s) for s in range(3, 20)])
    assert lrs["lrs"][-1] == pytest.approx(1e-2 / 18) and min(lrs["lrs"]) == lrs["lrs"][-1]
    assert lrs["optimizers"][0].param_groups[0]["lr"] == 0.0


def test_no_budget_or_a_budget_that_fits_changes_nothing(lrs):
    plain = train(toy(), toy_batches(), Regression(), epochs=3, lr=1e-2, progress=False)
    plain_lrs, lrs["lrs"][:] = list(lrs["lrs"]), []
    assert plain["steps"] == 18 and "budget" not in plain
    clock = Clock()
    roomy = budgeted(clock, budget_s=1000, epochs=3)
    assert roomy["steps"] == 18 and roomy["losses"] == plain["losses"] and lrs["lrs"] == plain_lrs
    assert not roomy["budget"]["shortened"] and roomy["budget"]["epochs_done"] == 3


def test_evaluations_to_come_are_counted_at_their_own_cost():
    """Keep-best evaluations (5 s each, every 2 steps) and the final one are planned for: 1 s steps
    cost 3.5 s each with them, and the run ends inside its 40 s."""
    clock = Clock()

    def evaluate():
        clock.now += 5.0
        return 1.0

    history = budgeted(clock, budget_s=40, evaluate=evaluate, eval_every=2, early_stop_patience=100)
    assert history["steps"] == 9 and len(history["evals"]) == 4
    assert history["budget"]["seconds"] == 39 and not history["budget"]["over_budget"]


def test_default_evaluation_interval_follows_the_shortened_run():
    """Early stopping evaluates every tenth step of the run: of the shortened one (60 -> 20 steps,
    every 2nd), not every 6th of the planned one."""
    clock = Clock()
    history = budgeted(clock, budget_s=20, evaluate=lambda: 1.0, early_stop_patience=100)
    assert history["steps"] == 20 and [e["step"] for e in history["evals"]] == list(range(4, 21, 2))


def test_min_fraction_keeps_a_floor_even_over_budget():
    history = budgeted(Clock(), budget_s=1, min_fraction=0.5)
    # one step past half of the 60: a schedule over the first half (l0's target) reaches its end
    assert history["steps"] == 31 and history["budget"]["over_budget"] and history["budget"]["min_steps"] == 31


def test_a_scope_shares_its_seconds_among_the_runs_inside():
    clock = Clock()
    with time_budget(30, clock=clock) as scope:
        first = budgeted(clock, budget_s=None)
        second = budgeted(clock, budget_s=None)
    assert first["steps"] == 30 and second["steps"] == 3  # the second has nothing left: it stops after the probe
    assert scope.spent == 33 and [run["steps"] for run in scope.runs] == [30, 3]
    assert loop._SCOPE.get() is None
    with time_budget(None) as nothing:
        assert nothing is None and "budget" not in budgeted(clock, budget_s=None, epochs=1)


def test_a_scope_min_fraction_applies():
    clock = Clock()
    with time_budget(1, min_fraction=0.25, clock=clock):
        assert budgeted(clock, budget_s=None)["steps"] == 16


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("1.5h", 5400), ("5", 300), (" 2 min ", 120),
                                           ("0.5", 30), ("45sec", 45), ("2H", 7200), (".5h", 1800), (3, 180)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "-5", "0", "0s", "nan", "inf", "1e3", "5 m s", "m", "10m30s"])
def test_bad_durations_are_one_clear_error(text):
    with pytest.raises(BadInputError, match="--budget") as caught:
        parse_duration(text)
    assert "90s, 10m, 1.5h" in caught.value.hint


def test_format_duration():
    assert [format_duration(s) for s in (90, 600, 5400)] == ["90 s", "10 min", "1.5 h"]


def test_check_budget_takes_seconds_or_a_duration():
    assert check_budget(None) is None and check_budget(42) == 42.0 and check_budget("2m") == 120
    for bad in (0, -1, float("inf")):
        with pytest.raises(BadInputError):
            check_budget(bad)


def test_the_budget_is_split_evenly_among_the_training_steps_left():
    assert budget_share(None, 0, [True]) is None
    assert budget_share(600, 0, [False, True, True]) is None  # a scoring step gets no budget
    assert budget_share(600, 0, [True, False, True]) == 300
    assert budget_share(600, 100, [True]) == 500  # what the first left unused goes to the last
    assert budget_share(600, 700, [True, True]) == 0


def test_the_training_methods_declare_it():
    methods = all_methods()
    assert sorted(name for name, m in methods.items() if m.trains) == ["distill", "embedding.nonlinear", "heads.dsp", "heads.gates", "l0", "structured.earlybert", "tokens.ltp", "weights.magnitude"]
    l0 = methods["l0"]
    assert l0.min_train_fraction(l0.options(target_warmup=0.3)) == 0.3  # a cut l0 still anneals to its target
    assert PruneSettings().max_samples is None and PruneSettings().budget is None


class Untouchable(list):
    """ctx.calibration for a scoring method: all the training data, which it must never read."""

    def _refuse(self, *args):
        raise AssertionError("a method that only scores read ctx.calibration (all of the calibration split)")

    __iter__ = __len__ = __getitem__ = __bool__ = _refuse


SCORING = sorted(name for name, m in all_methods().items() if not m.trains)


@pytest.mark.parametrize("name", SCORING)
def test_scoring_methods_score_their_own_sample_counts(name):
    """Every method that does not train asks ctx.calibration_batches for its calibration_samples (or
    counts tokens, count_samples), never for the whole split through ctx.calibration."""
    method = all_methods()[name]
    model = tiny_model("bert")
    ctx = method_context(model)
    batches, asked = ctx.calibration_batches([], 0, 0), []
    ctx.calibration = Untouchable()
    ctx.calibration_batches = lambda n, length, size: asked.append(n) or batches
    smoke = method.smoke or {}
    options = method.options(**smoke.get("options", {}))
    run_step(ctx, method, options, method.target(**smoke.get("target", {})))
    wanted = [getattr(options, key) for key in ("calibration_samples", "count_samples") if hasattr(options, key)]
    assert set(asked) <= set(wanted), (asked, wanted)
    if hasattr(options, "calibration_samples"):
        assert options.calibration_samples in asked


@pytest.mark.parametrize("name, samples", [("posttrain", 1024), ("uniform.importance", 512)])
def test_posttrain_and_uniform_keep_their_defaults(name, samples):
    assert all_methods()[name].options().calibration_samples == samples
