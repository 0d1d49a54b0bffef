"""The mask scorer is exact (reuse changes nothing) and the A* search finds good removals."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from shrink.methods.heads.astar import AStar, AStarOptions, HeadsTarget, Node, _goal
from shrink.methods.heads.scoring import MaskScorer
from shrink.surgery.gates import Gates

from helpers import tiny_inputs, tiny_model


class HiddenMSE:
    """A minimal per-sample objective: distance of the last hidden state to the original's."""

    name = "hidden_mse_test"

    def __init__(self, teacher):
        self.teacher = teacher

    def targets(self, batch):
        return {"hidden": self.teacher(**batch).last_hidden_state}

    def per_sample(self, student, batch, targets):
        out = student(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (((out - targets["hidden"]) ** 2) * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2))


def setup(arch="bert", batches=2):
    model = tiny_model(arch)
    teacher = copy.deepcopy(model)
    data = [tiny_inputs(model, batch=3, length=7 + i, seed=i) for i in range(batches)]
    return model, MaskScorer(model, data, HiddenMSE(teacher), masks_per_pass=3, cache_size=8), data


def direct(model, data, removed, scorer):
    """Objective of one mask by a plain gated forward, no batching, no reuse."""
    total, count = 0.0, 0
    with Gates(model) as gates, torch.no_grad():
        for batch, targets in zip(data, scorer.targets):
            for layer, n in enumerate(scorer.counts):
                g = torch.ones(n)
                for h in removed:
                    if scorer.layer_of[h] == layer:
                        g[scorer.position[h]] = 0
                gates.heads[layer] = g
            total += scorer.objective.per_sample(model, batch, targets).sum().item()
            count += batch["input_ids"].shape[0]
    return total / count


@pytest.mark.parametrize("arch", ["bert", "distilbert", "mpnet"])
def test_scores_match_direct_forward_with_and_without_reuse(arch):
    model, scorer, data = setup(arch)
    parent = frozenset({5, 9})  # layers 1 and 2
    scorer.score([parent])
    children = [parent | {x} for x in (8, 10, 11, 3)]  # first differs at layer 2, 2, 2, 0
    reused = scorer.score(children, parent)
    assert scorer.layers_skipped > 0 or arch == "none"
    fresh = MaskScorer(model, data, scorer.objective, masks_per_pass=1, cache_size=0).score(children)
    for got, again, mask in zip(reused, fresh, children):
        assert got == pytest.approx(direct(model, data, mask, scorer), abs=1e-6)
        assert got == pytest.approx(again, abs=1e-6)


def test_reuse_skips_layers_below_the_first_change():
    model, scorer, _ = setup("bert")
    parent = frozenset({9})  # layer 2
    scorer.score([parent])
    before = scorer.layers_skipped
    scorer.score([parent | {10}], parent)  # also layer 2: layers 0 and 1 are replayed
    assert scorer.layers_skipped - before == 2 * len(scorer.batches)


def test_search_matches_brute_force_on_a_tiny_model():
    model, scorer, _ = setup("bert", batches=1)
    root_loss = scorer.score([frozenset()])[0]
    importance = [v - root_loss for v in scorer.score([frozenset({h}) for h in range(12)], frozenset())]
    options = AStarOptions(branching=12, max_evaluations=10_000)
    search = AStar(scorer, importance, root_loss, options)
    found = search.run(Node(frozenset(), 0.0, True, None), goal=3)
    all_sets = [frozenset(c) for c in itertools.combinations(range(12), 3)]
    losses = dict(zip(all_sets, scorer.score(all_sets)))
    best = min(losses.values()) - root_loss
    ranked = sorted(losses.values())
    # with full branching and an unbounded budget the search lands on (or right next to) the optimum
    assert found.g <= ranked[2] - root_loss + 1e-9, (found.g, best)
    assert len(found.removed) == 3


def test_budget_exhaustion_still_reaches_the_goal():
    model, scorer, _ = setup("bert", batches=1)
    root_loss = scorer.score([frozenset()])[0]
    importance = [v - root_loss for v in scorer.score([frozenset({h}) for h in range(12)], frozenset())]
    search = AStar(scorer, importance, root_loss, AStarOptions(branching=3, max_evaluations=2))
    found = search.run(Node(frozenset(), 0.0, True, None), goal=6)
    assert len(found.removed) == 6 and found.exact


def test_targets_validate():
    with pytest.raises(ValueError, match="exactly one"):
        HeadsTarget()
    with pytest.raises(ValueError):
        HeadsTarget(heads_fraction=1.2)
    assert _goal(HeadsTarget(heads_fraction=0.5), 72, [0.0] * 72) == 36
    assert _goal(HeadsTarget(max_loss_increase=0.25), 4, [0.1, 0.1, 0.1, 0.1]) == 2


def test_tolerance_mode_removes_as_many_as_fit():
    model, scorer, _ = setup("bert", batches=1)
    root_loss = scorer.score([frozenset()])[0]
    importance = [v - root_loss for v in scorer.score([frozenset({h}) for h in range(12)], frozenset())]
    tolerance = sorted(importance)[3] * 2  # room for a few cheap heads, not for all
    search = AStar(scorer, importance, root_loss, AStarOptions(branching=12, max_evaluations=200))
    goal = _goal(HeadsTarget(max_loss_increase=tolerance), 12, importance)
    found = search.extend_within(search.run(Node(frozenset(), 0.0, True, None), goal), tolerance, 12)
    assert 0 < len(found.removed) < 12
    assert found.g <= tolerance
    rest = [found.removed | {h} for h in range(12) if h not in found.removed]
    assert all(loss - root_loss > tolerance for loss in scorer.score(rest))  # no single head more fits
