"""The one training loop every method that trains shares, and distillation recovery built on it.

train() runs AdamW with linear warm-up and decay, gradient clipping and accumulation, a fresh seeded
shuffle each epoch, and optional evaluation with keep-best and early stopping. What a method adds
rides on Hooks and extra optimizers (llm-compressor's lesson: schedules ride on one loop):

    before_step       sample gates before each forward pass                  (l0)
    extra_loss        a term added to the objective, e.g. a Lagrangian       (l0)
    extra_optimizers  stepped with the weights': gates, multipliers (ascent) (l0)
    after_step        pruning schedules, re-zeroing pruned weights, logging  (weights.magnitude, distill, l0)

A time budget (issue 16: `shrink prune --budget`) caps a run's wall time: given budget_s, or inside a
time_budget() scope (how the pipeline hands each training step its share, so a method needs no
argument for it), train() times its first steps, and when the planned steps would not fit it trains
only the steps that fit and rescales its schedule to them: the warm-up and the linear decay to zero
end at the new last step, and the after_step hooks get the new total, so schedules driven by them
(weights.magnitude's sparsity) end too. history["budget"] says what was traded.
"""

from __future__ import annotations

import contextvars
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from shrink.console import note
from shrink.console import progress as progress_bar
from shrink.errors import BadInputError
from shrink.train import distributed
from shrink.train.device import resolve_device, to_device
from shrink.train.objectives import Objective, make_objective, objective_loss


@dataclass
class Hooks:
    """What a method adds to train(). `step` is the 0-based index of the optimizer step under way;
    `done` counts finished steps from 1 (so done == total on the last one).

    before_step(step)              before every forward pass (each micro-batch), e.g. sample gates
    extra_loss(step) -> tensor     added to every micro-batch's objective loss before backward
    after_step(done, total, loss)  after every optimizer step; loss is the step's objective loss
    status(loss) -> str            the progress bar's text (default: the loss)
    stop(done) -> bool             after every optimizer step: True ends the training there (a
                                   method's own convergence test; history["stopped_by_hook"])
    """

    before_step: Callable[[int], None] | None = None
    extra_loss: Callable[[int], torch.Tensor] | None = None
    after_step: list[Callable[[int, int, float], None]] = field(default_factory=list)
    status: Callable[[float], str] | None = None
    stop: Callable[[int], bool] | None = None


class WarmupDecay:
    """The learning-rate factor of step `step`: linear warm-up over the first `warmup` fraction of
    `total` steps, then linear decay to zero at step `total`. `total` may be lowered mid-run (a time
    budget): the warm-up and the decay are then those of the shorter run from the next step on."""

    def __init__(self, total: int, warmup: float):
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        warmup_steps = int(self.warmup * self.total)
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (self.total - step) / max(1, self.total - warmup_steps))


def schedule(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to zero
    (scheduler.lr_lambdas[0] is the WarmupDecay; set its total to rescale)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(total_steps, warmup))


def batch_order(num_batches: int, micro_batches: int, seed: int) -> list[int]:
    """Batch indices for the whole run: each epoch a fresh seeded shuffle (batches are length-sorted,
    so an unshuffled pass would train on short sentences first and long ones last)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < micro_batches:
        epoch = list(range(num_batches))
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:micro_batches]


def total_steps(num_batches: int, epochs: float, grad_accum: int = 1, max_steps: int | None = None) -> int:
    """Optimizer steps of a run of `epochs` passes over `num_batches` (capped by max_steps)."""
    steps = max(1, math.ceil(max(1, math.ceil(epochs * num_batches)) / grad_accum))
    return min(steps, max_steps) if max_steps is not None else steps


# --- time budgets ---------------------------------------------------------------------------------

PROBE_STEPS = 3  # optimizer steps timed before the first decision (the first one pays warm-up costs)
_UNITS = {"s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60,
          "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600}


def parse_duration(text: str | float, what: str = "--budget") -> float:
    """Seconds from "90s", "10m", "10 min", "1.5h" or a plain number (minutes). Anything else, zero or
    a negative or non-finite number: BadInputError (one line, exit 2)."""
    hint = "e.g. 90s, 10m, 1.5h (a plain number is minutes)"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
        unit = found and (found.group(2).lower() or "m")
        if not found or unit not in _UNITS:
            raise BadInputError(f"{what} {str(text)[:40]!r}: not a duration", hint=hint)
        seconds = float(found.group(1)) * _UNITS[unit]
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadInputError(f"{what} {str(text)[:40]!r}: must be a positive duration", hint=hint)
    return seconds


def format_duration(seconds: float) -> str:
    """90 -> "90 s", 600 -> "10 min", 5400 -> "1.5 h"."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


@dataclass
class BudgetScope:
    """A time budget for the train() calls inside a time_budget() block: `seconds` for all of them
    together (`spent` counts what earlier calls used), never cut below `min_fraction` of a run's
    planned steps. `runs` collects each call's history["budget"]."""

    seconds: float
    min_fraction: float = 0.0
    clock: Callable[[], float] = time.perf_counter
    spent: float = 0.0
    runs: list = field(default_factory=list)


_SCOPE: contextvars.ContextVar[BudgetScope | None] = contextvars.ContextVar("shrink_time_budget", default=None)


@contextmanager
def time_budget(seconds: float | None, min_fraction: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> Iterator[BudgetScope | None]:
    """Every train() call inside shares `seconds` of training (None: no budget, a no-op). Yields the
    BudgetScope, whose `runs` afterwards hold what each call traded."""
    if seconds is None:
        yield None
        return
    scope = BudgetScope(float(seconds), min_fraction, clock)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


class _Budget:
    """One train() call's budget: after each optimizer step, how many steps fit in all. The time per
    step is the mean of the steps after the first (which pays one-off costs: the optimizer's state,
    the allocator), evaluations left out; the evaluations still to come (keep-best every eval_every
    steps, the final one) are added at their own measured cost."""

    def __init__(self, seconds: float, planned: int, min_fraction: float, clock, eval_every: int | None, final_eval: bool):
        self.seconds, self.planned, self.clock = seconds, planned, clock
        # past min_fraction of the planned steps by one, so a schedule over that fraction of the steps
        # (l0 anneals its target over target_warmup of them) takes its last value
        self.floor = min(planned, int(min_fraction * planned) + 1) if min_fraction > 0 else 1
        self.eval_every, self.final_eval = eval_every, final_eval
        self.started = clock()
        self.first_done: float | None = None
        self.eval_cost = 0.0  # one evaluation (the first's until in-loop ones are timed)
        self.eval_time, self.evals = 0.0, 0  # in-loop evaluations so far
        self.shortened = False

    def evaluated(self, seconds: float, in_loop: bool = True) -> None:
        if in_loop:
            self.eval_time, self.evals = self.eval_time + seconds, self.evals + 1
            self.eval_cost = self.eval_time / self.evals
        else:
            self.eval_cost = seconds

    def fits(self, done: int, total: int) -> int:
        """The steps this run should have in all, `done` of them finished (never more than total)."""
        now = self.clock()
        if done == 1:
            self.first_done = now
        if done < min(PROBE_STEPS, total) or done >= total or self.first_done is None:
            return total
        per_step = max(0.0, now - self.first_done - self.eval_time) / (done - 1)
        if self.eval_every:
            per_step += self.eval_cost / self.eval_every
        left = self.seconds - (now - self.started) - (self.eval_cost if self.final_eval else 0.0)
        fit = done + (math.floor(left / per_step) if per_step > 0 else total)
        return max(done, min(total, max(fit, self.floor)))


def _trade(epochs_done: float, planned_epochs: float, examples: int, budget_s: float, steps: int, planned: int) -> str:
    what = f"{epochs_done:.2g} of {planned_epochs:.3g} epochs over {examples:,} examples ({steps:,} of {planned:,} steps"
    return f"{what}, budget {format_duration(budget_s)})"


# --- mixed precision, gradient checkpointing -------------------------------------------------------

PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class Scaling:
    """How train() runs the model (`shrink prune --mixed-precision / --gradient-checkpointing`):
    mixed_precision "bf16" (CPU, or a GPU that has it) or "fp16" (GPU, with a gradient scaler) runs
    the forward passes under torch.autocast, the weights and the optimizer staying fp32;
    gradient_checkpointing recomputes each layer's activations in backward instead of keeping them
    (Hugging Face's gradient_checkpointing_enable; it acts in training mode only, so not with
    dropout=False)."""

    mixed_precision: str = "no"
    gradient_checkpointing: bool = False


_SCALING: contextvars.ContextVar[Scaling] = contextvars.ContextVar("shrink_scaling", default=Scaling())


@contextmanager
def scaling(mixed_precision: str = "no", gradient_checkpointing: bool = False) -> Iterator[Scaling]:
    """Every train() call inside runs with these settings (how the pipeline hands them to methods)."""
    check_precision(mixed_precision)
    token = _SCALING.set(Scaling(mixed_precision, gradient_checkpointing))
    try:
        yield _SCALING.get()
    finally:
        _SCALING.reset(token)


def check_precision(mixed_precision: str, device: str | None = None) -> None:
    """A clear error for a precision the device cannot run (device None: only the name is checked)."""
    if mixed_precision not in PRECISIONS:
        raise BadInputError(f"--mixed-precision {mixed_precision!r}: use one of {', '.join(PRECISIONS)}")
    if device is None or mixed_precision == "no":
        return
    if mixed_precision == "fp16" and not device.startswith("cuda"):
        raise BadInputError("--mixed-precision fp16 needs a GPU (its gradient scaler is CUDA's)", hint="use bf16 on the CPU")
    if mixed_precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise BadInputError("--mixed-precision bf16: this GPU has no bfloat16", hint="use fp16")


def _autocast(mixed_precision: str, device: str):
    if mixed_precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


@contextmanager
def _fp32_outputs(models, mixed_precision: str):
    """Under autocast, the models' outputs cast to fp32 (what Accelerate's convert_to_fp32 does), so
    the losses (a KL of near-equal distributions, an MSE) are not summed in bf16 / fp16."""
    if mixed_precision == "no":
        yield
        return
    handles = [m.register_forward_hook(lambda module, args, output: _to_fp32(output)) for m in models if isinstance(m, torch.nn.Module)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _to_fp32(value):
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, dict):  # a transformers ModelOutput is an OrderedDict: set in place
        for key in list(value.keys()):
            value[key] = _to_fp32(value[key])
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    return value


@contextmanager
def _checkpointing(model, on: bool):
    """Gradient checkpointing on for the run (if asked and the model has it), as it was afterwards."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    was = bool(getattr(model, flag, False))  # (transformers 5 renamed it and warns on the old name)
    if not on or was:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise BadInputError(f"--gradient-checkpointing: {type(model).__name__} does not support it", hint="drop --gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        model.gradient_checkpointing_disable()


def _examples(batches: list[dict]) -> int:
    count = 0
    for batch in batches:
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        count += int(first.shape[0]) if first is not None else 1
    return count


def train(
    model,
    batches: list[dict],
    objective: Objective,
    *,
    epochs: float = 1,
    max_steps: int | None = None,
    lr: float = 5e-5,
    warmup: float = 0.1,
    grad_clip: float = 1.0,
    grad_accum: int = 1,
    seed: int = 0,
    params: Sequence[torch.nn.Parameter] | None = None,
    foreach: bool | None = None,
    extra_optimizers: Sequence[torch.optim.Optimizer] = (),
    hooks: Hooks | None = None,
    evaluate: Callable[[], float] | None = None,
    eval_every: int | None = None,
    early_stop_patience: int | None = None,
    dropout: bool = True,
    device: str | None = None,
    progress: bool = True,
    label: str = "train",
    budget_s: float | None = None,
    min_fraction: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
    mixed_precision: str | None = None,
    gradient_checkpointing: bool | None = None,
) -> dict:
    """Minimise `objective` over `batches` by AdamW on `params` (default: the model's trainable
    parameters, gradient-clipped to grad_clip); extra optimizers step (and are zeroed) with it, on
    their own parameters and unclipped. With `evaluate` (a held-out loss) and early_stop_patience,
    stops after that many evaluations every eval_every steps without improvement, and ends with the
    best evaluated weights; without patience `evaluate` only reports the loss before and after.
    device=None leaves the model and batches where they are. Returns steps, losses (per step),
    evals, eval_loss_before/after, stopped_early (and kept_best when the best weights came back).

    budget_s (else the enclosing time_budget()'s share left): a wall-time cap. When the planned steps
    would not fit it trains fewer, never fewer than one past min_fraction of them (the scope's
    min_fraction when inside one), with the schedule rescaled to end at the new last step; it prints
    one note and records history["budget"]: budget_s, planned_steps, steps, epochs_done, shortened,
    over_budget, seconds and trade (a sentence). `clock` is the time source (tests inject one).

    mixed_precision, gradient_checkpointing: see Scaling (None: the enclosing scaling()'s). Launched
    as several processes (shrink.train.distributed), the run is data parallel with the global batch,
    order and steps of one process; history["processes"] is then the number of processes."""
    hooks = hooks or Hooks()
    settings = _SCALING.get()
    mixed_precision = settings.mixed_precision if mixed_precision is None else mixed_precision
    gradient_checkpointing = settings.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    scope = _SCOPE.get() if budget_s is None else None
    if scope is not None:
        budget_s, min_fraction, clock = max(0.0, scope.seconds - scope.spent), max(min_fraction, scope.min_fraction), scope.clock
    if device is not None:
        model.to(device)
    where = str(device or next(model.parameters()).device)
    check_precision(mixed_precision, where)
    dist = distributed.current(where)
    if dist is None:
        torch.manual_seed(seed)
        shared = None
    else:  # dropout differs per process; what before_step samples (the model's structure) does not
        torch.manual_seed(seed + dist.rank)
        shared = distributed.SharedRandom(seed)
        progress = progress and dist.is_main
    micro_batches = max(1, math.ceil(epochs * len(batches)))
    total = total_steps(len(batches), epochs, grad_accum, max_steps)
    every_tenth = eval_every is None  # the default: rescaled with the run when a budget shortens it
    eval_every = eval_every or max(1, total // 10)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=foreach)
    scheduler = schedule(optimizer, total, warmup)
    optimizers = [optimizer, *extra_optimizers]
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
    if dist is not None:
        wrapped = dist.wrap(distributed.LossModule(model, objective))
        # what DDP does not see: the gates', multipliers' and scores' gradients, averaged at each step
        outside = distributed.outside([*params, *(p for opt in extra_optimizers for g in opt.param_groups for p in g["params"])], model)
        whole_batch_teacher = distributed.compares_rows(objective)
        run_evaluate = evaluate and (lambda: distributed.on_main(evaluate))
    else:
        run_evaluate = evaluate
    planned = total
    keep_best = bool(evaluate and early_stop_patience)
    budget = None if budget_s is None else _Budget(budget_s, planned, min_fraction, clock, eval_every if keep_best else None, evaluate is not None)

    history = {"steps": 0, "losses": [], "evals": []}
    eval_started = clock()
    history["eval_loss_before"] = best = run_evaluate() if evaluate else None
    if budget is not None and evaluate:
        budget.evaluated(clock() - eval_started, in_loop=False)
    best_state = _snapshot(model) if keep_best else None
    bad_evals, stopped_early = 0, False

    order = batch_order(len(batches), micro_batches, seed)
    model.train(dropout)
    with progress_bar() as bar, _checkpointing(model, gradient_checkpointing), _fp32_outputs([model, objective.teacher], mixed_precision):
        task = bar.add_task(label, total=total, status="", visible=progress)
        running, micro = 0.0, 0
        for index in order:
            step = history["steps"]
            if hooks.before_step is not None:
                with shared.active() if shared is not None else nullcontext():
                    hooks.before_step(step)
            batch = batches[index] if device is None else to_device(batches[index], device)
            syncs = (micro + 1) % grad_accum == 0 or micro + 1 == len(order)  # the step's last micro-batch
            if dist is None:
                with _autocast(mixed_precision, where):
                    with torch.no_grad():
                        targets = objective.targets(batch)
                    loss = objective(model, batch, targets)
                full = loss if hooks.extra_loss is None else loss + hooks.extra_loss(step)
                (full / grad_accum if scaler is None else scaler.scale(full / grad_accum)).backward()
                running += loss.item() / grad_accum
            else:
                rows = dist.rows(batch)
                local, weight = dist.shard(batch, rows), dist.weight(rows)
                with dist.no_sync(wrapped, skip=not syncs):
                    with _autocast(mixed_precision, where):
                        with torch.no_grad():
                            targets = dist.shard(objective.targets(batch), rows) if whole_batch_teacher else objective.targets(local)
                        loss = wrapped(local, targets)
                    # weighted by the rows' share, so DDP's average is the global batch's gradient
                    full = loss * weight if hooks.extra_loss is None else loss * weight + hooks.extra_loss(step)
                    (full / grad_accum if scaler is None else scaler.scale(full / grad_accum)).backward()
                running += loss.item() * weight / dist.world / grad_accum  # summed over processes below
            micro += 1
            if not syncs:
                continue
            if dist is not None:
                dist.average_gradients(outside)
                running = dist.sum(running)
            if scaler is not None:
                for opt in optimizers:
                    scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            for opt in optimizers:
                opt.step() if scaler is None else scaler.step(opt)
            if scaler is not None:
                scaler.update()
            if budget is not None and (fit := _agreed(dist, budget.fits(history["steps"] + 1, total))) < total:
                # later steps would overrun: end at `fit`; so do the warm-up and the decay (before
                # scheduler.step, so the next step's rate is already the rescaled one)
                total = scheduler.lr_lambdas[0].total = fit
                if every_tenth and keep_best:
                    eval_every = budget.eval_every = max(1, total // 10)
                bar.update(task, total=total)
                if not budget.shortened:
                    budget.shortened = True
                    epochs_now = min(epochs, total * grad_accum / len(batches))
                    note(f"{label}: {planned:,} steps do not fit in the budget of {format_duration(budget.seconds)}: training "
                         f"{total:,} ({epochs_now:.2g} of {min(epochs, planned * grad_accum / len(batches)):.3g} epochs), "
                         "warm-up and decay rescaled to end there")
            scheduler.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            history["losses"].append(round(running, 6))
            history["steps"] += 1
            step_loss, running = running, 0.0
            # before any keep-best snapshot, so restored weights carry what the hooks enforce (e.g. zeros)
            for after in hooks.after_step:
                after(history["steps"], total, step_loss)
            status = hooks.status(step_loss) if hooks.status else f"loss {history['losses'][-1]:.4f}"
            bar.update(task, advance=1, status=status)
            if keep_best and history["steps"] % eval_every == 0:
                eval_started = clock()
                current = run_evaluate()
                if budget is not None:
                    budget.evaluated(clock() - eval_started)
                history["evals"].append({"step": history["steps"], "loss": round(current, 6)})
                if current < best - 1e-12:
                    best, bad_evals = current, 0
                    best_state = _snapshot(model)
                else:
                    bad_evals += 1
                    if bad_evals >= early_stop_patience:
                        stopped_early = True
                        break
            if hooks.stop is not None and hooks.stop(history["steps"]):
                history["stopped_by_hook"] = history["steps"]
                break
            if history["steps"] >= total:
                break

    history["stopped_early"] = stopped_early
    if dist is not None:
        history["processes"] = dist.world
        wrapped = None
        dist.release()
    # an early stop already knows its last weights are worse; otherwise the final weights are evaluated once
    final = run_evaluate() if evaluate and not stopped_early else None
    if keep_best and (stopped_early or final > best):
        # the weights of the best evaluation, which may be the starting ones: a run that went to the
        # end but ended worse than it was at some evaluation must not hand back the worse model
        model.load_state_dict(best_state)
        history["kept_best"], final = True, best
    model.eval()
    history["eval_loss_after"] = final
    if budget is not None:
        history["budget"] = _budget_record(budget, history["steps"], planned, batches, epochs, grad_accum, clock)
        if scope is not None:
            scope.spent += history["budget"]["seconds"]
            scope.runs.append({"label": label, **history["budget"]})
    return history


def _agreed(dist, value):
    """The main process's value on every process (a decision from its clock: all must take it)."""
    return value if dist is None else dist.broadcast(value)


def _budget_record(budget: _Budget, steps: int, planned: int, batches, epochs: float, grad_accum: int, clock) -> dict:
    seconds = clock() - budget.started
    epochs_done = steps * grad_accum / len(batches)
    planned_epochs = min(epochs, planned * grad_accum / len(batches))
    return {
        "budget_s": round(budget.seconds, 3),
        "planned_steps": planned,
        "steps": steps,
        "epochs_done": round(min(epochs_done, planned_epochs), 3),
        "planned_epochs": round(planned_epochs, 3),
        "shortened": budget.shortened,
        "over_budget": seconds > budget.seconds,
        "min_steps": budget.floor,
        "seconds": round(seconds, 2),
        "trade": _trade(min(epochs_done, planned_epochs), planned_epochs, _examples(batches), budget.seconds, steps, planned),
    }


def distill(
    student,
    teacher,
    train_batches: list[dict],
    *,
    eval_batches: list[dict] | None = None,
    epochs: float = 1,
    max_steps: int | None = None,
    lr: float = 5e-5,
    warmup: float = 0.1,
    grad_clip: float = 1.0,
    grad_accum: int = 1,
    early_stop_patience: int | None = None,
    eval_every: int | None = None,
    loss=("auto",),
    temperature: float = 2.0,
    device: str = "cpu",
    progress: bool = True,
    seed: int = 0,
    on_step=None,
    before_step=None,
    dropout: bool = True,
    extra_loss=None,
) -> dict:
    """Train the student to match the teacher (and/or the labels) with train(). With eval_batches and
    early_stop_patience, stops after that many evaluations without improvement, and always ends with
    the best evaluated weights. `on_step(step, total_steps)`, if given, runs after every optimizer
    step (e.g. to apply a pruning schedule); `before_step(step)` before every forward pass (e.g. to
    sample layer gates); `extra_loss(step)` is added to the objective (penalties). dropout=False trains in eval mode: for near-lossless
    recovery (the student already within a percent of the teacher), the noise dropout adds is larger
    than the gap being closed. Returns the history."""
    if not train_batches:
        raise BadInputError("distill: no training batches", hint="the calibration split is empty")
    device = resolve_device(device)
    started = time.perf_counter()
    has_labels = all("labels" in b for b in train_batches)
    objective = make_objective(student, teacher, has_labels, loss, temperature, training=True)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    evaluate = None
    if eval_batches:
        eval_targets = [objective.targets(to_device(b, device)) for b in eval_batches]
        evaluate = lambda: objective_loss(student, objective, eval_batches, eval_targets, device)
    hooks = Hooks(before_step=before_step, extra_loss=extra_loss,
                  after_step=[lambda done, total, _: on_step(done, total)] if on_step is not None else [])
    trained = train(
        student, train_batches, objective, epochs=epochs, max_steps=max_steps, lr=lr, warmup=warmup,
        grad_clip=grad_clip, grad_accum=grad_accum, seed=seed, hooks=hooks, evaluate=evaluate, eval_every=eval_every,
        early_stop_patience=early_stop_patience, dropout=dropout, device=device, progress=progress, label="distill",
    )
    history = {"objective": objective.name, "device": device, **trained}
    history["seconds"] = round(time.perf_counter() - started, 2)
    return history


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
