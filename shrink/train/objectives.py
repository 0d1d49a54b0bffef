"""Objectives (what pruning methods minimise) and distillation recovery.

An Objective compares a student with the frozen original (the teacher) on one batch:

    targets(batch)                      teacher outputs, computed once (no grad)
    per_sample(student, batch, targets) loss of each sample, shape [batch]
    __call__(student, batch, targets)   the mean

Both come from model outputs (target_of, loss_of), so a SumObjective (several losses, each with a
weight) runs the student and the teacher once each for all its parts.

Every loss is per sample (never mixed across rows), so a batch repeated k times with per-sample
gates gives k independent scores in one pass (shrink.methods.heads.scoring relies on this).

    task              cross-entropy with the labels (sequence classification; MSE for regression)
    logits_kl         KL(teacher || student) of temperature-softened logits, times T^2
    hidden_mse        hidden-state MSE, student layer i against the teacher layer it came from
                      (shrink.surgery.original_layer_ids), so dropped layers are handled
    embedding_cosine  1 - cos of the sentence embeddings (the model's own sentence-transformers pooling:
                      CLS, mean, ...; mean pooling for a plain model)
    embedding_relation  relational KD: KL between the teacher's and the student's softmaxed cosine
                      similarities of each sample to a bank of teacher embeddings (this batch and a
                      queue of recent ones), so the distances BETWEEN texts are kept, not only each
                      text's direction (neighbour recall)
    teacher           the original's own output: logits_kl with a task head, else embedding_cosine +
                      embedding_relation (what a recipe names to distil any model; `[auto, teacher]`
                      adds it to the labels). `auto` on an embedding model is the same sum.

`choose_objective` picks the right one for the model and data; shrink.train.loop trains the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shrink.arch import logits_of, model_inputs, task_head
from shrink.errors import BadInputError
from shrink.models.sentence import pooling_of
from shrink.surgery import original_hidden_ids, original_layer_ids
from shrink.train.device import to_device

# The default embedding objective: embedding_cosine + RELATION_WEIGHT * embedding_relation, the
# relation over a queue of TRAINING_QUEUE earlier teacher embeddings when it trains (distill, l0) and
# over the batch alone when it scores (a queue would make scores depend on what came before).
# benchmarks/embedding_fidelity.py measured weight 1 against 0.1: 1 cost 0.07 cosine for +0.01 recall@10.
RELATION_WEIGHT = 0.1
TRAINING_QUEUE = 4096
KINDS = ("task", "logits_kl", "hidden_mse", "embedding_cosine", "embedding_relation")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: the sentence-transformers pooling of all-MiniLM and friends."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embedding(model, output, batch: dict) -> torch.Tensor:
    """The model's sentence embedding of a batch: its own sentence-transformers pooling (CLS, mean,
    ..., Dense, Normalize; shrink.models.sentence), mean pooling for a plain model."""
    return pooling_of(model).embed(_last_hidden_of(model, output), batch["attention_mask"])


def forward(model, batch: dict, hidden: bool = False):
    """One forward pass; hidden=True also returns every layer's hidden states."""
    if hidden:
        return model(**model_inputs(model, batch), output_hidden_states=True)
    return model(**model_inputs(model, batch))


def _last_hidden_of(model, output) -> torch.Tensor:
    # a task head's output has no last_hidden_state, only the per-layer ones
    return output.last_hidden_state if task_head(model) is None else output.hidden_states[-1]


def _on_student_dims(student, teacher_values: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher's hidden-size values on the dims the student kept (shrink.surgery.KeepHidden) when
    the student's values are `width` wide, so a student with a pruned hidden dimension is compared
    with the teacher dim for dim (as CoFi does)."""
    if teacher_values.shape[-1] == width:
        return teacher_values
    return teacher_values[..., torch.tensor(original_hidden_ids(student), device=teacher_values.device)]


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] -> [batch]: mean over real tokens."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class Objective:
    """A loss is computed from model outputs (target_of: teacher output -> targets; loss_of: student
    output -> per-sample loss), so a SumObjective runs each model once for all its parts."""

    name = "objective"
    uses_teacher = True

    def __init__(self, teacher=None):
        self.teacher = teacher

    def needs_hidden(self, model) -> bool:
        """Whether the loss reads the model's per-layer hidden states (output_hidden_states=True)."""
        return False

    def target_of(self, output, batch: dict) -> dict:
        return {}

    def loss_of(self, student, output, batch: dict, targets: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def targets(self, batch: dict) -> dict:
        if not self.uses_teacher:
            return {}
        batch = batch.get("teacher", batch)  # the teacher's own tokenization of the rows (vocabulary pruning)
        return self.target_of(forward(self.teacher, batch, self.needs_hidden(self.teacher)), batch)

    def per_sample(self, student, batch: dict, targets: dict) -> torch.Tensor:
        return self.loss_of(student, forward(student, batch, self.needs_hidden(student)), batch, targets)

    def __call__(self, student, batch: dict, targets: dict) -> torch.Tensor:
        return self.per_sample(student, batch, targets).mean()

    def __repr__(self) -> str:
        return f"<Objective {self.name}>"


class TaskLoss(Objective):
    name = "task"
    uses_teacher = False

    def loss_of(self, student, output, batch, targets):
        logits = output.logits
        labels = batch["labels"]
        if logits.shape[-1] == 1:  # regression head
            return (logits.squeeze(-1) - labels.to(logits.dtype)) ** 2
        return F.cross_entropy(logits, labels.long(), reduction="none")


class LogitsKL(Objective):
    name = "logits_kl"

    def __init__(self, teacher, temperature: float = 2.0):
        super().__init__(teacher)
        self.temperature = temperature

    def target_of(self, output, batch):
        return {"logits": logits_of(output)}

    def loss_of(self, student, output, batch, targets):
        t = self.temperature
        student_logp = F.log_softmax(logits_of(output) / t, dim=-1)
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

    def needs_hidden(self, model):
        return True

    def target_of(self, output, batch):
        return {"hidden": output.hidden_states}

    def loss_of(self, student, output, batch, targets):
        if "teacher" in batch:
            raise BadInputError("hidden_mse compares token by token, and the student's vocabulary was pruned (its tokens differ)",
                                hint="use the teacher or embedding_cosine loss, or put embedding.vocab after this step")
        hidden = output.hidden_states
        # hidden_states[0] is the embedding output; [i + 1] is the output of layer i.
        pairs = [(0, 0)] + [(i + 1, orig + 1) for i, orig in enumerate(original_layer_ids(student))]
        mask = batch["attention_mask"]
        teacher = [_on_student_dims(student, targets["hidden"][t], hidden[s].shape[-1]) for s, t in pairs]
        losses = [_token_mean(((hidden[s] - t) ** 2).mean(dim=-1), mask) for (s, _), t in zip(pairs, teacher)]
        return torch.stack(losses).mean(dim=0)


class EmbeddingCosine(Objective):
    name = "embedding_cosine"

    def needs_hidden(self, model):
        return task_head(model) is not None

    def target_of(self, output, batch):
        return {"embedding": sentence_embedding(self.teacher, output, batch)}

    def loss_of(self, student, output, batch, targets):
        embedding = sentence_embedding(student, output, batch)
        return 1 - F.cosine_similarity(embedding, _on_student_dims(student, targets["embedding"], embedding.shape[-1]), dim=-1)


class TeacherBank:
    """Teacher embeddings a relational loss compares each sample with. Not a tensor on purpose:
    scoring tiles every tensor of the targets k times (shrink.methods.heads.scoring), and the bank
    is shared by all rows, not one per row."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings


class EmbeddingRelation(Objective):
    """KL(softmax(cos(t_i, B) / T) || softmax(cos(s_i, B) / T)) for each sample i, with B the bank of
    teacher embeddings other than t_i itself: this batch's and a FIFO queue of the last `queue_size`
    (MoCo / CompRess-style memory, so each sample sees many neighbours with small batches). Comparing the student with the
    TEACHER's bank, not with its own batch, keeps the loss per sample (no row mixes with another
    row's student output), which the gate-scoring methods need. The queue is off by default: with it a
    batch's loss depends on the batches seen before, so scoring methods would rank masks on a moving
    target (in-batch relations only: deterministic per batch)."""

    name = "embedding_relation"

    def __init__(self, teacher, temperature: float = 0.05, queue_size: int = 0):
        super().__init__(teacher)
        self.temperature, self.queue_size = temperature, queue_size
        self.queue: torch.Tensor | None = None

    def needs_hidden(self, model):
        return task_head(model) is not None

    def target_of(self, output, batch):
        embedding = F.normalize(sentence_embedding(self.teacher, output, batch).float(), dim=-1)
        bank = embedding if self.queue is None else torch.cat([embedding, self.queue.to(embedding.device)])
        if self.queue_size:
            self.queue = bank[: self.queue_size].detach()
        return {"embedding": embedding, "bank": TeacherBank(bank)}

    def loss_of(self, student, output, batch, targets):
        student_embedding = F.normalize(sentence_embedding(student, output, batch).float(), dim=-1)
        bank = targets["bank"].embeddings
        teacher_similarity = targets["embedding"] @ bank.T
        # a text's own teacher embedding (in this batch, or again in the queue) is left out: at a
        # low temperature it would take nearly all the mass, and the loss would only teach each
        # text to point at itself (what the cosine does) instead of ranking its neighbours
        itself = teacher_similarity > 1 - 1e-5
        teacher_logp = F.log_softmax((teacher_similarity / self.temperature).masked_fill(itself, float("-inf")), dim=-1)
        if bank.shape[-1] != student_embedding.shape[-1]:  # a narrower hidden size meets the bank on its own dims
            bank = F.normalize(_on_student_dims(student, bank, student_embedding.shape[-1]), dim=-1)
        student_logp = F.log_softmax((student_embedding @ bank.T / self.temperature).masked_fill(itself, float("-inf")), dim=-1)
        p = teacher_logp.exp()
        return (p * (teacher_logp - student_logp)).masked_fill(itself, 0.0).sum(dim=-1)


class SumObjective(Objective):
    """Several objectives added, each times its weight (e.g. `loss: [logits_kl, hidden_mse]` in a
    recipe): one student and one teacher forward pass serve every part."""

    def __init__(self, parts: list[Objective], weights: list[float] | None = None):
        super().__init__(next((p.teacher for p in parts if p.uses_teacher), parts[0].teacher))
        self.parts = parts
        self.weights = list(weights) if weights is not None else [1.0] * len(parts)
        self.name = "+".join(p.name for p in parts)
        self.uses_teacher = any(p.uses_teacher for p in parts)

    def needs_hidden(self, model):
        return any(p.needs_hidden(model) for p in self.parts)

    def target_of(self, output, batch):
        return {p.name: p.target_of(output, batch) if p.uses_teacher else {} for p in self.parts}

    @torch.no_grad()
    def targets(self, batch):
        if not self.uses_teacher:
            return {p.name: {} for p in self.parts}
        return super().targets(batch)

    def loss_of(self, student, output, batch, targets):
        total = 0
        for part, weight in zip(self.parts, self.weights):
            loss = part.loss_of(student, output, batch, targets[part.name])
            total = total + (loss if weight == 1 else weight * loss)  # weight 1 leaves the bits alone
        return total


def choose_objective(student, teacher, has_labels: bool, kind: str | None = None, temperature: float = 2.0, training: bool = False) -> Objective:
    """The loss for this model and data: the task loss with labels and a classification head,
    logits KL with a task head and no labels, embedding cosine + relation for base models."""
    head = task_head(student)
    if kind == "teacher":
        kind = "logits_kl" if head is not None else "embedding_geometry"
    if kind in (None, "auto"):
        if has_labels and head == "sequence":
            kind = "task"
        elif head is not None:
            kind = "logits_kl"
        else:
            kind = "embedding_geometry"
    if kind == "embedding_geometry":  # an embedding model keeps its direction AND its neighbours
        relation = EmbeddingRelation(teacher, queue_size=TRAINING_QUEUE if training else 0)
        return SumObjective([EmbeddingCosine(teacher), relation], [1.0, RELATION_WEIGHT])
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
    if kind == "embedding_relation":
        return EmbeddingRelation(teacher, queue_size=TRAINING_QUEUE if training else 0)
    raise BadInputError(f"unknown loss {kind!r}", hint=f"choose from auto, teacher, {', '.join(KINDS)}")


def make_objective(student, teacher, has_labels: bool, kinds=("auto",), temperature: float = 2.0, training: bool = False) -> Objective:
    """One objective, or the sum of several."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds) or ["auto"]
    parts, names = [], set()
    for kind in kinds:
        part = choose_objective(student, teacher, has_labels, kind, temperature, training)
        if part.name not in names:  # `[auto, teacher]` on an unlabeled model is one loss, not twice the same
            parts.append(part)
            names.add(part.name)
    return parts[0] if len(parts) == 1 else SumObjective(parts)


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
