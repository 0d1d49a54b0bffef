"""Weight penalties as options of the training loop: one registry, each penalty a few lines.

A recipe's `distill` (or `weights.magnitude`) step takes a list of them:

    options:
      penalties:
        - {name: group_lasso, weight: 0.01, groups: heads}
        - {name: rpp, weight: 1.0e-4}

Two kinds. A *loss* penalty is a differentiable term added to the objective of every micro-batch
(Hooks.extra_loss); a *proximal* penalty is applied to the weights after every optimizer step
(Hooks.after_step), the way proximal gradient methods handle a non-smooth term. Every penalty acts on
the encoder's attention and FFN matrices (ENCODER_MODULES; plain Linears: a factorized LowRankLinear
has no rows to group and is skipped), grouped as

    weights   every entry on its own (unstructured)
    rows      each output row of each matrix, and each input column (TPrune prunes both)
    heads     a head's Q, K, V rows and its output-projection columns together
    neurons   an FFN neuron's input row and output column together

Penalties are normalised (means, not sums) so that one `weight` scale fits models of any size.

    l1                 mean |w|                                           (the lasso)
    group_lasso        mean over groups of ||w_g||_2                      (Yuan & Lin; whole heads / neurons to 0)
    hoyer_square       per matrix (or layer), (sum_g ||w_g||)^2 / sum_g ||w_g||^2, averaged
                       (Hoyer-square: scale-invariant, pushes groups to exact zero; TPrune, Mao et al.)
    aligned_cosine     mean over matrices of 1 - cos(W, W_0)               (stay aligned with the original)
    aligned_frobenius  mean over matrices of ||W - W_0||^2 / ||W_0||^2
    rpp                proximal reweighted L1 (RPP, Guo et al. 2019): after each step
                       w <- sign(w) max(|w| - lr_t * weight * a, 0), a = 1 / (|w_r| + eps), the
                       weights w_r re-read every `reweight_every` steps; no term in the loss, so
                       the optimizer's adaptive state never sees it
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUPS = ("weights", "rows", "heads", "neurons")
EPS = 1e-8


class PenaltyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["l1", "group_lasso", "hoyer_square", "aligned_cosine", "aligned_frobenius", "rpp"]
    weight: float = Field(gt=0, description="the penalty's factor (loss penalties) or the proximal step's lambda (rpp)")
    groups: Literal["weights", "rows", "heads", "neurons"] | None = Field(
        None, description="what is penalised as one unit; default: weights (l1, rpp, aligned_*), heads (group_lasso), rows (hoyer_square)")
    reweight_every: int = Field(10, ge=1, description="rpp: optimizer steps between re-reads of the reweighting weights")
    eps: float = Field(1e-3, gt=0, description="rpp: a = 1 / (|w| + eps), so near-zero weights are pushed hardest but finitely")

    @model_validator(mode="after")
    def groups_fit(self):
        default = {"group_lasso": "heads", "hoyer_square": "rows"}.get(self.name, "weights")
        self.groups = self.groups or default
        if self.name in ("l1", "rpp", "aligned_cosine", "aligned_frobenius") and self.groups != "weights":
            raise ValueError(f"{self.name} penalises single weights (groups: weights)")
        if self.name in ("group_lasso", "hoyer_square") and self.groups == "weights":
            raise ValueError(f"{self.name} needs groups (rows, heads or neurons); for single weights use l1")
        return self


# --- the units: matrices and groups of their entries --------------------------------------------


@dataclass
class Layer:
    """One layer's plain Linear weights by ENCODER_MODULES name (absent: removed or factorized)."""

    weights: dict[str, torch.Tensor]
    head_size: int


def layers_of_model(model) -> list[Layer]:
    from shrink.surgery import runtime
    from shrink.surgery.ops import ATTENTION_MODULES, ENCODER_MODULES, adapter_of, head_size, layers_of

    adapter, size, found = adapter_of(model), head_size(model), []
    for layer in layers_of(model):
        weights = {}
        for name in ENCODER_MODULES:
            present = runtime.layer_has_attention if name in ATTENTION_MODULES else runtime.layer_has_ffn
            if present(adapter, layer):  # not removed whole
                module = runtime.get_module(layer, getattr(adapter, name))
                if isinstance(module, torch.nn.Linear):
                    weights[name] = module.weight
        found.append(Layer(weights, size))
    return found


def group_norms(layers: list[Layer], groups: str) -> list[torch.Tensor]:
    """Per matrix (rows) or per layer (heads, neurons): the L2 norm of each group, differentiable."""
    sets = []
    for layer in layers:
        w = layer.weights
        if groups == "rows":
            for matrix in w.values():
                sets.append(torch.sqrt((matrix ** 2).sum(1) + EPS))  # output rows
                sets.append(torch.sqrt((matrix ** 2).sum(0) + EPS))  # input columns
        elif groups == "heads" and all(k in w for k in ("query", "key", "value", "attention_out")):
            size = layer.head_size
            squares = sum((w[k] ** 2).view(-1, size, w[k].shape[1]).sum((1, 2)) for k in ("query", "key", "value"))
            out = w["attention_out"]
            squares = squares + (out ** 2).view(out.shape[0], -1, size).sum((0, 2))
            sets.append(torch.sqrt(squares + EPS))
        elif groups == "neurons" and all(k in w for k in ("ffn_in", "ffn_out")):
            sets.append(torch.sqrt((w["ffn_in"] ** 2).sum(1) + (w["ffn_out"] ** 2).sum(0) + EPS))
    return sets


def matrices(layers: list[Layer]) -> list[torch.Tensor]:
    return [m for layer in layers for m in layer.weights.values()]


# --- the registry ----------------------------------------------------------------------------------

LossFn = Callable[[list[Layer], PenaltyOptions, list[torch.Tensor]], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def loss_penalty(name: str):
    def add(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn
    return add


@loss_penalty("l1")
def l1(layers, spec, originals):
    ms = matrices(layers)
    return sum(m.abs().sum() for m in ms) / sum(m.numel() for m in ms)


@loss_penalty("group_lasso")
def group_lasso(layers, spec, originals):
    norms = torch.cat(group_norms(layers, spec.groups))
    return norms.mean()


@loss_penalty("hoyer_square")
def hoyer_square(layers, spec, originals):
    sets = group_norms(layers, spec.groups)
    return torch.stack([n.sum() ** 2 / (n ** 2).sum() for n in sets]).mean()


@loss_penalty("aligned_cosine")
def aligned_cosine(layers, spec, originals):
    ms = matrices(layers)
    return torch.stack([1 - torch.nn.functional.cosine_similarity(m.flatten(), o.flatten(), dim=0) for m, o in zip(ms, originals)]).mean()


@loss_penalty("aligned_frobenius")
def aligned_frobenius(layers, spec, originals):
    ms = matrices(layers)
    return torch.stack([((m - o) ** 2).sum() / (o ** 2).sum().clamp_min(EPS) for m, o in zip(ms, originals)]).mean()


@torch.no_grad()
def reweighted_soft_threshold(weight: torch.Tensor, step: float, reweight: torch.Tensor) -> None:
    """The proximal operator of step * sum_i reweight_i |w_i|, in place: the argmin over x of
    1/2 ||x - w||^2 + step * sum_i reweight_i |x_i|."""
    weight.copy_(weight.sign() * (weight.abs() - step * reweight).clamp_min(0))


# --- wiring into the training loop -----------------------------------------------------------------


class Penalties:
    """The recipe's penalties on one model: `extra_loss(step)` for Hooks.extra_loss (None when no
    loss penalty) and `after_step(done, total)` for the proximal ones; `summary()` for the report."""

    def __init__(self, model, specs: list[PenaltyOptions], lr: float, warmup: float):
        self.specs, self.lr, self.warmup = list(specs), lr, warmup
        self.layers = layers_of_model(model)
        if not matrices(self.layers):
            from shrink.errors import BadInputError

            raise BadInputError("penalties: the model has no plain attention or FFN matrix to penalise",
                                hint="put factorizing recipes (lowrank.svd) after the penalised training")
        self.originals = [m.detach().clone() for m in matrices(self.layers)] if any(s.name.startswith("aligned") for s in specs) else []
        self.reweights: dict[int, list[torch.Tensor]] = {}
        self.last: dict[str, float] = {}

    @property
    def extra_loss(self) -> Callable[[int], torch.Tensor] | None:
        losses = [s for s in self.specs if s.name in LOSSES]
        if not losses:
            return None

        def total(step: int) -> torch.Tensor:
            terms = []
            for spec in losses:
                value = LOSSES[spec.name](self.layers, spec, self.originals)
                self.last[spec.name] = float(value.detach())
                terms.append(spec.weight * value)
            return sum(terms)

        return total

    def after_step(self, done: int, total: int) -> None:
        from shrink.train.loop import WarmupDecay

        lr_now = self.lr * WarmupDecay(total, self.warmup)(done - 1)  # the step just taken
        for index, spec in enumerate(self.specs):
            if spec.name != "rpp":
                continue
            ms = matrices(self.layers)
            if index not in self.reweights or (done - 1) % spec.reweight_every == 0:
                self.reweights[index] = [1 / (m.detach().abs() + spec.eps) for m in ms]
            for m, a in zip(ms, self.reweights[index]):
                reweighted_soft_threshold(m, lr_now * spec.weight, a)

    def summary(self) -> dict:
        ms = matrices(self.layers)
        zeros = sum(int((m == 0).sum()) for m in ms)
        return {"penalties": [s.model_dump() for s in self.specs], "last_values": {k: round(v, 6) for k, v in self.last.items()},
                "zero_fraction": round(zeros / sum(m.numel() for m in ms), 5)}
