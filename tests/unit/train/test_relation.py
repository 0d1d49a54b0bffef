"""The relational embedding loss: what it computes, its teacher queue, and that it sees what the
per-sample cosine cannot (the distances between texts)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from shrink.train.objectives import EmbeddingCosine, EmbeddingRelation, make_objective

from helpers import tiny_inputs, tiny_model


def output(embeddings: torch.Tensor):
    """A fake base-model output whose mean-pooled embedding is `embeddings` (one token per text)."""
    return SimpleNamespace(last_hidden_state=embeddings[:, None, :])


def batch_of(n: int) -> dict:
    return {"attention_mask": torch.ones(n, 1, dtype=torch.long)}


def test_relation_is_the_kl_of_softmaxed_similarities_to_the_teacher_bank():
    model = tiny_model("bert")
    loss = EmbeddingRelation(model, temperature=0.5)
    torch.manual_seed(0)
    teacher, student = torch.randn(4, 6), torch.randn(4, 6)
    targets = loss.target_of(output(teacher), batch_of(4))
    got = loss.loss_of(model, output(student), batch_of(4), targets)
    t, s = F.normalize(teacher, dim=-1), F.normalize(student, dim=-1)
    p, log_q = F.softmax(t @ t.T / 0.5, dim=-1), F.log_softmax(s @ t.T / 0.5, dim=-1)
    torch.testing.assert_close(got, (p * (p.log() - log_q)).sum(dim=-1))


def test_the_queue_keeps_the_latest_teacher_embeddings_first_in_first_out():
    loss = EmbeddingRelation(tiny_model("bert"), queue_size=5)
    first, second = torch.randn(3, 6), torch.randn(3, 6)
    assert loss.target_of(output(first), batch_of(3))["bank"].embeddings.shape[0] == 3
    bank = loss.target_of(output(second), batch_of(3))["bank"].embeddings
    assert bank.shape[0] == 6  # this batch and the queue
    torch.testing.assert_close(bank[:3], F.normalize(second, dim=-1))
    assert loss.queue.shape[0] == 5  # the oldest embedding left the queue
    torch.testing.assert_close(loss.queue[3:], F.normalize(first, dim=-1)[:2])


def test_relation_sees_a_collapse_of_neighbours_that_the_cosine_barely_sees():
    """Students that move every text by the same small angle score the same cosine; the one that
    moves all texts towards a common direction (neighbours blur) pays far more relational loss."""
    model = tiny_model("bert")
    torch.manual_seed(1)
    teacher = F.normalize(torch.randn(64, 16), dim=-1)
    towards_mean = F.normalize(teacher + 0.6 * F.normalize(teacher.mean(0), dim=0), dim=-1)
    cosine = float((towards_mean * teacher).sum(-1).mean())
    noise = torch.randn(64, 16)
    noise = F.normalize(noise - (noise * teacher).sum(-1, keepdim=True) * teacher, dim=-1)  # orthogonal
    angle = torch.tensor(cosine).clamp(max=1).acos()
    jittered = teacher * angle.cos() + noise * angle.sin()  # same mean cosine, random directions
    relation = EmbeddingRelation(model)
    targets = relation.target_of(output(teacher), batch_of(64))
    blurred = relation.loss_of(model, output(towards_mean), batch_of(64), targets).mean()
    moved = relation.loss_of(model, output(jittered), batch_of(64), targets).mean()
    cos_loss = EmbeddingCosine(model)
    cos_targets = cos_loss.target_of(output(teacher), batch_of(64))
    assert abs(float(cos_loss.loss_of(model, output(towards_mean), batch_of(64), cos_targets).mean())
               - float(cos_loss.loss_of(model, output(jittered), batch_of(64), cos_targets).mean())) < 0.02
    assert blurred > moved > 0


def test_embedding_models_distil_with_cosine_and_relation_by_default():
    model = tiny_model("bert")
    objective = make_objective(model, copy.deepcopy(model), False, ["auto"])
    assert objective.name == "embedding_cosine+embedding_relation"
    batch = tiny_inputs(model, batch=3)
    assert objective.per_sample(copy.deepcopy(model), batch, objective.targets(batch)).abs().max() < 1e-5
    assert make_objective(model, model, False, ["embedding_cosine"]).name == "embedding_cosine"  # the old one, by name
