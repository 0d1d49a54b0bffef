"""Word embeddings as a distilled nonlinear decomposition (Lioutas et al. 2020, "Improving Word
Embedding Factorization for Compression Using Distilled Nonlinear Neural Decomposition").

Every token becomes a rank-r code (a vocab x r float table) and its embedding is decoded by one small
MLP shared by all tokens: down(act(up(code))) + skip(code), up r -> width, down width -> hidden, and
skip a linear path (runtime.NonlinearEmbedding). The table costs vocab x r floats and the decoder
about width x (r + hidden), so at a given byte budget the rank is a little lower than a linear
factorization's (runtime.FactorizedEmbedding, vocab x r codes times an r x hidden projection).

Learning (`learn_nonlinear`), in two stages:
1. Reconstruction, on the embedding rows alone. Rows weigh 1 + frequency_weight x log(1 + count) as in
   embedding.codes. The codes and the skip path start at the row-weighted rank-r SVD (the best linear
   decomposition for those weights), the MLP at zero output (down is zero), so training starts from
   the linear optimum and the nonlinear part can only add to it; then Adam on the weighted squared
   error of the whole table (every code row is a free parameter, so each step sees all of them).
2. Distillation through the encoder (`distill_embeddings`): the new module stands in for the word
   embeddings and only its parameters train (scope `embedding`; `decoder` keeps the codes fixed,
   `all` trains the encoder too) against the original model's outputs, with the project's one loop
   (shrink.train.loop.train) and the distill step's objective (shrink.train.objectives). The loss is
   what the encoder does with the rows, not how close the rows are, which is the paper's point.

The target is the size of the new embeddings: `bytes`, or `bytes_fraction` of the original table; the
rank is the largest that fits (no target: options.rank).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field, model_validator

from shrink.console import progress as progress_bar
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.embedding.codes import (
    TokenWeightOptions,
    calibration_token_weights,
    replaceable_word_embeddings,
    weighted_error,
)
from shrink.surgery import ReplaceEmbedding, adapter_of
from shrink.surgery.runtime import NonlinearEmbedding, base_model, set_module
from shrink.train.loop import train
from shrink.train.objectives import make_objective

LOSSES = Literal["auto", "task", "logits_kl", "hidden_mse", "embedding_cosine", "embedding_relation", "teacher"]


class NonlinearTarget(Strict):
    bytes: int | None = Field(None, ge=1, description="size of the new word embeddings (code table and decoder) in bytes")
    bytes_fraction: float | None = Field(None, gt=0, lt=1, description="size of the new word embeddings as a fraction of the original table's")

    @model_validator(mode="after")
    def at_most_one(self):
        if self.bytes is not None and self.bytes_fraction is not None:
            raise ValueError("give at most one of bytes, bytes_fraction (none: options.rank decides)")
        return self


class NonlinearOptions(TokenWeightOptions):
    rank: int = Field(64, ge=1, description="code size per token, used when no target is given (a target sets the rank)")
    width: int | None = Field(None, ge=1, description="hidden units of the decoder MLP; default the hidden size")
    activation: Literal["gelu", "relu", "tanh"] = Field("gelu", description="the decoder's nonlinearity")
    residual: bool = Field(True, description="add a linear path skip(code), started at the weighted SVD, to the MLP's output")
    reconstruct_steps: int = Field(300, ge=0, description="Adam steps on the rows' weighted squared error (0: the weighted SVD alone)")
    batch_size: int | None = Field(None, ge=1, description="rows per reconstruction step; default the whole table")
    lr: float = Field(1e-3, gt=0, description="reconstruction learning rate")
    distill: bool = Field(True, description="then distil through the encoder against the original")
    distill_steps: int = Field(200, ge=1, description="distillation optimizer steps (batches of the calibration split)")
    distill_lr: float = Field(3e-4, gt=0, description="distillation learning rate (only the new embeddings train by default)")
    distill_scope: Literal["embedding", "decoder", "all"] = Field(
        "embedding", description="what distillation trains: embedding (codes and decoder), decoder (codes fixed), all (the encoder too)")
    loss: list[LOSSES] = Field(default_factory=lambda: ["auto"], description="distillation objective (the distill step's)")


def embedding_bytes(vocab: int, dim: int, rank: int, width: int, residual: bool, element_size: int = 4) -> int:
    """Bytes of a NonlinearEmbedding's parameters: codes, up (+bias), down (+bias), skip."""
    floats = vocab * rank + rank * width + width + width * dim + dim + (rank * dim if residual else 0)
    return floats * element_size


def rank_for_bytes(budget: int, vocab: int, dim: int, width: int | None, residual: bool, element_size: int = 4) -> int:
    """The largest rank (at most the hidden size) whose NonlinearEmbedding fits `budget` bytes;
    width None is the hidden size."""
    fits = [r for r in range(1, min(vocab, dim) + 1) if embedding_bytes(vocab, dim, r, width or dim, residual, element_size) <= budget]
    if not fits:
        need = embedding_bytes(vocab, dim, 1, width or dim, residual, element_size)
        raise BadInputError(f"embedding.nonlinear: {budget:,} bytes do not fit even rank 1 ({need:,} bytes with a decoder of width {width or dim})",
                            hint="raise the target or lower options.width")
    return fits[-1]


def weighted_svd(table: torch.Tensor, weights: torch.Tensor, rank: int) -> torch.Tensor:
    """The top `rank` right singular vectors [rank, dim] of the row-weighted table sqrt(w) * E: the
    projection onto them is the rank-r linear decomposition with the least weighted squared error."""
    x = table.double() * weights.double().sqrt().unsqueeze(1)
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues of the dim x dim Gram
    return vectors[:, -rank:].flip(1).T.float().contiguous()


def learn_nonlinear(
    table: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    *,
    width: int | None = None,
    activation: str = "gelu",
    residual: bool = True,
    steps: int = 300,
    batch_size: int | None = None,
    lr: float = 1e-3,
    padding_idx: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[NonlinearEmbedding, dict]:
    """A NonlinearEmbedding reconstructing `table` [V, dim] (rows weighted by `weights`): weighted-SVD
    start, then Adam. Returns (module, stats with the weighted relative errors of the start, i.e. the
    linear decomposition, and of the result)."""

    table = table.detach().float().cpu()
    weights = weights.detach().float().cpu()
    V, dim = table.shape
    torch.manual_seed(seed)
    module = NonlinearEmbedding(V, dim, rank, width or dim, activation, residual, padding_idx)
    basis = weighted_svd(table, weights, rank)  # [rank, dim]
    codes = table @ basis.T
    scale = codes.pow(2).mean().sqrt().clamp_min(1e-12)  # unit-RMS codes suit the MLP's default init
    with torch.no_grad():
        module.codes.weight.copy_(codes / scale)
        module.down.weight.zero_()
        module.down.bias.zero_()
        if residual:
            module.skip.weight.copy_(basis.T * scale)
    stats = {"error_linear_start": round(_error(module, table, weights), 5) if residual else None}

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, 10 * (1 - s / max(1, steps))))
    losses = []
    full = batch_size is None or batch_size >= V
    with progress_bar() as bar:
        task = bar.add_task("nonlinear embedding", total=steps, status="", visible=progress)
        for step in range(steps):
            index = None if full else torch.randint(0, V, (batch_size,), generator=generator)
            rows, w = (table, weights) if full else (table[index], weights[index])
            recon = module.decode(module.codes.weight if full else module.codes.weight[index])
            loss = (w * ((recon - rows) ** 2).sum(-1)).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % 25 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, status=f"loss {losses[-1]:.4f}")
    module.eval()
    stats["error"] = round(_error(module, table, weights), 5)
    stats["error_unweighted"] = round(_error(module, table, torch.ones(V)), 5)
    if losses:
        stats["loss_first"], stats["loss_last"] = round(losses[0], 5), round(losses[-1], 5)
    return module, stats


@torch.no_grad()
def _error(module: NonlinearEmbedding, table: torch.Tensor, weights: torch.Tensor) -> float:
    recon = torch.cat([module(torch.arange(s, min(s + 8192, table.shape[0]))) for s in range(0, table.shape[0], 8192)])
    return weighted_error(table, recon, weights)


@contextmanager
def standing_in(model, module: torch.nn.Module):
    """`module` in place of the model's word embeddings for the duration (no manifest op: the method
    returns the real change as a plan), the original put back afterwards whatever happens. A module
    that already is the model's word embeddings (installed by a plan) simply stays."""
    root, path = base_model(model), adapter_of(model).word_embeddings
    original = root.get_submodule(path)
    if original is module:
        yield
        return
    set_module(root, path, module.to(next(original.parameters()).device))
    try:
        yield
    finally:
        set_module(root, path, original)


def distill_embeddings(ctx: Context, module: torch.nn.Module, *, steps: int, lr: float, scope: str = "embedding",
                       loss=("auto",), label: str = "distill embeddings") -> dict:
    """Train `module` (new word embeddings of any kind, standing in for the model's or already installed)
    against ctx.teacher on ctx.calibration with train(); `scope` embedding trains the module's
    parameters, decoder all of them but a `codes` table, all the encoder's too (the others stay frozen:
    no gradient is computed for them). The module keeps what it learned; returns the loop's history,
    trimmed. The benchmark gives the linear and code baselines the same distillation through it."""

    if not ctx.calibration:
        raise BadInputError("embedding.nonlinear: distillation needs calibration batches", hint="set distill: false")
    objective = make_objective(ctx.model, ctx.teacher, ctx.has_labels, tuple(loss), training=True)
    with standing_in(ctx.model, module):
        if scope == "all":
            params = [p for p in ctx.model.parameters() if p.requires_grad]
        else:
            params = [p for name, p in module.named_parameters() if scope == "embedding" or not name.startswith("codes")]
        trainable = {id(p) for p in params}
        frozen = [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in trainable]
        for p in frozen:
            p.requires_grad_(False)
        try:
            history = train(ctx.model, list(ctx.calibration), objective, epochs=math.ceil(steps / len(ctx.calibration)), max_steps=steps,
                            lr=lr, params=params, dropout=False, seed=ctx.seed, label=label)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        ctx.model.eval()
    losses = history["losses"]
    out = {"steps": history["steps"], "scope": scope, "objective": objective.name,
           "loss_first": losses[0] if losses else None, "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 6) if losses else None}
    if "budget" in history:
        out["budget"] = history["budget"]
    return out


@register("embedding.nonlinear", options=NonlinearOptions, target=NonlinearTarget, trains=True,
          smoke={"target": {"bytes_fraction": 0.9}, "options": {"width": 8, "reconstruct_steps": 5, "distill_steps": 2}})
def embedding_nonlinear(ctx: Context, target: NonlinearTarget, options: NonlinearOptions) -> StepResult:
    """Replace the word embeddings by low-rank codes and a small nonlinear decoder, reconstructed then distilled (Lioutas et al.)."""

    old = replaceable_word_embeddings(ctx.model)
    V, dim, size = old.num_embeddings, old.embedding_dim, old.weight.element_size()
    bytes_before = V * dim * size
    budget = target.bytes if target.bytes is not None else (int(target.bytes_fraction * bytes_before) if target.bytes_fraction else None)
    rank = rank_for_bytes(budget, V, dim, options.width, options.residual, size) if budget is not None else options.rank
    if not 1 <= rank <= min(V, dim):
        raise BadInputError(f"embedding.nonlinear: rank {rank} out of range (1..{min(V, dim)})")
    counts, weights = calibration_token_weights(ctx, options, V)
    module, stats = learn_nonlinear(old.weight, weights, rank, width=options.width, activation=options.activation,
                                    residual=options.residual, steps=options.reconstruct_steps, batch_size=options.batch_size,
                                    lr=options.lr, padding_idx=old.padding_idx, seed=ctx.seed)
    module = module.to(dtype=old.weight.dtype)
    if options.distill:
        stats["distill"] = distill_embeddings(ctx, module, steps=options.distill_steps, lr=options.distill_lr,
                                              scope=options.distill_scope, loss=options.loss, label="embedding.nonlinear distill")
        stats["error_after_distill"] = round(_error(module.cpu().float(), old.weight.detach().float().cpu(), weights), 5)
    spec = {"rank": rank, "width": module.width, "activation": options.activation, "residual": options.residual}
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    stats |= {"rank": rank, "width": module.width, "tokens_seen": int((counts > 0).sum()), "bytes_before": bytes_before,
              "bytes_after": sum(t.numel() * t.element_size() for t in state.values()), "bytes_budget": budget}
    return StepResult(plan=[ReplaceEmbedding("nonlinear", spec, state)], stats=stats)
