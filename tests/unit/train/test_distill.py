"""Objectives and distillation recovery on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from shrink.data.examples import Examples, make_batches
from shrink.errors import BadInputError
from shrink.methods.heads.scoring import MaskScorer, repeat_rows
from shrink.surgery import drop_layers, prune_heads
from shrink.surgery.gates import Gates
from shrink.train.loop import distill
from shrink.train.objectives import choose_objective, make_objective

from helpers import sharp, tiny_inputs, tiny_model, tiny_tokenizer

HEADS = {"base": ["embedding_cosine", "embedding_relation", "hidden_mse"], "seq": ["logits_kl", "hidden_mse", "embedding_cosine", "embedding_relation"], "tok": ["logits_kl"], "qa": ["logits_kl"]}


def pruned(model):
    student = copy.deepcopy(model)
    prune_heads(student, {0: [0, 2], 1: [1]})
    return student


def loss_of(objective, student, batch):
    return objective.per_sample(student, batch, objective.targets(batch))


@pytest.mark.parametrize("task", list(HEADS))
def test_losses_zero_for_the_teacher_positive_for_a_pruned_student(arch, task):
    teacher = sharp(tiny_model(arch, task, num_labels=2 if task == "qa" else 3))
    batch = tiny_inputs(teacher, batch=3)
    for kind in HEADS[task]:
        objective = choose_objective(teacher, teacher, has_labels=False, kind=kind)
        same = loss_of(objective, copy.deepcopy(teacher), batch)
        assert same.shape == (3,)
        assert same.abs().max() < 1e-5, kind
        assert (loss_of(objective, pruned(teacher), batch) > 1e-6).all(), kind


def test_task_loss_is_cross_entropy_per_sample():
    model = tiny_model("bert", "seq")
    batch = {**tiny_inputs(model, batch=2), "labels": torch.tensor([0, 2])}
    objective = choose_objective(model, model, has_labels=True)
    assert objective.name == "task"
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    torch.testing.assert_close(loss_of(objective, model, batch), expected)


def test_auto_choice_and_refusals():
    base, seq, tok = tiny_model("bert"), tiny_model("bert", "seq"), tiny_model("bert", "tok")
    assert choose_objective(base, base, has_labels=False).name == "embedding_cosine+embedding_relation"
    assert choose_objective(seq, seq, has_labels=False).name == "logits_kl"
    assert choose_objective(seq, seq, has_labels=True).name == "task"
    assert choose_objective(tok, tok, has_labels=True).name == "logits_kl"  # labels are per example, not per token
    assert make_objective(seq, seq, False, ["logits_kl", "hidden_mse"]).name == "logits_kl+hidden_mse"
    for model, has_labels, kind, message in [
        (base, False, "logits_kl", "needs a task head"),
        (seq, False, "task", "needs labeled data"),
        (base, True, "task", "sequence classification head"),
        (base, False, "l2", "unknown loss"),
    ]:
        with pytest.raises(BadInputError, match=message):
            choose_objective(model, model, has_labels, kind)


def test_hidden_mse_maps_layers_to_their_originals():
    """Dropping the LAST layer leaves the others' outputs unchanged: with the original-id map the
    loss is exactly zero, where a position map (student layer i vs teacher layer i+1...) is not."""
    teacher = tiny_model("bert")
    batch = tiny_inputs(teacher)
    objective = choose_objective(teacher, teacher, False, "hidden_mse")
    last_dropped = copy.deepcopy(teacher)
    drop_layers(last_dropped, [2])
    assert loss_of(objective, last_dropped, batch).abs().max() < 1e-6
    first_dropped = copy.deepcopy(teacher)
    drop_layers(first_dropped, [0])
    assert (loss_of(objective, first_dropped, batch) > 1e-4).all()


@pytest.mark.parametrize("kind", ["embedding_cosine", "embedding_relation", "hidden_mse"])
def test_per_sample_with_repeated_batch_and_gates_equals_physical_removal(kind):
    teacher = tiny_model("bert")
    batch = tiny_inputs(teacher, batch=2)
    objective = choose_objective(teacher, teacher, False, kind)
    student = copy.deepcopy(teacher)
    targets = repeat_rows(objective.targets(batch), 2)
    with Gates(student) as gates, torch.no_grad():
        gates.heads[0] = torch.tensor([[1.0, 1, 1, 1]] * 2 + [[1.0, 0, 1, 0]] * 2)  # copy 2: heads 1, 3 off
        losses = objective.per_sample(student, repeat_rows(batch, 2), targets)
    removed = copy.deepcopy(teacher)
    prune_heads(removed, {0: [0, 2]})
    assert losses[:2].abs().max() < 1e-5
    torch.testing.assert_close(losses[2:], loss_of(objective, removed, batch), atol=1e-5, rtol=1e-4)


def test_objectives_plug_into_the_mask_scorer():
    teacher = sharp(tiny_model("bert", "seq"))
    objective = choose_objective(teacher, teacher, False)
    scorer = MaskScorer(copy.deepcopy(teacher), [tiny_inputs(teacher, batch=3)], objective, masks_per_pass=2)
    empty, one, two = scorer.score([frozenset(), frozenset({1}), frozenset({1, 5})])
    assert empty < 1e-6 < one


# --- recovery ---------------------------------------------------------------------------------


def corpus_batches(n: int, seed: int, batch_size: int = 8):
    import random

    rng = random.Random(seed)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 30))).strip() or "a" for _ in range(n)]
    return make_batches(tiny_tokenizer(), Examples(texts), batch_size=batch_size, max_length=24)


def student_teacher(task="base"):
    teacher = sharp(tiny_model("bert", task))
    student = copy.deepcopy(teacher)
    prune_heads(student, {0: [0], 1: [1, 2], 2: [3]})
    drop_layers(student, [1])
    return student, teacher


@pytest.mark.parametrize("task, loss", [("base", ("auto",)), ("seq", ("logits_kl", "hidden_mse"))])
def test_distill_lowers_held_out_loss(task, loss):
    student, teacher = student_teacher(task)
    train, held_out = corpus_batches(64, seed=0), corpus_batches(32, seed=1)
    history = distill(student, teacher, train, eval_batches=held_out, epochs=3, lr=2e-3, loss=loss, progress=False)
    assert history["steps"] == 24 and len(history["losses"]) == 24
    assert history["eval_loss_after"] < 0.7 * history["eval_loss_before"], history
    assert not student.training and all(not p.requires_grad for p in teacher.parameters())


def test_distill_with_labels_uses_the_task_loss():
    student, teacher = student_teacher("seq")
    train = corpus_batches(32, seed=0)
    for b in train:
        b["labels"] = (b["input_ids"][:, 1] % 3).long()  # a learnable rule: the first character
    history = distill(student, teacher, train, eval_batches=train, epochs=4, lr=3e-3, progress=False)
    assert history["objective"] == "task"
    assert history["eval_loss_after"] < history["eval_loss_before"]


def test_steps_accumulation_and_determinism():
    train = corpus_batches(40, seed=0)  # 5 batches
    a, teacher = student_teacher()
    history = distill(a, teacher, train, epochs=2, grad_accum=2, progress=False, lr=1e-3)
    assert history["steps"] == 5  # ceil(10 micro-batches / 2)
    assert distill(copy.deepcopy(a), teacher, train, max_steps=2, progress=False)["steps"] == 2
    b, _ = student_teacher()
    distill(b, teacher, train, epochs=2, grad_accum=2, progress=False, lr=1e-3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_early_stop_keeps_the_best_weights():
    student, teacher = student_teacher("seq")
    train = corpus_batches(40, seed=0)
    held_out = [dict(b) for b in train]
    for t, h in zip(train, held_out):  # held-out labels follow a rule training can only get worse at
        t["labels"] = (t["input_ids"][:, 1] % 3).long()
        h["labels"] = (t["labels"] + 1) % 3
    history = distill(student, teacher, train, eval_batches=held_out, epochs=4, lr=3e-3, early_stop_patience=2, eval_every=1, progress=False)
    assert history["stopped_early"] and history["steps"] < 20, history
    best = min([history["eval_loss_before"]] + [e["loss"] for e in history["evals"]])
    assert history["eval_loss_after"] == pytest.approx(best, rel=1e-4)
    assert history["evals"][-1]["loss"] > best  # the last weights were worse, and were not kept


def test_best_weights_are_kept_when_training_ends_worse_without_stopping_early():
    student, teacher = student_teacher("seq")
    train = corpus_batches(40, seed=0)
    held_out = [dict(b) for b in train]
    for t, h in zip(train, held_out):
        t["labels"] = (t["input_ids"][:, 1] % 3).long()
        h["labels"] = (t["labels"] + 1) % 3
    history = distill(student, teacher, train, eval_batches=held_out, epochs=1, lr=3e-3, early_stop_patience=100, progress=False)
    assert not history["stopped_early"] and history["kept_best"]
    best = min([history["eval_loss_before"]] + [e["loss"] for e in history["evals"]])
    assert history["eval_loss_after"] == pytest.approx(best, rel=1e-4) and history["evals"][-1]["loss"] > best


def test_dropout_false_trains_without_dropout_noise():
    """A student equal to its teacher has zero loss only when dropout is off (tiny models have dropout 0.1)."""
    teacher = sharp(tiny_model("bert"))
    train = corpus_batches(8, seed=0)
    students = [copy.deepcopy(teacher).requires_grad_(True) for _ in range(2)]
    noisy = distill(students[0], teacher, train, max_steps=1, lr=1e-9, progress=False)
    exact = distill(students[1], teacher, train, max_steps=1, lr=1e-9, dropout=False, progress=False)
    assert exact["losses"][0] < 1e-6 < noisy["losses"][0], (exact["losses"], noisy["losses"])


def test_distill_refuses_empty_data_and_missing_cuda():
    student, teacher = student_teacher()
    with pytest.raises(BadInputError, match="no training batches"):
        distill(student, teacher, [], progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="CUDA is not available"):
            distill(student, teacher, corpus_batches(8, 0), device="cuda", progress=False)


def test_distill_step_early_stops_on_calibration_batches_never_the_report_split():
    from shrink.methods.base import Context
    from shrink.methods.catalog import get_method
    from shrink.prune.pipeline import run_step

    student, teacher = student_teacher("seq")
    calibration = corpus_batches(40, seed=0)
    report_split = [{"input_ids": None}]  # any use of it would fail
    ctx = Context(
        model=student, teacher=teacher, tokenizer=None, calibration=calibration,
        calibration_batches=lambda n, length, size: calibration, evaluation=report_split,
        objective=choose_objective(student, teacher, has_labels=False), has_labels=False,
    )
    method = get_method("distill")
    result, _ = run_step(ctx, method, method.options(epochs=1, early_stop_patience=3, lr=1e-3), method.target())
    history = result.stats["distill"]
    assert history["evals"] and "eval_loss_before" in history
    plain, _ = run_step(ctx, method, method.options(epochs=1, lr=1e-3), method.target())
    assert not plain.stats["distill"].get("evals")


@pytest.mark.parametrize("task, labels, expected", [
    ("seq", True, "task+logits_kl"),
    ("seq", False, "logits_kl"),
    ("base", False, "embedding_cosine+embedding_relation"),
])
def test_teacher_loss_is_the_originals_own_output_and_never_counted_twice(task, labels, expected):
    model = tiny_model("bert", task=task)
    assert make_objective(model, copy.deepcopy(model), labels, ["auto", "teacher"]).name == expected


@pytest.mark.parametrize("kind", ["hidden_mse", "embedding_cosine", "embedding_relation"])
def test_a_student_with_a_narrower_hidden_size_is_compared_on_the_dims_it_kept(kind):
    from shrink import surgery
    from shrink.surgery.plan import KeepHidden

    teacher = tiny_model("bert")
    batch = tiny_inputs(teacher, batch=3)
    student = copy.deepcopy(teacher)
    surgery.apply(student, [KeepHidden([i for i in range(32) if i % 4])])
    objective = choose_objective(student, teacher, False, kind)
    losses = loss_of(objective, student, batch)
    assert losses.shape == (3,) and torch.isfinite(losses).all() and (losses > 0).all()
