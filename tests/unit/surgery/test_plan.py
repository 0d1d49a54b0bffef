"""Plans are ordered lists of typed ops: one handler per op type, applied in the method's order, each
recording a manifest op that the shipped runtime can replay."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from shrink import registry, surgery
from shrink.errors import BadInputError
from shrink.methods import base
from shrink.models.slim import load_slim, save_slim
from shrink.surgery import DropLayers, KeepFFN, KeepHeads, KeepHidden, KeepVocab, LowRank, ReplaceEmbedding, runtime
from shrink.surgery.ops import head_size
from shrink.surgery.plan import HANDLERS, KeepTokens, ScaleUnits, legacy_plan

from helpers import main_output, tiny_inputs, tiny_model


def path_of(model, position: int, name: str) -> str:
    adapter = surgery.adapter_of(model)
    return f"{adapter.layers}.{position}.{getattr(adapter, name)}"


def factorized_state(model, rank: int) -> dict:
    old = surgery.word_embeddings_of(model)
    g = torch.Generator().manual_seed(3)
    return {"codes.weight": torch.randn(old.num_embeddings, rank, generator=g),
            "proj.weight": torch.randn(old.embedding_dim, rank, generator=g)}


def value_factors() -> tuple:
    g = torch.Generator().manual_seed(4)  # every tiny model has hidden size 32
    return torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), torch.randn(32, generator=g)


def scale_by_hand(model, heads: dict, ffn: dict) -> None:
    """What ScaleUnits does, written out: a unit's factor multiplies its input columns of the output projection."""
    adapter, layers, size = surgery.adapter_of(model), surgery.layers_of(model), head_size(model)
    with torch.no_grad():
        for scales, path, width in ((heads, adapter.attention_out, size), (ffn, adapter.ffn_out, 1)):
            for i, factors in scales.items():
                layers[i].get_submodule(path).weight.mul_(torch.tensor(factors).repeat_interleave(width)[None, :])


SCALES = {"heads": {0: [2.0, 1.0, 0.5, -1.0]}, "ffn": {2: [float(j % 5) - 1.5 for j in range(37)]}}
VOCAB = [0, 1, 2, 3, *range(5, 99, 4)]  # the padding token (0 or 1) among them


# (op on a model, the surgery function call it stands for): one case per op type, more for variants
CASES = {
    "heads": lambda m: (KeepHeads({0: [0, 2], 1: []}), lambda: surgery.prune_heads(m, {0: [0, 2], 1: []})),
    "ffn": lambda m: (KeepFFN({0: [1, 5, 7], 2: []}), lambda: surgery.prune_ffn(m, {0: [1, 5, 7], 2: []})),
    "drop_layers": lambda m: (DropLayers([1]), lambda: surgery.drop_layers(m, [1])),
    "low_rank": lambda m: (LowRank(path_of(m, 0, "ffn_in"), 3), lambda: surgery.factorize_linear(m, path_of(m, 0, "ffn_in"), 3)),
    "low_rank_factors": lambda m: (
        LowRank(path_of(m, 1, "value"), 2, value_factors()),
        lambda: surgery.factorize_linear(m, path_of(m, 1, "value"), 2, value_factors()),
    ),
    "scale_units": lambda m: (ScaleUnits(**SCALES), lambda: scale_by_hand(m, **SCALES)),
    "hidden": lambda m: (KeepHidden([0, 3, 4, 9, 31]), lambda: surgery.prune_hidden(m, [0, 3, 4, 9, 31])),
    "vocab": lambda m: (KeepVocab(VOCAB), lambda: surgery.prune_vocab(m, VOCAB)),
    "tokens": lambda m: (KeepTokens({0: 0.5}), lambda: surgery.prune_tokens(m, {0: 0.5})),
    "embedding": lambda m: (
        ReplaceEmbedding("factorized", {"rank": 8}, factorized_state(m, 8)),
        lambda: surgery.install_word_embeddings(m, "factorized", {"rank": 8}, factorized_state(m, 8)),
    ),
}


def assert_same(a, b) -> None:
    assert surgery.manifest_of(a) == surgery.manifest_of(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_handler_equals_its_surgery_function(arch, case):
    planned, direct = tiny_model(arch), tiny_model(arch)
    op, _ = CASES[case](planned)
    _, call = CASES[case](direct)
    surgery.apply(planned, [op])
    call()
    assert_same(planned, direct)


def test_the_cases_cover_every_handler():
    assert {type(CASES[c](tiny_model("bert"))[0]) for c in CASES} == set(HANDLERS)


def test_the_method_decides_the_order(tmp_path):
    """LowRank after KeepHeads factorizes the pruned matrix, with factors sized for it."""
    model = tiny_model("bert")
    inputs = tiny_inputs(model)
    query = path_of(model, 0, "query")
    first, second = torch.randn(3, 32) * 0.1, torch.randn(16, 3) * 0.1  # 2 heads of 8 left: 16 x 32
    surgery.apply(model, [KeepHeads({0: [0, 2]}), LowRank(query, 3, (first, second)), DropLayers([2])])
    factorized = model.get_submodule(query)
    assert (factorized.out_features, factorized.rank) == (16, 3)
    assert torch.equal(factorized.first.weight, first) and torch.equal(factorized.second.weight, second)
    assert [op["op"] for op in surgery.manifest_of(model)["ops"]] == ["heads", "low_rank", "drop_layers"]

    # the other order is another model: the factorized pair is sliced by the head pruning
    other = tiny_model("bert")
    surgery.apply(other, [LowRank(query, 3), KeepHeads({0: [0, 2]})])
    assert [op["op"] for op in surgery.manifest_of(other)["ops"]] == ["low_rank", "heads"]
    assert other.get_submodule(query).out_features == 16

    reloaded = load_slim(save_slim(model, tmp_path / "slim"))
    with torch.no_grad():
        assert torch.equal(main_output(reloaded(**inputs)), main_output(model(**inputs)))


def test_an_unknown_op_is_refused_before_anything_changes():
    @dataclass(frozen=True)
    class PruneTokens:
        fraction: float

    model = tiny_model("bert")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BadInputError, match="unknown plan op PruneTokens"):
        surgery.apply(model, [KeepHeads({0: [1]}), PruneTokens(0.5)])
    assert not surgery.manifest_of(model)["ops"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(BadInputError, match="list of ops"):
        surgery.apply(model, KeepHeads({0: [1]}))


def test_no_plan_changes_nothing():
    model = tiny_model("bert")
    surgery.apply(model, None)
    surgery.apply(model, [])
    assert not surgery.manifest_of(model)["ops"]


def test_legacy_plan_gives_the_old_fixed_order():
    factors = (torch.zeros(2, 32), torch.zeros(32, 2))
    embedding = ("factorized", {"rank": 8}, {})
    with pytest.deprecated_call():
        plan = registry.Plan(heads={0: [1]}, ffn={1: [2]}, drop_layers=[2], embedding=embedding,
                             low_rank={"pooler.dense": 4, "encoder.layer.0.attention.self.key": (2, factors)})
    assert [type(op) for op in plan] == [LowRank, LowRank, KeepHeads, KeepFFN, DropLayers, ReplaceEmbedding]
    assert plan[0] == LowRank("pooler.dense", 4)
    assert (plan[1].path, plan[1].rank) == ("encoder.layer.0.attention.self.key", 2) and plan[1].factors is factors
    assert plan[2:] == [KeepHeads({0: [1]}), KeepFFN({1: [2]}), DropLayers([2]), ReplaceEmbedding(*embedding)]
    assert base.Plan is registry.Plan is legacy_plan
    with pytest.deprecated_call():
        assert registry.Plan() == [] and registry.Plan(heads={}, low_rank={}) == []


def test_a_legacy_plan_applies_as_the_old_pipeline_did(arch):
    """Old apply_plan order: low rank, heads, FFN, dropped layers, embedding."""
    planned, direct = tiny_model(arch), tiny_model(arch)
    key = path_of(planned, 2, "key")
    with pytest.deprecated_call():
        plan = registry.Plan(heads={2: [0, 3]}, ffn={0: [4, 5]}, drop_layers=[1],
                             embedding=("factorized", {"rank": 8}, factorized_state(planned, 8)), low_rank={key: 5})
    surgery.apply(planned, plan)
    surgery.factorize_linear(direct, key, 5)
    surgery.prune_heads(direct, {2: [0, 3]})
    surgery.prune_ffn(direct, {0: [4, 5]})
    surgery.drop_layers(direct, [1])
    surgery.install_word_embeddings(direct, "factorized", {"rank": 8}, factorized_state(direct, 8))
    assert_same(planned, direct)


def test_every_recorded_op_has_a_replay_entry(arch):
    model = tiny_model(arch)
    for case in ("low_rank", "low_rank_factors", "heads", "ffn", "drop_layers", "hidden", "vocab", "embedding", "tokens"):
        op, _ = CASES[case](model)
        surgery.apply(model, [op])
    manifest = surgery.manifest_of(model)
    assert {op["op"] for op in manifest["ops"]} == set(runtime.REPLAY)
    replayed = tiny_model(arch)
    runtime.apply_manifest(replayed, copy.deepcopy(manifest))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(replayed) == shapes(model)


def test_an_unknown_manifest_op_is_a_value_error():
    with pytest.raises(ValueError, match="unknown manifest op 'prune_tokens'"):
        runtime.apply_manifest(tiny_model("bert"), {"format_version": 1, "ops": [{"op": "prune_tokens"}]})
