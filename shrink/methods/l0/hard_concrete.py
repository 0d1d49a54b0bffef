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
Optionally (kind `hidden`, CoFi's z_hidden) one more gate vector, one gate per block of hidden dims
shared by all layers, multiplies the residual stream wherever it is written (the embeddings' output
and every LayerNorm's: shrink.methods.stream.gate_stream).

Expected size (CoFi style, Xia et al. 2022): every cost kind (parameters, FLOPs, latency) is linear
in the number of live units per layer, plus a fixed cost per live sub-layer:

    cost = base + sum_i [ att_fixed * P(attention i alive) + per_head   * E[heads of i]
                        + ffn_fixed * P(FFN i alive)       + per_neuron * E[neurons of i] ]
    E[heads of i]          = P(A_i) * sum_j P(h_ij)
    P(attention i alive)   = P(A_i) * (1 - prod_j (1 - P(h_ij)))     (gates treated as independent)

and likewise for the FFN, a block counting for its neurons. With hidden gates, the part of a head's
and a neuron's cost that scales with the stream's width (LinearCost.per_head_hidden,
per_neuron_hidden) is multiplied by the expected kept fraction of hidden dims
r = sum_b P(z_b) * dims_b / H (independent of the unit gates, so E[unit * r] = E[unit] * E[r]):

    per_head(r) = per_head - per_head_hidden * (1 - r)      per_neuron(r) likewise

base, att_fixed and ffn_fixed do not scale (a conservative approximation: the embeddings, the task
head and each sub-layer's LayerNorm shrink too). The fraction cost / cost(everything kept) is what
the target names; the coefficients of each kind are in shrink.methods.l0.method (params,
FLOPs) and shrink.methods.l0.latency_table (measured latency).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BETA = 2 / 3
LEFT, RIGHT = -0.1, 1.1
KINDS = ("heads", "ffn", "attention_layers", "ffn_layers", "hidden")
DEFAULT_KINDS = KINDS[:4]  # `hidden` is opt-in: it changes the model's width (and, through the LayerNorms, its function)


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
    per_head_hidden: float = 0.0  # the part of per_head proportional to the stream's width H
    per_neuron_hidden: float = 0.0  # the part of per_neuron proportional to H

    def per_unit(self, hidden_fraction=1.0):
        """(per_head, per_neuron) with this fraction of the hidden dims kept (a float or a tensor)."""
        return (self.per_head - self.per_head_hidden * (1 - hidden_fraction),
                self.per_neuron - self.per_neuron_hidden * (1 - hidden_fraction))

    def of_counts(self, heads: list[float], neurons: list[float], hidden_fraction: float = 1.0) -> float:
        """Cost of a model with these live heads and neurons per layer (0 = sub-layer gone) and this
        fraction of the hidden dims kept."""
        per_head, per_neuron = self.per_unit(hidden_fraction)
        total = self.base
        for h, n in zip(heads, neurons):
            total += (self.att_fixed if h > 0 else 0.0) + per_head * h
            total += (self.ffn_fixed if n > 0 else 0.0) + per_neuron * n
        return total


class L0Gates(nn.Module):
    """The log_alpha of every gate of a model with the given heads and FFN widths per layer.

    Only the kinds listed in `kinds` are learned; the others stay fixed at 1. Layers with no heads
    (or no FFN neurons) left get no gates there. The kind `hidden` needs `hidden` (the stream's width):
    one gate per `hidden_block` dims, shared by all layers."""

    def __init__(self, heads: list[int], ffn: list[int], kinds=DEFAULT_KINDS, ffn_block: int = 1, init: float = 2.0,
                 hidden: int = 0, hidden_block: int = 1):
        super().__init__()
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown gate kinds {sorted(unknown)}")
        if "hidden" in kinds and hidden < 1:
            raise ValueError("the hidden kind needs the hidden size")
        self.kinds = tuple(kinds)
        self.heads, self.ffn, self.ffn_block = list(heads), list(ffn), ffn_block
        self.hidden, self.hidden_block = hidden, hidden_block
        hidden_blocks = math.ceil(hidden / hidden_block) if "hidden" in kinds else 0
        self.hidden_sizes = torch.tensor([min(hidden_block, hidden - b * hidden_block) for b in range(hidden_blocks)], dtype=torch.float32)
        self.hidden_alpha = nn.Parameter(torch.full((hidden_blocks,), float(init)), requires_grad=hidden_blocks > 0)
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

    def hidden_values(self, mode: str = "sample") -> torch.Tensor | None:
        """The hidden gates expanded to dims (hidden,), or None when the hidden dims are not gated."""
        if not self.hidden_alpha.numel():
            return None
        return self._value(self.hidden_alpha, mode).repeat_interleave(self.hidden_block)[: self.hidden]

    # --- expected size -------------------------------------------------------------------------

    def _p(self, alpha: nn.Parameter) -> torch.Tensor:
        return keep_probability(alpha) if alpha.requires_grad else torch.ones_like(alpha)

    def expected_hidden_fraction(self) -> torch.Tensor:
        """E[kept hidden dims] / H (1 when the hidden dims are not gated)."""
        if not self.hidden_alpha.numel():
            return torch.tensor(1.0)
        return (keep_probability(self.hidden_alpha) * self.hidden_sizes).sum() / self.hidden

    def expected_cost(self, cost: LinearCost) -> torch.Tensor:
        """The expected cost under the gate distribution (differentiable in log_alpha)."""
        total = torch.tensor(float(cost.base))
        per_head, per_neuron = cost.per_unit(self.expected_hidden_fraction())
        for i in range(self.num_layers):
            if self.heads[i]:
                p_layer, p_heads = self._p(self.att_alpha[i])[0], self._p(self.head_alpha[i])
                alive = p_layer * (1 - torch.prod(1 - p_heads))
                total = total + cost.att_fixed * alive + per_head * p_layer * p_heads.sum()
            if self.ffn[i]:
                p_layer, p_blocks = self._p(self.ffn_layer_alpha[i])[0], self._p(self.ffn_alpha[i])
                alive = p_layer * (1 - torch.prod(1 - p_blocks))
                neurons = (p_blocks * self.block_sizes[i].to(p_blocks.device)).sum()
                total = total + cost.ffn_fixed * alive + per_neuron * p_layer * neurons
        return total

    def full_cost(self, cost: LinearCost) -> float:
        return cost.of_counts(self.heads, self.ffn)

    # --- the final, deterministic gates ------------------------------------------------------------

    @torch.no_grad()
    def final_values(self, cost: LinearCost, target_fraction: float
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None, dict]:
        """Deterministic gates that respect the target: the test-time values (a unit whose value is 0
        is removed), then, while the cost is still above the target (the expected size is only
        approached; the independence approximation), the live head, FFN block or hidden block with
        the smallest log_alpha is removed too (one hidden block always stays: if the test-time values
        close them all, the one with the largest log_alpha is kept at 1). Returns head gates and FFN
        block gates per layer (sub-layer gates folded in), the hidden gates per dim (None when not
        gated) and stats: how many units of each kind this correction removed (or kept) beyond
        the test-time values."""
        heads = [h * a for h, a in zip(*(self._values(g) for g in (self.head_alpha, self.att_alpha)))]
        blocks = [f * a for f, a in zip(*(self._values(g) for g in (self.ffn_alpha, self.ffn_layer_alpha)))]
        hidden = self._value(self.hidden_alpha, "deterministic").detach().clone()  # (hidden blocks,)
        kept_beyond = 0
        if hidden.numel() and not (hidden > 0).any():
            hidden[int(self.hidden_alpha.argmax())] = 1.0
            kept_beyond = 1
        full = self.full_cost(cost)

        def hidden_fraction() -> float:
            return float(((hidden > 0).float() * self.hidden_sizes).sum()) / self.hidden if hidden.numel() else 1.0

        def fraction() -> float:
            return cost.of_counts(
                [int((h > 0).sum()) for h in heads],
                [float(((b > 0).float() * s).sum()) for b, s in zip(blocks, self.block_sizes)],
                hidden_fraction(),
            ) / full

        at_test_values = fraction()
        forced = {"heads": 0, "ffn_blocks": 0, "hidden_blocks": 0}
        candidates = sorted(
            [(float(a[j]), "heads", i, j) for i, a in enumerate(self.head_alpha) if a.requires_grad for j in range(a.numel())]
            + [(float(a[j]), "ffn_blocks", i, j) for i, a in enumerate(self.ffn_alpha) if a.requires_grad for j in range(a.numel())]
            + [(float(a), "hidden_blocks", 0, j) for j, a in enumerate(self.hidden_alpha)]
        )
        for _, kind, i, j in candidates:
            if fraction() <= target_fraction + 1e-9:
                break
            group = {"heads": heads, "ffn_blocks": blocks, "hidden_blocks": [hidden]}[kind]
            if group[i][j] > 0 and not (kind == "hidden_blocks" and int((hidden > 0).sum()) == 1):
                group[i][j] = 0.0
                forced[kind] += 1
        stats = {"fraction_at_test_values": round(at_test_values, 4),
                 "units_removed_to_meet_target": sum(forced.values()),
                 "removed_to_meet_target": forced,
                 "units_kept_beyond_gates": kept_beyond}
        values = hidden.repeat_interleave(self.hidden_block)[: self.hidden] if hidden.numel() else None
        return heads, blocks, values, stats

    def _values(self, group: nn.ParameterList) -> list[torch.Tensor]:
        return [self._value(a, "deterministic").detach().clone() for a in group]

    def expand(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """FFN block gates -> per-neuron gates."""
        return [b.repeat_interleave(self.ffn_block)[:n] for b, n in zip(blocks, self.ffn)]
