"""Low-rank factorization of attention and FFN matrices by truncated SVD, with one global budget
(after LadaBERT, Mao et al. 2020, and the data-aware SVD line of work: FWSVD, ASVD, SVD-LLM).

Each chosen Linear W (out x in) becomes second @ first (out x r, r x in): a LowRankLinear through
shrink.surgery.factorize_linear. The factors minimise the error on the calibration inputs x, not on
W alone, according to `weighting`:

    none     plain SVD of W                        min ||W - W'||_F
    diag     SVD of W diag(s), s_j = sqrt(E[x_j^2]) min E sum_j over input features of the weighted error
    whiten   SVD of W L, L L^T = E[x x^T]          min E ||(W - W') x||^2 exactly (Eckart-Young on W L)

and the weighting is undone on `first`, so the layer still takes the raw input. With `center` (the
default) the statistics are of x - E[x]: the mean input's output W E[x] is a constant that the bias
absorbs exactly (b' = b + (W - W') E[x]), so no rank is spent on it and the spectra compare what
varies. (Post-GELU FFN inputs have a large mean; uncentered, it dominates their energy.)

Ranks come from one global budget (a fraction of the ORIGINAL encoder's layer parameters, or of its
layer FLOPs at a sequence length). The singular values of every matrix are cut into blocks of
`rank_multiple`; a block's score is the share of that matrix's (weighted) energy it holds divided by
what it costs (block size x (in + out) parameters). Blocks are taken best score first while the
budget allows, each matrix's blocks in order, so the rank goes where a parameter buys the most
energy. A matrix whose rank reaches in*out/(in+out) would cost as much as it does dense: it stays as
it is (its cost is capped there), so no matrix ever gets more expensive. A matrix already factorized
is re-factorized to a rank no higher than its own (iterated compress -> recover).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from pydantic import Field, model_validator
from torch import nn

from shrink.arch import model_inputs
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.models.flops import model_flops
from shrink.surgery import LowRank, encoder_linears, layers_of
from shrink.surgery.ops import ENCODER_MODULES as MODULES
from shrink.surgery.runtime import kind_of


class LowRankTarget(Strict):
    params_fraction: float | None = Field(None, gt=0, lt=1, description="encoder layer parameters to keep, as a fraction of the original's")
    flops_fraction: float | None = Field(None, gt=0, lt=1, description="encoder layer FLOPs to keep (at options.seq_length), as a fraction of the original's")

    @model_validator(mode="after")
    def exactly_one(self):
        if (self.params_fraction is None) == (self.flops_fraction is None):
            raise ValueError("give exactly one of params_fraction, flops_fraction")
        return self


class LowRankOptions(Strict):
    weighting: str = Field("whiten", pattern="^(none|diag|whiten)$", description="how calibration inputs weight the SVD")
    modules: list[str] = Field(default_factory=lambda: list(MODULES), description=f"which matrices of each layer: {', '.join(MODULES)}")
    rank_multiple: int = Field(8, ge=1, description="ranks are multiples of this (fast kernels like round sizes)")
    min_rank: int | None = Field(None, ge=1, description="smallest rank any factorized matrix gets (default: rank_multiple)")
    calibration_samples: int = Field(256, ge=1, description="examples the input statistics come from")
    max_length: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    seq_length: int = Field(128, ge=1, description="sequence length a flops_fraction target is measured at")
    damping: float = Field(1e-2, ge=0, description="whiten: added to the input covariance, times its mean diagonal")
    center: bool = Field(True, description="weight by the input covariance and fold the mean into the bias")

    @model_validator(mode="after")
    def known_modules(self):
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty list of {', '.join(MODULES)}; unknown: {unknown}")
        return self


@dataclass
class Matrix:
    """One candidate: where it is, its shapes, the weighted spectrum, and what it costs now."""

    path: str  # from the base model, current layer positions
    module: nn.Module
    weight: torch.Tensor  # out x in, float64
    bias_free_cost: int  # weight parameters now (in*out, or r*(in+out) if already factorized)
    max_rank: int  # full rank, or the current rank of a LowRankLinear
    sigma2: torch.Tensor | None = None  # squared singular values of the weighted matrix
    basis: tuple | None = None  # (u, s, vh, unweight) to build factors from
    mean: torch.Tensor | None = None  # E[x] when centered: the bias absorbs (W - W') E[x]

    @property
    def per_rank(self) -> int:
        return self.module.in_features + self.module.out_features

    def cost(self, rank: int) -> int:
        """Parameters at `rank`, capped at what it costs now (it is then left as it is)."""
        return min(rank * self.per_rank, self.bias_free_cost)


def candidates(model: nn.Module, modules: list[str]) -> list[Matrix]:
    found = []
    for path, module in encoder_linears(model, modules):
        kind = kind_of(module)
        cost = sum(w.numel() for w in kind.weight_matrices(module).values())  # r*(in+out) once factorized
        found.append(Matrix(path, module, kind.dense_weight(module).double(), cost, kind.max_rank(module)))
    return found


# --- input statistics ---------------------------------------------------------------------------


@torch.no_grad()
def input_statistics(model: nn.Module, matrices: list[Matrix], batches: list[dict], full: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per matrix over real (unpadded) tokens: (E[x x^T], or only its diagonal E[x^2] unless `full`; E[x])."""

    sums, means = [None] * len(matrices), [None] * len(matrices)
    count = [0]
    mask_now: list[torch.Tensor] = []

    def hook_for(i):
        def hook(module, args):
            x = args[0][mask_now[0]].float()  # [tokens, in]; float32 per batch, summed in float64
            part = (x.T @ x if full else (x * x).sum(dim=0)).double()
            sums[i] = part if sums[i] is None else sums[i] + part
            total = x.sum(dim=0).double()
            means[i] = total if means[i] is None else means[i] + total

        return hook

    handles = [m.module.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(matrices)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask_now[:] = [batch["attention_mask"].bool()]
            count[0] += int(mask_now[0].sum())
            model(**model_inputs(model, batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    n = max(count[0], 1)
    return [(s / n, m / n) for s, m in zip(sums, means)]


def centered(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Covariance (or variances, for a diagonal) from E[x x^T] and E[x]."""
    if second_moment.dim() == 1:
        return (second_moment - mean**2).clamp(min=0)
    return second_moment - torch.outer(mean, mean)


def weighted_spectrum(matrix: Matrix, stats: torch.Tensor | None, weighting: str, damping: float) -> None:
    """SVD of the weighted matrix; keeps what factors() needs to unweight `first`."""
    w = matrix.weight
    if weighting == "none" or stats is None:
        scale, unweight = w, None
    elif weighting == "diag":
        s = stats.clamp(min=0).sqrt()
        s = s + 1e-6 * float(s.max().clamp(min=1e-12))  # features never seen must not divide by zero
        scale, unweight = w * s[None, :], ("diag", s)
    else:
        c = stats + damping * float(stats.diagonal().mean().clamp(min=1e-12)) * torch.eye(len(stats), dtype=stats.dtype, device=stats.device)
        chol = torch.linalg.cholesky(c)
        scale, unweight = w @ chol, ("whiten", chol)
    u, s, vh = torch.linalg.svd(scale, full_matrices=False)
    matrix.sigma2 = (s[: matrix.max_rank] ** 2).cpu()
    matrix.basis = (u, s, vh, unweight)


def factors(matrix: Matrix, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first r x in, second out x r) of the best rank-r approximation under the weighting."""
    u, s, vh, unweight = matrix.basis
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    if unweight is not None and unweight[0] == "diag":
        first = first / unweight[1][None, :]
    elif unweight is not None:  # first' = first L^{-1}: solve first' L = first, i.e. L^T first'^T = first^T
        first = torch.linalg.solve_triangular(unweight[1].T, first.T, upper=True).T
    second = u[:, :rank] * root[None, :]
    kind = kind_of(matrix.module)
    dtype = kind.input_weight(matrix.module).dtype
    if matrix.mean is None:
        return first.to(dtype), second.to(dtype)
    bias = kind.output_bias(matrix.module).detach().double() + (matrix.weight - second @ first) @ matrix.mean
    return first.to(dtype), second.to(dtype), bias.to(dtype)


# --- budget and allocation ----------------------------------------------------------------------


def layer_params(model: nn.Module) -> int:
    return sum(p.numel() for p in layers_of(model).parameters())


def layer_flops(model: nn.Module, seq_length: int) -> int:
    flops = model_flops(model, seq_length)
    return flops["attention"] + flops["ffn"]


def matrix_budget(ctx: Context, matrices: list[Matrix], target: LowRankTarget, options: LowRankOptions) -> tuple[int, dict]:
    """Weight parameters the candidate matrices may have together, and the figures behind it."""
    now = sum(m.bias_free_cost for m in matrices)
    if target.params_fraction is not None:
        original, current = layer_params(ctx.teacher), layer_params(ctx.model)
        budget = target.params_fraction * original - (current - now)
        unit = "params"
    else:
        # Linear FLOPs are 2 x tokens x weight parameters; attention matmuls and untouched matrices are fixed
        tokens = options.seq_length
        original, current = layer_flops(ctx.teacher, tokens), layer_flops(ctx.model, tokens)
        budget = (target.flops_fraction * original - (current - 2 * tokens * now)) / (2 * tokens)
        unit = f"flops at s={tokens}"
    return int(budget), {"unit": unit, "original": original, "before": current}


def allocate(matrices: list[Matrix], budget: int, multiple: int, min_rank: int) -> list[int]:
    """Ranks within `budget` (weight parameters of all candidates), by normalised energy per parameter."""
    ranks = [min(min_rank, m.max_rank) for m in matrices]
    spent = sum(m.cost(r) for m, r in zip(matrices, ranks))
    if spent > budget:
        raise BadInputError(
            f"the target is below what rank {min_rank} for every matrix costs ({spent} > {budget} parameters)",
            hint="raise the target fraction, or lower options.min_rank / rank_multiple",
        )
    blocks = []  # (score, matrix index, rank after the block)
    for i, m in enumerate(matrices):
        total = float(m.sigma2.sum()) or 1.0
        start = ranks[i]
        while start < m.max_rank:
            end = min(m.max_rank, (start // multiple + 1) * multiple)
            share = float(m.sigma2[start:end].sum()) / total
            blocks.append((share / ((end - start) * m.per_rank), i, end))
            start = end
    closed = set()
    for _, i, end in sorted(blocks, key=lambda b: (-b[0], b[1], b[2])):
        if i in closed:  # an earlier block of this matrix did not fit: later ones may not jump it
            continue
        m = matrices[i]
        extra = m.cost(end) - m.cost(ranks[i])
        if spent + extra > budget:
            closed.add(i)
            continue
        ranks[i], spent = end, spent + extra
    return ranks


# --- the method ---------------------------------------------------------------------------------


@register("lowrank.svd", options=LowRankOptions, target=LowRankTarget,
          smoke={"target": {"params_fraction": 0.6}, "options": {"calibration_samples": 4, "max_length": 16, "rank_multiple": 1}})
def lowrank_svd(ctx: Context, target: LowRankTarget, options: LowRankOptions) -> StepResult:
    """Factorize attention/FFN matrices by (activation-weighted) truncated SVD to a global budget."""
    started = time.perf_counter()
    matrices = candidates(ctx.model, options.modules)
    if not matrices:
        raise BadInputError("no attention or FFN matrix left to factorize")
    stats = [None] * len(matrices)
    if options.weighting != "none":
        batches = ctx.calibration_batches(options.calibration_samples, options.max_length, options.batch_size)
        if not batches:
            raise BadInputError("lowrank.svd: no calibration batches for the input statistics")
        moments = input_statistics(ctx.model, matrices, batches, full=options.weighting == "whiten")
        for i, (m, (second_moment, mean)) in enumerate(zip(matrices, moments)):
            has_bias = kind_of(m.module).output_bias(m.module) is not None
            if options.center and has_bias:
                stats[i], m.mean = centered(second_moment, mean), mean
            else:
                stats[i] = second_moment
    for m, s in zip(matrices, stats):
        weighted_spectrum(m, s, options.weighting, options.damping)

    budget, figures = matrix_budget(ctx, matrices, target, options)
    now = sum(m.bias_free_cost for m in matrices)
    min_rank = options.min_rank or options.rank_multiple
    ranks = allocate(matrices, budget, options.rank_multiple, min_rank) if budget < now else [m.max_rank for m in matrices]

    plan, report = [], {}  # each op's factors fit its matrix as it is now
    for m, r in zip(matrices, ranks):
        kept = float(m.sigma2[:r].sum() / m.sigma2.sum().clamp(min=1e-30)) if len(m.sigma2) else 1.0
        changed = m.cost(r) < m.bias_free_cost
        if changed:
            plan.append(LowRank(m.path, r, factors(m, r)))
        report[m.path] = {
            "shape": [m.module.out_features, m.module.in_features],
            "rank": r if changed else None,  # None: left as it was
            "energy_kept": round(kept, 5),
        }
    weights_after = sum(m.cost(r) for m, r in zip(matrices, ranks))
    result_stats = {
        "weighting": options.weighting,
        "centered": options.center and options.weighting != "none",
        "matrices": len(matrices),
        "factorized": len(plan),
        "left_as_is": len(matrices) - len(plan),
        "budget_unit": figures["unit"],
        "matrix_weights_before": now,
        "matrix_weights_after": weights_after,
        "layer_params_original": layer_params(ctx.teacher),
        "layer_params_before": layer_params(ctx.model),
        "layer_params_after": layer_params(ctx.model) - now + weights_after,
        "ranks": report,
        "seconds": round(time.perf_counter() - started, 2),
    }
    result_stats["layer_params_fraction"] = round(result_stats["layer_params_after"] / result_stats["layer_params_original"], 4)
    if budget >= now:
        result_stats["note"] = "already within the target: nothing factorized"
    return StepResult(plan=plan, stats=result_stats)
