"""Hard-concrete L0 gates on heads, FFN neurons (in blocks) and whole sub-layers, and the
expected-size model that a Lagrangian drives to a target (shrink.methods.l0.method trains them).

Hard concrete (Louizos, Welling and Kingma 2018), one learnable log_alpha per unit, beta = 2/3,
stretched to (l, r) = (-0.1, 1.1) and clipped to [0, 1]:

    training     u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
                 z = min(1, max(0, s * (r - l) + l))                    (exact zeros and ones)
    P(z != 0)    = sigmoid(log_alpha - beta * log(-l / r))              (the expected L0, differentiable)
    test time    z = min(1, max(0, sigmoid(log_alpha) * (r - l) + l))

Gates per layer i: one per head (h_ij), one per block of FFN neurons (f_ij), one for the whole
attention sub-layer (A_i) and one for the whole FFN sub-layer (F_i). A sub-layer gate is folded into
its units' gates by multiplying (head j of layer i is scaled by A_i * h_ij), so shrink.surgery.gates' hooks
carry everything: a head gate multiplies its slice of the attention context before the output
projection, an FFN gate multiplies the intermediate activations. A unit is gone when its product is 0.

Expected size (CoFi style, Xia et al. 2022): every cost kind (parameters, FLOPs, latency) is linear
in the number of live units per layer, plus a fixed cost per live sub-layer:

    cost = base + sum_i [ att_fixed * P(attention i alive) + per_head   * E[heads of i]
                        + ffn_fixed * P(FFN i alive)       + per_neuron * E[neurons of i] ]
    E[heads of i]          = P(A_i) * sum_j P(h_ij)
    P(attention i alive)   = P(A_i) * (1 - prod_j (1 - P(h_ij)))     (gates treated as independent)

and likewise for the FFN, a block counting for its neurons. The fraction cost / cost(everything
kept) is what the target names; the coefficients of each kind are in shrink.methods.l0.method (params,
FLOPs) and shrink.methods.l0.latency_table (measured latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BETA = 2 / 3
LEFT, RIGHT = -0.1, 1.1
KINDS = ("heads", "ffn", "attention_layers", "ffn_layers")


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0): the expected L0 norm of each gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


def sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """One draw of the hard-concrete gates (reparameterised, so log_alpha gets gradients)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0, 1)


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    """The test-time gate value."""
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0, 1)


@dataclass
class LinearCost:
    """One cost kind as a linear function of live units (see the module docstring)."""

    name: str
    base: float
    att_fixed: float
    per_head: float
    ffn_fixed: float
    per_neuron: float

    def of_counts(self, heads: list[float], neurons: list[float]) -> float:
        """Cost of a model with these live heads and neurons per layer (0 = sub-layer gone)."""
        total = self.base
        for h, n in zip(heads, neurons):
            total += (self.att_fixed if h > 0 else 0.0) + self.per_head * h
            total += (self.ffn_fixed if n > 0 else 0.0) + self.per_neuron * n
        return total


class L0Gates(nn.Module):
    """The log_alpha of every gate of a model with the given heads and FFN widths per layer.

    Only the kinds listed in `kinds` are learned; the others stay fixed at 1. Layers with no heads
    (or no FFN neurons) left get no gates there."""

    def __init__(self, heads: list[int], ffn: list[int], kinds=KINDS, ffn_block: int = 1, init: float = 2.0):
        super().__init__()
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown gate kinds {sorted(unknown)}")
        self.kinds = tuple(kinds)
        self.heads, self.ffn, self.ffn_block = list(heads), list(ffn), ffn_block
        self.blocks = [math.ceil(n / ffn_block) for n in ffn]
        # neurons in each block (the last block of a layer may be short)
        self.block_sizes = [
            torch.tensor([min(ffn_block, n - b * ffn_block) for b in range(nb)], dtype=torch.float32)
            for n, nb in zip(ffn, self.blocks)
        ]

        def group(sizes: list[int], on: bool) -> nn.ParameterList:
            return nn.ParameterList([nn.Parameter(torch.full((n,), float(init)), requires_grad=on) for n in sizes])

        layers = len(heads)
        self.head_alpha = group(heads, "heads" in kinds)
        self.ffn_alpha = group(self.blocks, "ffn" in kinds)
        self.att_alpha = group([1 if h else 0 for h in heads], "attention_layers" in kinds)
        self.ffn_layer_alpha = group([1 if n else 0 for n in ffn], "ffn_layers" in kinds)
        self.num_layers = layers

    def learned(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad and p.numel()]

    # --- gate values ---------------------------------------------------------------------------

    def _value(self, alpha: nn.Parameter, mode: str) -> torch.Tensor:
        if not alpha.requires_grad:  # a kind that is not pruned: always on
            return torch.ones_like(alpha)
        return sample(alpha) if mode == "sample" else deterministic(alpha)

    def values(self, mode: str = "sample") -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Per layer: head gates (heads,) and FFN gates expanded to neurons (ffn,), sub-layer gates
        folded in; None where the layer has no heads (or FFN) left. mode: "sample" or "deterministic"."""
        heads, ffn = [], []
        for i in range(self.num_layers):
            if self.heads[i]:
                heads.append(self._value(self.head_alpha[i], mode) * self._value(self.att_alpha[i], mode))
            else:
                heads.append(None)
            if self.ffn[i]:
                blocks = self._value(self.ffn_alpha[i], mode) * self._value(self.ffn_layer_alpha[i], mode)
                ffn.append(blocks.repeat_interleave(self.ffn_block)[: self.ffn[i]])
            else:
                ffn.append(None)
        return heads, ffn

    # --- expected size -------------------------------------------------------------------------

    def _p(self, alpha: nn.Parameter) -> torch.Tensor:
        return keep_probability(alpha) if alpha.requires_grad else torch.ones_like(alpha)

    def expected_cost(self, cost: LinearCost) -> torch.Tensor:
        """The expected cost under the gate distribution (differentiable in log_alpha)."""
        total = torch.tensor(float(cost.base))
        for i in range(self.num_layers):
            if self.heads[i]:
                p_layer, p_heads = self._p(self.att_alpha[i])[0], self._p(self.head_alpha[i])
                alive = p_layer * (1 - torch.prod(1 - p_heads))
                total = total + cost.att_fixed * alive + cost.per_head * p_layer * p_heads.sum()
            if self.ffn[i]:
                p_layer, p_blocks = self._p(self.ffn_layer_alpha[i])[0], self._p(self.ffn_alpha[i])
                alive = p_layer * (1 - torch.prod(1 - p_blocks))
                neurons = (p_blocks * self.block_sizes[i].to(p_blocks.device)).sum()
                total = total + cost.ffn_fixed * alive + cost.per_neuron * p_layer * neurons
        return total

    def full_cost(self, cost: LinearCost) -> float:
        return cost.of_counts(self.heads, self.ffn)

    # --- the final, deterministic gates ------------------------------------------------------------

    @torch.no_grad()
    def final_values(self, cost: LinearCost, target_fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        """Deterministic gates that respect the target: the test-time values (a unit whose value is 0
        is removed), then, while the cost is still above the target (the expected size is only
        approached; the independence approximation), the live head or FFN block with the smallest
        log_alpha is removed too. Returns head gates and FFN block gates per layer (sub-layer gates
        folded in) and stats."""
        heads = [h * a for h, a in zip(*(self._values(g) for g in (self.head_alpha, self.att_alpha)))]
        blocks = [f * a for f, a in zip(*(self._values(g) for g in (self.ffn_alpha, self.ffn_layer_alpha)))]
        full = self.full_cost(cost)

        def fraction() -> float:
            return cost.of_counts(
                [int((h > 0).sum()) for h in heads],
                [float(((b > 0).float() * s).sum()) for b, s in zip(blocks, self.block_sizes)],
            ) / full

        at_test_values = fraction()
        forced = 0
        candidates = sorted(
            [(float(a[j]), "h", i, j) for i, a in enumerate(self.head_alpha) if a.requires_grad for j in range(a.numel())]
            + [(float(a[j]), "f", i, j) for i, a in enumerate(self.ffn_alpha) if a.requires_grad for j in range(a.numel())]
        )
        for _, kind, i, j in candidates:
            if fraction() <= target_fraction + 1e-9:
                break
            group = heads if kind == "h" else blocks
            if group[i][j] > 0:
                group[i][j] = 0.0
                forced += 1
        stats = {"fraction_at_test_values": round(at_test_values, 4), "units_removed_to_meet_target": forced}
        return heads, blocks, stats

    def _values(self, group: nn.ParameterList) -> list[torch.Tensor]:
        return [self._value(a, "deterministic").detach().clone() for a in group]

    def expand(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """FFN block gates -> per-neuron gates."""
        return [b.repeat_interleave(self.ffn_block)[:n] for b, n in zip(blocks, self.ffn)]
