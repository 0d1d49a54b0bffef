"""sentence-transformers input: every pooling mode as ST computes it, the ST files read (legacy and
current formats, Dense, Normalize), refusals, and the pooling used by objectives and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_inputs, tiny_model, write_st_files
from shrink.errors import BadInputError
from shrink.measure.evaluate import evaluate
from shrink.models.sentence import MODES, SentenceEmbedder, SentencePooling, attach, pool, pooling_of, read_pooling, write_modules
from shrink.train.objectives import choose_objective

st_pooling = pytest.importorskip("sentence_transformers.sentence_transformer.modules.pooling")


def token_states(seed=0, left_padding=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 7, 8, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    if left_padding:
        mask[1, :3] = 0
        mask[2, :1] = 0
    else:
        mask[1, 4:] = 0
        mask[2, 6:] = 0
    return hidden, mask


@pytest.mark.parametrize("left_padding", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_each_pooling_mode_matches_sentence_transformers(mode, left_padding):
    hidden, mask = token_states(left_padding=left_padding)
    expected = st_pooling.Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(pool(mode, hidden, mask), expected, atol=1e-6, rtol=1e-6)


def test_concatenated_modes_dense_and_normalize_are_applied_in_order():
    from sentence_transformers.base.modules.dense import Dense as STDense

    hidden, mask = token_states()
    st_dense = STDense(16, 5, activation_function=torch.nn.Tanh())
    ours = SentencePooling(modes=("cls", "mean"), normalize=True, dense=(_dense_of(st_dense),))
    features = st_pooling.Pooling(8, pooling_mode=["cls", "mean"])({"token_embeddings": hidden, "attention_mask": mask})
    expected = torch.nn.functional.normalize(st_dense(features)["sentence_embedding"], dim=-1)
    torch.testing.assert_close(ours.embed(hidden, mask), expected, atol=1e-6, rtol=1e-6)


def _dense_of(st_dense):
    from shrink.models.sentence import Dense

    linear = st_dense.linear
    return Dense(linear.weight.detach(), linear.bias.detach(), "Tanh")


def test_read_pooling_legacy_and_current_formats(tmp_path):
    legacy, current = tmp_path / "legacy", tmp_path / "current"
    legacy.mkdir(), current.mkdir()
    write_st_files(legacy, {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    write_st_files(current, {"embedding_dimension": 32, "pooling_mode": ["mean", "max"], "include_prompt": False}, modules=("Pooling",), max_seq_length=16)
    a, b = read_pooling(str(legacy)), read_pooling(str(current))
    assert (a.modes, a.normalize, a.max_seq_length, a.include_prompt) == (("cls",), True, 64, True)
    assert (b.modes, b.normalize, b.max_seq_length, b.include_prompt) == (("mean", "max"), False, 16, False)
    assert read_pooling(str(tmp_path)) is None  # no modules.json: a plain HF model


def test_read_pooling_refuses_what_it_cannot_follow(tmp_path):
    write_st_files(tmp_path, {"pooling_mode": "mean"}, modules=("Pooling", "LSTM"))
    with pytest.raises(BadInputError, match="LSTM module"):
        read_pooling(str(tmp_path))
    write_st_files(tmp_path, {"pooling_mode": "median"}, modules=("Pooling",))
    with pytest.raises(BadInputError, match="median"):
        read_pooling(str(tmp_path))
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 0, "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    with pytest.raises(BadInputError, match="0_Transformer"):
        read_pooling(str(tmp_path))


def test_write_modules_copies_the_st_files_with_the_slim_width(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir(), out.mkdir()
    write_st_files(source, {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    write_modules(out, read_pooling(str(source)), width=24)
    assert json.loads((out / "modules.json").read_text()) == json.loads((source / "modules.json").read_text())
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 24
    assert (out / "2_Normalize").is_dir() and (out / "sentence_bert_config.json").is_file()


def test_plain_models_pool_by_mean_and_keep_no_st_files(tmp_path):
    model = tiny_model("bert")
    assert pooling_of(model).modes == ("mean",) and not pooling_of(model).is_sentence_transformer
    write_modules(tmp_path, pooling_of(model), width=32)
    assert list(tmp_path.iterdir()) == []


def test_objectives_and_evaluation_use_the_models_own_pooling():
    """A CLS-pooled model is distilled and evaluated on its [CLS] vector, not on the mean."""
    teacher = tiny_model("bert")
    attach(teacher, SentencePooling(modes=("cls",), source="tiny"))
    student = tiny_model("bert", seed=1)
    attach(student, pooling_of(teacher))
    batch = tiny_inputs(teacher)
    with torch.no_grad():
        cls_teacher = teacher(**batch).last_hidden_state[:, 0]
        cls_student = student(**batch).last_hidden_state[:, 0]
    objective = choose_objective(student, teacher, has_labels=False)
    targets = objective.targets(batch)
    torch.testing.assert_close(targets["embedding_cosine"]["embedding"], cls_teacher)
    with torch.no_grad():
        loss = objective.parts[0](student, batch, targets["embedding_cosine"])
    torch.testing.assert_close(loss, (1 - torch.nn.functional.cosine_similarity(cls_student, cls_teacher)).mean())
    result = evaluate(student, [batch], teacher=teacher, progress=False)
    assert result["embedding_cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(cls_student, cls_teacher).mean()), abs=1e-6)
    mean_result = evaluate(tiny_model("bert", seed=1), [batch], teacher=tiny_model("bert"), progress=False)
    assert mean_result["embedding_cosine"] != pytest.approx(result["embedding_cosine"], abs=1e-4)  # the pooling mattered


def test_hidden_pruning_is_refused_where_the_pooling_reads_every_dim():
    from shrink.models.sentence import check_hidden_pruning

    model = tiny_model("bert")
    check_hidden_pruning(model)  # mean pooling: fine
    attach(model, SentencePooling(modes=("cls", "mean"), source="tiny"))
    with pytest.raises(BadInputError, match="2 pooling modes"):
        check_hidden_pruning(model)


def test_pooled_onnx_outputs_the_sentence_embedding(tmp_path):
    from shrink.measure.export import export_onnx
    from shrink.measure.onnx_session import graph_feed, session

    model = tiny_model("bert")
    pooling = SentencePooling(modes=("cls",), normalize=True, source="tiny")
    report = export_onnx(model, tmp_path / "pooled.onnx", pooling=pooling)
    assert report["outputs"] == ["sentence_embedding"]
    batch = tiny_inputs(model, batch=3, length=11)
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    sess = session(tmp_path / "pooled.onnx")
    got = sess.run(["sentence_embedding"], graph_feed(sess, batch))[0]
    with torch.no_grad():
        expected = SentenceEmbedder(model, pooling)(**batch).sentence_embedding
    assert got.shape == (3, 32)
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-4)
    assert evaluate(str(tmp_path / "pooled.onnx"), [batch], teacher=str(tmp_path / "pooled.onnx"), progress=False)["embedding_cosine"] == pytest.approx(1.0)
