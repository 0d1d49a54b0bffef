"""Training the student against the frozen original (distillation recovery)."""

from __future__ import annotations

import math
import random
import time

import torch

from shrink.errors import BadInputError
from shrink.train.device import resolve_device, to_device
from shrink.train.objectives import make_objective, objective_loss


def _schedule(optimizer, total_steps: int, warmup: float):
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to zero."""
    warmup_steps = int(warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    dropout: bool = True,
) -> dict:
    """Train the student to match the teacher (and/or the labels). AdamW, warm-up + linear decay,
    gradient clipping and accumulation; with eval_batches and early_stop_patience, stops after that
    many evaluations without improvement, and always ends with the best evaluated weights. `on_step(step, total_steps)`, if
    given, runs after every optimizer step (e.g. to apply a pruning schedule). dropout=False trains in
    eval mode: for near-lossless recovery (the student already within a percent of the teacher), the
    noise dropout adds is larger than the gap being closed. Returns the history."""
    if not train_batches:
        raise BadInputError("distill: no training batches", hint="the calibration split is empty")
    device = resolve_device(device)
    started = time.perf_counter()
    torch.manual_seed(seed)
    has_labels = all("labels" in b for b in train_batches)
    objective = make_objective(student, teacher, has_labels, loss, temperature)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    micro_batches = max(1, math.ceil(epochs * len(train_batches)))
    total_steps = max(1, math.ceil(micro_batches / grad_accum))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    eval_every = eval_every or max(1, total_steps // 10)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = _schedule(optimizer, total_steps, warmup)

    eval_targets = [objective.targets(to_device(b, device)) for b in eval_batches] if eval_batches else None
    evaluate = (lambda: objective_loss(student, objective, eval_batches, eval_targets, device)) if eval_batches else None
    history = {"objective": objective.name, "device": device, "steps": 0, "losses": [], "evals": []}
    history["eval_loss_before"] = best = evaluate() if evaluate else None
    keep_best = bool(evaluate and early_stop_patience)
    best_state = _snapshot(student) if keep_best else None
    bad_evals, stopped_early = 0, False

    order = _batch_order(len(train_batches), micro_batches, seed)
    student.train(dropout)
    from shrink.console import progress as progress_bar

    with progress_bar() as bar:
        task = bar.add_task("distill", total=total_steps, status="", visible=progress)
        running, micro = 0.0, 0
        for index in order:
            batch = to_device(train_batches[index], device)
            with torch.no_grad():
                targets = objective.targets(batch)
            step_loss = objective(student, batch, targets)
            (step_loss / grad_accum).backward()
            running += step_loss.item() / grad_accum
            micro += 1
            if micro % grad_accum and micro != len(order):
                continue
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history["losses"].append(round(running, 6))
            history["steps"] += 1
            running = 0.0
            if on_step is not None:
                on_step(history["steps"], total_steps)
            bar.update(task, advance=1, status=f"loss {history['losses'][-1]:.4f}")
            if keep_best and history["steps"] % eval_every == 0:
                current = evaluate()
                history["evals"].append({"step": history["steps"], "loss": round(current, 6)})
                if current < best - 1e-12:
                    best, bad_evals = current, 0
                    best_state = _snapshot(student)
                else:
                    bad_evals += 1
                    if bad_evals >= early_stop_patience:
                        stopped_early = True
                        break
            if history["steps"] >= total_steps:
                break

    history["stopped_early"] = stopped_early
    # an early stop already knows its last weights are worse; otherwise the final weights are evaluated once
    final = evaluate() if evaluate and not stopped_early else None
    if keep_best and (stopped_early or final > best):
        # the weights of the best evaluation, which may be the starting ones: a recovery step that ran
        # to the end but ended worse than it was at some evaluation must not hand back the worse model
        student.load_state_dict(best_state)
        history["kept_best"], final = True, best
    student.eval()
    history["eval_loss_after"] = final
    history["seconds"] = round(time.perf_counter() - started, 2)
    return history


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch_order(num_batches: int, micro_batches: int, seed: int) -> list[int]:
    """Batch indices for the whole run: each epoch a fresh seeded shuffle (batches are length-sorted,
    so an unshuffled pass would train on short sentences first and long ones last)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < micro_batches:
        epoch = list(range(num_batches))
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:micro_batches]
