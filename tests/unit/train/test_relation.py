"""The relational embedding loss: what it computes (by hand), its teacher queue, a text's own copies
left out, and that embedding models use it by default."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from shrink.train.objectives import EmbeddingRelation, make_objective

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
    expected = []
    for i in range(4):  # by hand: each text against the other texts' teacher embeddings, not its own
        others = [j for j in range(4) if j != i]
        p = F.softmax(t[i] @ t[others].T / 0.5, dim=-1)
        log_q = F.log_softmax(s[i] @ t[others].T / 0.5, dim=-1)
        expected.append((p * (p.log() - log_q)).sum())
    torch.testing.assert_close(got, torch.stack(expected))


def test_the_queue_keeps_the_latest_teacher_embeddings_first_in_first_out():
    loss = EmbeddingRelation(tiny_model("bert"), queue_size=5)
    first, second = torch.randn(3, 6), torch.randn(3, 6)
    assert loss.target_of(output(first), batch_of(3))["bank"].embeddings.shape[0] == 3
    bank = loss.target_of(output(second), batch_of(3))["bank"].embeddings
    assert bank.shape[0] == 6  # this batch and the queue
    torch.testing.assert_close(bank[:3], F.normalize(second, dim=-1))
    assert loss.queue.shape[0] == 5  # the oldest embedding left the queue
    torch.testing.assert_close(loss.queue[3:], F.normalize(first, dim=-1)[:2])


def test_a_texts_own_embedding_and_its_copies_are_left_out_of_its_row():
    """A text seen again (queue) or duplicated in the batch is not its own neighbour: identical teacher
    and student rows give 0, and a student that differs only in its similarity to the text's copy
    pays nothing for it."""
    model = tiny_model("bert")
    torch.manual_seed(2)
    teacher = torch.randn(3, 8)
    relation = EmbeddingRelation(model, queue_size=16)
    relation.target_of(output(teacher), batch_of(3))  # the queue now holds copies of these texts
    targets = relation.target_of(output(teacher), batch_of(3))
    assert targets["bank"].embeddings.shape[0] == 6
    assert relation.loss_of(model, output(teacher), batch_of(3), targets).abs().max() < 1e-6
    assert (relation.loss_of(model, output(torch.randn(3, 8)), batch_of(3), targets) > 0).all()


def test_without_a_queue_a_batch_scores_the_same_whatever_came_before():
    relation = EmbeddingRelation(tiny_model("bert"))
    first, again = torch.randn(4, 6), torch.randn(4, 6)
    before = relation.target_of(output(first), batch_of(4))["bank"].embeddings
    relation.target_of(output(again), batch_of(4))
    torch.testing.assert_close(relation.target_of(output(first), batch_of(4))["bank"].embeddings, before)


def test_embedding_models_distil_with_cosine_and_relation_by_default():
    model = tiny_model("bert")
    objective = make_objective(model, copy.deepcopy(model), False, ["auto"])
    assert objective.name == "embedding_cosine+embedding_relation"
    batch = tiny_inputs(model, batch=3)
    assert objective.per_sample(copy.deepcopy(model), batch, objective.targets(batch)).abs().max() < 1e-5
    assert make_objective(model, model, False, ["embedding_cosine"]).name == "embedding_cosine"  # the old one, by name
