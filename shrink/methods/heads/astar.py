"""Attention-head pruning with A* search (after Parnami et al. 2021, "Pruning Attention Heads of
Transformer Models Using A* Search").

A search node is a set S of removed heads. Its path cost is measured, never estimated:

    g(S) = L(S) - L(nothing removed)

where L is the calibration objective (task loss with labels, distillation loss against the original
otherwise), computed exactly with gates (shrink.methods.heads.scoring). The heuristic estimates what the
remaining removals will cost, from per-head importances:

    imp(h) = L({h}) - L(nothing removed)                  (one exact ablation per head, up front)
    h(S)   = rho(S) * sum of the (N - |S|) smallest max(imp, 0) among heads not in S
    rho(S) = clip(g(S) / sum_{x in S} max(imp(x), 0), 1, scale_cap)

rho says "the heads still to go will interact as badly as the ones already gone": single-head
importances add up to less than the real damage when heads are removed together, and without the
correction the search would keep returning to shallow nodes. The heuristic is therefore not
admissible; the search is best-first on f = g + h with that documented bias.

Children of S are S + {h} for the `branching` heads with the smallest importance not in S. They are
pushed with an estimated g (g(S) + rho(S) * imp(h)) and scored exactly only when they reach the
front of the queue (lazy A*), several at a time in one forward pass. A node popped with an exact g
at depth N is the answer. If `max_evaluations` runs out first, the best node found so far is
completed greedily (each step scores its `branching` children exactly and keeps the best).

Targets: `heads_fraction` or `heads_count` remove exactly that many heads with the least damage;
`max_loss_increase` removes as many heads as possible while g stays within the tolerance (the
paper's mode): a count search at the depth the importances suggest, then the deepest prefix of its
path within tolerance, extended greedily while the tolerance holds.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

from pydantic import Field, model_validator

from shrink.console import progress
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.heads.scoring import MaskScorer
from shrink.surgery import KeepHeads


class HeadsTarget(Strict):
    heads_fraction: float | None = Field(None, gt=0, le=1, description="fraction of all heads to remove")
    heads_count: int | None = Field(None, ge=1, description="number of heads to remove")
    max_loss_increase: float | None = Field(None, ge=0, description="remove heads while the objective rises at most this much")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [k for k in ("heads_fraction", "heads_count", "max_loss_increase") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of heads_fraction, heads_count, max_loss_increase")
        return self


class AStarOptions(Strict):
    calibration_samples: int = Field(32, ge=1, description="calibration examples the search scores on")
    max_length: int = Field(64, ge=8, description="tokens per calibration example")
    batch_size: int = Field(32, ge=1)
    branching: int = Field(6, ge=1, description="children per expanded node (lowest importance first)")
    max_evaluations: int = Field(300, ge=1, description="exact mask evaluations for the search (soft)")
    masks_per_pass: int = Field(8, ge=1, description="candidate masks scored in one forward pass")
    cache_size: int = Field(16, ge=0, description="scored masks whose layer outputs are kept for reuse")
    scale_cap: float = Field(4.0, ge=1, description="upper bound of the interaction factor rho")


@dataclass
class Node:
    removed: frozenset
    g: float
    exact: bool
    parent: "Node | None"


class AStar:
    def __init__(self, scorer: MaskScorer, importance: list[float], base_loss: float, options: AStarOptions, on_step=None):
        self.scorer = scorer
        self.base_loss = base_loss
        self.imp = [max(v, 0.0) for v in importance]
        self.order = sorted(range(len(importance)), key=lambda h: importance[h])
        self.options = options
        self.on_step = on_step or (lambda search: None)
        self.expanded = 0
        self.evaluations = 0
        self.best: Node | None = None  # deepest exact node, lowest g among equals

    # --- heuristic -------------------------------------------------------------------------

    def rho(self, node: Node) -> float:
        base = sum(self.imp[h] for h in node.removed)
        if not node.removed or base <= 1e-12:
            return 1.0
        return min(max(node.g / base, 1.0), self.options.scale_cap)

    def h(self, node: Node, goal: int) -> float:
        left = goal - len(node.removed)
        cheapest = [self.imp[x] for x in self.order if x not in node.removed][:left]
        return self.rho(node) * sum(cheapest)

    def children(self, node: Node) -> list[int]:
        return [x for x in self.order if x not in node.removed][: self.options.branching]

    # --- exact evaluation -------------------------------------------------------------------

    def evaluate(self, nodes: list[Node]) -> None:
        """Score nodes exactly, grouped by parent so the parent's layer outputs are reused."""
        by_parent: dict[int, list[Node]] = {}
        for node in nodes:
            by_parent.setdefault(id(node.parent), []).append(node)
        for group in by_parent.values():
            parent = group[0].parent.removed if group[0].parent is not None else None
            losses = self.scorer.score([n.removed for n in group], parent)
            for node, loss in zip(group, losses):
                node.g, node.exact = loss - self.base_loss, True
                self.evaluations += 1
                self._note(node)
        self.on_step(self)

    def _note(self, node: Node) -> None:
        best = self.best
        if best is None or (len(node.removed), -node.g) > (len(best.removed), -best.g):
            self.best = node

    # --- search -----------------------------------------------------------------------------

    def run(self, root: Node, goal: int) -> Node:
        """Best-first search from `root` (exact) to a node with `goal` heads removed."""
        tie = itertools.count()
        queue = [(self.h(root, goal) + root.g, next(tie), root)]
        seen = {root.removed}
        self.best = root
        while queue:
            if self.evaluations >= self.options.max_evaluations:
                return self.complete_greedily(self.best, goal)
            _, _, node = heapq.heappop(queue)
            if not node.exact:
                batch = [node]
                while queue and len(batch) < self.options.masks_per_pass and not queue[0][2].exact:
                    batch.append(heapq.heappop(queue)[2])
                self.evaluate(batch)
                for n in batch:
                    heapq.heappush(queue, (n.g + self.h(n, goal), next(tie), n))
                continue
            if len(node.removed) >= goal:
                return node
            self.expanded += 1
            rho = self.rho(node)
            for x in self.children(node):
                removed = node.removed | {x}
                if removed in seen:
                    continue
                seen.add(removed)
                child = Node(removed, node.g + rho * self.imp[x], False, node)
                heapq.heappush(queue, (child.g + self.h(child, goal), next(tie), child))
        return self.complete_greedily(self.best, goal)

    def greedy_step(self, node: Node) -> Node:
        kids = [Node(node.removed | {x}, 0.0, False, node) for x in self.children(node)]
        self.evaluate(kids)
        return min(kids, key=lambda n: n.g)

    def complete_greedily(self, node: Node, goal: int) -> Node:
        while len(node.removed) < goal:
            node = self.greedy_step(node)
        return node

    def extend_within(self, node: Node, tolerance: float, limit: int) -> Node:
        """Deepest prefix of node's path within tolerance, then greedy extension while it holds."""
        while node.parent is not None and node.g > tolerance:
            node = node.parent
        while len(node.removed) < limit:
            nxt = self.greedy_step(node)
            if nxt.g > tolerance:
                break
            node = nxt
        return node


def _goal(target: HeadsTarget, total: int, importance: list[float]) -> int:
    if target.heads_count is not None:
        if target.heads_count > total:
            raise BadInputError(f"heads_count {target.heads_count} is more than the {total} heads the model has")
        return target.heads_count
    if target.heads_fraction is not None:
        return max(1, round(target.heads_fraction * total))
    # tolerance mode: the depth the (additive) importances say fits within the tolerance
    budget, depth = target.max_loss_increase, 0
    for value in sorted(max(v, 0.0) for v in importance):
        if budget - value < 0:
            break
        budget -= value
        depth += 1
    return max(depth, 1)


@register("heads.a_star", options=AStarOptions, target=HeadsTarget,
          smoke={"target": {"heads_count": 3}, "options": {"calibration_samples": 4, "max_length": 16, "max_evaluations": 10}})
def a_star(ctx: Context, target: HeadsTarget, options: AStarOptions) -> StepResult:
    """Remove attention heads with A* search on the calibration objective."""
    started = time.perf_counter()
    batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
    scorer = MaskScorer(ctx.model, batches, ctx.objective, options.masks_per_pass, options.cache_size)
    total = scorer.num_heads
    if total == 0:
        raise BadInputError("the model has no attention heads left to prune")
    root = Node(frozenset(), 0.0, True, None)

    with progress() as bar:
        task = bar.add_task("head importance", total=total, status="")
        base_loss = scorer.score([root.removed])[0]
        importance: list[float] = []
        singles = [frozenset({h}) for h in range(total)]
        for i in range(0, total, options.masks_per_pass):
            chunk = singles[i : i + options.masks_per_pass]
            importance += [loss - base_loss for loss in scorer.score(chunk, root.removed)]
            bar.update(task, completed=len(importance))

        goal = _goal(target, total, importance)
        search_task = bar.add_task("A* search", total=options.max_evaluations, status="")

        def show(search: AStar) -> None:
            best = search.best
            bar.update(
                search_task,
                completed=min(search.evaluations, options.max_evaluations),
                status=f"expanded {search.expanded}, best depth {len(best.removed)}/{goal}, cost {best.g:.4g}",
            )

        search = AStar(scorer, importance, base_loss, options, on_step=show)
        found = search.run(root, goal)
        if target.max_loss_increase is not None:
            found = search.extend_within(found, target.max_loss_increase, total)

    removed = found.removed
    keep: dict[int, list[int]] = {}
    for layer, count in enumerate(scorer.counts):
        gone = {scorer.position[h] for h in removed if scorer.layer_of[h] == layer}
        if gone:
            keep[layer] = [h for h in range(count) if h not in gone]
    removed_per_layer = [sum(1 for h in removed if scorer.layer_of[h] == layer) for layer in range(len(scorer.counts))]
    stats = {
        "heads_before": total,
        "heads_removed": len(removed),
        "removed_per_layer": removed_per_layer,
        "objective": ctx.objective.name,
        "calibration_samples": sum(scorer.sizes),
        "base_loss": round(base_loss, 6),
        "loss_increase": round(found.g, 6),
        "nodes_expanded": search.expanded,
        "search_evaluations": search.evaluations,
        "importance_evaluations": total,
        **scorer.stats(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return StepResult(plan=[KeepHeads(keep)] if keep else [], stats=stats)
