"""The one training loop every method that trains shares, and distillation recovery built on it.

train() runs AdamW with linear warm-up and decay, gradient clipping and accumulation, a fresh seeded
shuffle each epoch, and optional evaluation with keep-best and early stopping. What a method adds
rides on Hooks and extra optimizers (llm-compressor's lesson: schedules ride on one loop):

    before_step       sample gates before each forward pass                  (l0)
    extra_loss        a term added to the objective, e.g. a Lagrangian       (l0)
    extra_optimizers  stepped with the weights': gates, multipliers (ascent) (l0)
    after_step        pruning schedules, re-zeroing pruned weights, logging  (weights.magnitude, distill, l0)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from shrink.console import progress as progress_bar
from shrink.errors import BadInputError
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
    """

    before_step: Callable[[int], None] | None = None
    extra_loss: Callable[[int], torch.Tensor] | None = None
    after_step: list[Callable[[int, int, float], None]] = field(default_factory=list)
    status: Callable[[float], str] | None = None


def schedule(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to zero."""
    warmup_steps = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
) -> dict:
    """Minimise `objective` over `batches` by AdamW on `params` (default: the model's trainable
    parameters, gradient-clipped to grad_clip); extra optimizers step (and are zeroed) with it, on
    their own parameters and unclipped. With `evaluate` (a held-out loss) and early_stop_patience,
    stops after that many evaluations every eval_every steps without improvement, and ends with the
    best evaluated weights; without patience `evaluate` only reports the loss before and after.
    device=None leaves the model and batches where they are. Returns steps, losses (per step),
    evals, eval_loss_before/after, stopped_early (and kept_best when the best weights came back)."""
    hooks = hooks or Hooks()
    torch.manual_seed(seed)
    if device is not None:
        model.to(device)
    micro_batches = max(1, math.ceil(epochs * len(batches)))
    total = total_steps(len(batches), epochs, grad_accum, max_steps)
    eval_every = eval_every or max(1, total // 10)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=foreach)
    scheduler = schedule(optimizer, total, warmup)
    optimizers = [optimizer, *extra_optimizers]

    history = {"steps": 0, "losses": [], "evals": []}
    history["eval_loss_before"] = best = evaluate() if evaluate else None
    keep_best = bool(evaluate and early_stop_patience)
    best_state = _snapshot(model) if keep_best else None
    bad_evals, stopped_early = 0, False

    order = batch_order(len(batches), micro_batches, seed)
    model.train(dropout)
    with progress_bar() as bar:
        task = bar.add_task(label, total=total, status="", visible=progress)
        running, micro = 0.0, 0
        for index in order:
            step = history["steps"]
            if hooks.before_step is not None:
                hooks.before_step(step)
            batch = batches[index] if device is None else to_device(batches[index], device)
            with torch.no_grad():
                targets = objective.targets(batch)
            loss = objective(model, batch, targets)
            full = loss if hooks.extra_loss is None else loss + hooks.extra_loss(step)
            (full / grad_accum).backward()
            running += loss.item() / grad_accum
            micro += 1
            if micro % grad_accum and micro != len(order):
                continue
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            for opt in optimizers:
                opt.step()
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
                current = evaluate()
                history["evals"].append({"step": history["steps"], "loss": round(current, 6)})
                if current < best - 1e-12:
                    best, bad_evals = current, 0
                    best_state = _snapshot(model)
                else:
                    bad_evals += 1
                    if bad_evals >= early_stop_patience:
                        stopped_early = True
                        break
            if history["steps"] >= total:
                break

    history["stopped_early"] = stopped_early
    # an early stop already knows its last weights are worse; otherwise the final weights are evaluated once
    final = evaluate() if evaluate and not stopped_early else None
    if keep_best and (stopped_early or final > best):
        # the weights of the best evaluation, which may be the starting ones: a run that went to the
        # end but ended worse than it was at some evaluation must not hand back the worse model
        model.load_state_dict(best_state)
        history["kept_best"], final = True, best
    model.eval()
    history["eval_loss_after"] = final
    return history


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
) -> dict:
    """Train the student to match the teacher (and/or the labels) with train(). With eval_batches and
    early_stop_patience, stops after that many evaluations without improvement, and always ends with
    the best evaluated weights. `on_step(step, total_steps)`, if given, runs after every optimizer
    step (e.g. to apply a pruning schedule); `before_step(step)` before every forward pass (e.g. to
    sample layer gates). dropout=False trains in eval mode: for near-lossless
    recovery (the student already within a percent of the teacher), the noise dropout adds is larger
    than the gap being closed. Returns the history."""
    if not train_batches:
        raise BadInputError("distill: no training batches", hint="the calibration split is empty")
    device = resolve_device(device)
    started = time.perf_counter()
    has_labels = all("labels" in b for b in train_batches)
    objective = make_objective(student, teacher, has_labels, loss, temperature)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    evaluate = None
    if eval_batches:
        eval_targets = [objective.targets(to_device(b, device)) for b in eval_batches]
        evaluate = lambda: objective_loss(student, objective, eval_batches, eval_targets, device)
    hooks = Hooks(before_step=before_step, after_step=[lambda done, total, _: on_step(done, total)] if on_step is not None else [])
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
