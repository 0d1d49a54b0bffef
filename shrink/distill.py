"""Objectives (what pruning methods minimise) and distillation recovery.

An Objective compares a student with the frozen original (the teacher) on one batch:

    targets(batch)                      teacher outputs, computed once (no grad)
    per_sample(student, batch, targets) loss of each sample, shape [batch]
    __call__(student, batch, targets)   the mean

Every loss is per sample (never mixed across rows), so a batch repeated k times with per-sample
gates gives k independent scores in one pass (shrink.methods.scoring relies on this).

    task              cross-entropy with the labels (sequence classification; MSE for regression)
    logits_kl         KL(teacher || student) of temperature-softened logits, times T^2
    hidden_mse        hidden-state MSE, student layer i against the teacher layer it came from
                      (shrink.surgery.original_layer_ids), so dropped layers are handled
    embedding_cosine  1 - cos of mean-pooled last hidden states (sentence embedding models)

`choose_objective` picks the right one for the model and data; `distill` trains the student.
"""

from __future__ import annotations

import inspect
import math
import random
import time

import torch
import torch.nn.functional as F

from .errors import BadInputError

KINDS = ("task", "logits_kl", "hidden_mse", "embedding_cosine")
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
HEADS = {
    "ForSequenceClassification": "sequence",
    "ForTokenClassification": "token",
    "ForQuestionAnswering": "qa",
    "ForMaskedLM": "mlm",
}


# --- model helpers ----------------------------------------------------------------------------


def task_head(model) -> str | None:
    """"sequence", "token", "qa", "mlm", or None for a base (embedding) model."""
    name = type(model).__name__
    return next((head for suffix, head in HEADS.items() if name.endswith(suffix)), None)


def model_inputs(model, batch: dict) -> dict:
    """The tensors of a batch that this model's forward accepts (DistilBERT and MPNet take no
    token_type_ids; labels are kept out so HF never computes its own loss)."""
    accepted = _forward_parameters(type(model))
    return {k: batch[k] for k in MODEL_KEYS if k in batch and k in accepted}


_PARAMETERS: dict[type, frozenset] = {}


def _forward_parameters(cls) -> frozenset:
    if cls not in _PARAMETERS:
        _PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _PARAMETERS[cls]


def logits_of(output) -> torch.Tensor:
    if getattr(output, "start_logits", None) is not None:  # QA: [batch, 2, seq], softmax over tokens
        return torch.stack([output.start_logits, output.end_logits], dim=1)
    return output.logits


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: the sentence-transformers pooling of all-MiniLM and friends."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def last_hidden(model, batch: dict) -> torch.Tensor:
    if task_head(model) is None:
        return model(**model_inputs(model, batch)).last_hidden_state
    return model(**model_inputs(model, batch), output_hidden_states=True).hidden_states[-1]


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> [batch]: mean over real tokens."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


# --- objectives -------------------------------------------------------------------------------


class Objective:
    name = "objective"

    def __init__(self, teacher=None):
        self.teacher = teacher

    def targets(self, batch: dict) -> dict:
        return {}

    def per_sample(self, student, batch: dict, targets: dict) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, student, batch: dict, targets: dict) -> torch.Tensor:
        return self.per_sample(student, batch, targets).mean()

    def __repr__(self) -> str:
        return f"<Objective {self.name}>"


class TaskLoss(Objective):
    name = "task"

    def per_sample(self, student, batch, targets):
        logits = student(**model_inputs(student, batch)).logits
        labels = batch["labels"]
        if logits.shape[-1] == 1:  # regression head
            return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
        return F.cross_entropy(logits, labels.long(), reduction="none")


class LogitsKL(Objective):
    name = "logits_kl"

    def __init__(self, teacher, temperature: float = 2.0):
        super().__init__(teacher)
        self.temperature = temperature

    @torch.no_grad()
    def targets(self, batch):
        return {"logits": logits_of(self.teacher(**model_inputs(self.teacher, batch)))}

    def per_sample(self, student, batch, targets):
        t = self.temperature
        student_logp = F.log_softmax(logits_of(student(**model_inputs(student, batch))) / t, dim=-1)
        teacher_logp = F.log_softmax(targets["logits"] / t, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1) * t * t
        if kl.dim() == 1:  # sequence classification: one distribution per sample
            return kl
        if task_head(student) == "qa":  # start and end distributions over tokens
            return kl.mean(dim=-1)
        return _token_mean(kl, batch["attention_mask"])  # a distribution per token


class HiddenMSE(Objective):
    """MSE of every remaining student layer output (and the embeddings) against the teacher layer
    it descends from; layers the student dropped have no partner and are skipped."""

    name = "hidden_mse"

    @torch.no_grad()
    def targets(self, batch):
        return {"hidden": self.teacher(**model_inputs(self.teacher, batch), output_hidden_states=True).hidden_states}

    def per_sample(self, student, batch, targets):
        from .surgery import original_layer_ids

        hidden = student(**model_inputs(student, batch), output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output; [i + 1] is the output of layer i.
        pairs = [(0, 0)] + [(i + 1, orig + 1) for i, orig in enumerate(original_layer_ids(student))]
        mask = batch["attention_mask"]
        losses = [_token_mean(((hidden[s] - targets["hidden"][t]) ** 2).mean(dim=-1), mask) for s, t in pairs]
        return torch.stack(losses).mean(dim=0)


class EmbeddingCosine(Objective):
    name = "embedding_cosine"

    @torch.no_grad()
    def targets(self, batch):
        return {"embedding": mean_pool(last_hidden(self.teacher, batch), batch["attention_mask"])}

    def per_sample(self, student, batch, targets):
        embedding = mean_pool(last_hidden(student, batch), batch["attention_mask"])
        return 1 - F.cosine_similarity(embedding, targets["embedding"], dim=-1)


class SumObjective(Objective):
    """Several objectives added (e.g. `loss: [logits_kl, hidden_mse]` in a recipe)."""

    def __init__(self, parts: list[Objective]):
        super().__init__(parts[0].teacher)
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def targets(self, batch):
        return {p.name: p.targets(batch) for p in self.parts}

    def per_sample(self, student, batch, targets):
        return sum(p.per_sample(student, batch, targets[p.name]) for p in self.parts)


def choose_objective(student, teacher, has_labels: bool, kind: str | None = None, temperature: float = 2.0) -> Objective:
    """The loss for this model and data: the task loss with labels and a classification head,
    logits KL with a task head and no labels, mean-pooled embedding cosine for base models."""
    head = task_head(student)
    if kind in (None, "auto"):
        if has_labels and head == "sequence":
            kind = "task"
        elif head is not None:
            kind = "logits_kl"
        else:
            kind = "embedding_cosine"
    if kind == "task":
        if not has_labels:
            raise BadInputError("the task loss needs labeled data", hint="pass --data FILE --label-column NAME, or use logits_kl")
        if head != "sequence":
            raise BadInputError(f"the task loss needs a sequence classification head; {type(student).__name__} has none", hint="use a distillation loss")
        return TaskLoss(teacher)
    if kind == "logits_kl":
        if head is None:
            raise BadInputError(f"logits_kl needs a task head; {type(student).__name__} is a base model", hint="use embedding_cosine or hidden_mse")
        return LogitsKL(teacher, temperature)
    if kind == "hidden_mse":
        return HiddenMSE(teacher)
    if kind == "embedding_cosine":
        return EmbeddingCosine(teacher)
    raise BadInputError(f"unknown loss {kind!r}", hint=f"choose from auto, {', '.join(KINDS)}")


def make_objective(student, teacher, has_labels: bool, kinds=("auto",), temperature: float = 2.0) -> Objective:
    """One objective, or the sum of several."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds) or ["auto"]
    parts = [choose_objective(student, teacher, has_labels, k, temperature) for k in kinds]
    return parts[0] if len(parts) == 1 else SumObjective(parts)


# --- recovery ---------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: CUDA is not available here", hint="use --device cpu (or auto)")
    return device


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


@torch.no_grad()
def objective_loss(student, objective: Objective, batches: list[dict], targets: list[dict] | None = None, device="cpu") -> float:
    """Mean per-sample objective over batches (student in eval mode)."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        t = targets[i] if targets is not None else objective.targets(batch)
        losses = objective.per_sample(student, batch, t)
        total += float(losses.sum())
        count += losses.numel()
    student.train(was_training)
    return total / max(count, 1)


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
    from .console import progress as progress_bar

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
