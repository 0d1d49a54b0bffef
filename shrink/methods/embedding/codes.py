"""Word embeddings as compositional codes (Shu & Nakayama 2018), learned to reconstruct the original.

Every token becomes M integers in [0, K); its embedding is the sum of the chosen row of each of M
codebooks (K x code_dim), optionally mapped to the hidden size by a Linear (runtime.CodeEmbedding).
all-MiniLM-L6-v2's 30522 x 384 float table (46.9 MB) becomes 30522 x 32 bytes of codes plus 32 x 16
x 384 floats of codebooks (1.8 MB) with the defaults.

Learning (`learn_codes`), on the embedding rows alone (no forward pass through the encoder):
1. Token weights: each row's reconstruction error counts 1 + frequency_weight * log(1 + n), n the
   token's count in the calibration data (the whole split by default, not only the --max-samples used
   for training: counting only tokenizes), so frequent tokens matter more and unseen ones still count.
2. A Gumbel-softmax autoencoder: encoder e -> tanh MLP -> M x K logits; a (straight-through) Gumbel
   sample per codebook picks one row of each; the decoder sums them. Trained on minibatches of rows
   with Adam while the temperature anneals, so the samples harden towards the argmax used at the end.
3. The codes are the argmax of the logits (no noise). With codes fixed, the codebooks are refit by
   weighted least squares (exact: the decoder is linear in them), which closes the gap the soft
   training leaves. With a Linear map, the least-squares table is truncated to code_dim by SVD.

Product layout (`layout: product`, the embedding-codes recipe's choice): codebook m covers only the
m-th slice of the dimensions, so the codebook rows are concatenated rather than summed and each stores
dim/M floats; codes are learned by frequency-weighted k-means per slice (methods/product_codes.py).
That lets K = 256 (a full uint8 per code) fit the budget: on MiniLM, 32 product codes reconstruct the
frequent tokens far better than 32 additive codes of 16 values (README, Embedding compression).

Adaptive variant (after Kim et al. 2020; `frequent_tokens: N`): the N most frequent tokens of the
calibration data get `extra_codebooks` more codes, into codebooks of their own, learned the same way on
what the base codes leave unexplained for those tokens (runtime.TieredCodeEmbedding). Frequent tokens
are most of any text, so their extra capacity is where it counts, at N x extra_codebooks bytes.

The encoder then adapts to the new embeddings in the recipe's `distill` step (codes stay fixed; the
codebooks and the encoder train).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from shrink.console import progress as progress_bar
from shrink.errors import BadInputError
from shrink.methods.base import Context, StepResult, Strict, register
from shrink.methods.embedding.product_codes import learn_product_codes
from shrink.surgery import ReplaceEmbedding, word_embeddings_of
from shrink.surgery.runtime import code_dtype, lookup_codes


class TokenWeightOptions(Strict):
    """How embedding rows are weighted by their tokens' frequency (shared with embedding.binary)."""

    frequency_weight: float = Field(1.0, ge=0, description="row weight 1 + this x log(1 + count in the calibration data); 0: all rows equal")
    count_samples: int | None = Field(None, ge=1, description="calibration examples whose tokens are counted; default the whole "
                                      "calibration split (counting only tokenizes, so it can see more than --max-samples)")
    max_length: int = Field(128, ge=8, description="tokens per counted example")


class CodesOptions(TokenWeightOptions):
    layout: Literal["additive", "product"] = Field(
        "additive", description="additive: summed full-width codebook rows, Gumbel-softmax autoencoder; product: "
        "each codebook a slice of the dimensions (concatenated), weighted k-means; codebooks must divide the hidden size")
    codebooks: int = Field(32, ge=1, le=256, description="M: codes per token (one per codebook)")
    codebook_size: int = Field(16, ge=2, le=32768, description="K: vectors per codebook (K <= 256 stores codes as uint8)")
    code_dim: int | None = Field(None, ge=1, description="codebook vector size; smaller than the hidden size needs linear: true")
    linear: bool = Field(False, description="map the summed codebook vectors to the hidden size with a learned Linear")
    steps: int = Field(3000, ge=1, description="autoencoder optimizer steps (additive layout)")
    iterations: int = Field(25, ge=1, description="k-means iterations (product layout)")
    batch_size: int = Field(512, ge=1, description="embedding rows per step")
    lr: float = Field(3e-3, gt=0)
    temperature: float = Field(1.0, gt=0, description="Gumbel-softmax temperature at the start")
    final_temperature: float = Field(0.1, gt=0, description="temperature at the end (annealed geometrically)")
    refit: bool = Field(True, description="refit the codebooks by weighted least squares once the codes are fixed")
    frequent_tokens: int = Field(0, ge=0, description="adaptive variant: this many most frequent tokens of the calibration data get extra codes")
    extra_codebooks: int = Field(16, ge=1, le=256, description="adaptive variant: extra codes (into codebooks of their own) per frequent token")

    @model_validator(mode="after")
    def _check(self):
        if self.layout == "product" and (self.linear or self.code_dim is not None):
            raise ValueError("layout: product has no linear map and no code_dim (each codebook row is a 1/codebooks slice)")
        if self.code_dim is not None and not self.linear:
            raise ValueError("code_dim needs linear: true (without it the codebooks have the hidden size)")
        if self.frequent_tokens and self.linear:
            raise ValueError("frequent_tokens (the adaptive variant) does not combine with linear: true")
        return self


# --- token weights -------------------------------------------------------------------------------


def token_counts(batches: list[dict], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs (real tokens only) in tokenized batches."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in batches:
        ids = batch["input_ids"].detach().cpu()
        mask = batch.get("attention_mask")
        ids = ids[mask.cpu().bool()] if mask is not None else ids.reshape(-1)
        counts += torch.bincount(ids.reshape(-1), minlength=vocab_size)[:vocab_size].double()
    return counts


def row_weights(counts: torch.Tensor, frequency_weight: float) -> torch.Tensor:
    """1 + frequency_weight * log(1 + count): never zero, growing slowly with frequency."""
    return (1 + frequency_weight * torch.log1p(counts)).float()


def calibration_token_weights(ctx: Context, options: TokenWeightOptions, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts, row weights) from the calibration split: the more text is counted, the better the
    frequent tokens are known, so by default all of it, not only the examples training uses."""
    counts = token_counts(ctx.calibration_batches(options.count_samples, options.max_length, 64), vocab_size)
    return counts, row_weights(counts, options.frequency_weight)


# --- the autoencoder -------------------------------------------------------------------------------


class CodeLearner(torch.nn.Module):
    """Encoder (MLP -> M x K logits) and decoder (summed codebook rows, optional Linear)."""

    def __init__(self, dim: int, M: int, K: int, code_dim: int, linear: bool):
        super().__init__()
        self.M, self.K = M, K
        hidden = max(64, M * K // 2)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, M * K))
        self.codebooks = torch.nn.Parameter(torch.randn(M * K, code_dim) * (1 / math.sqrt(M * code_dim)))
        self.proj = torch.nn.Linear(code_dim, dim) if linear else None

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.encoder(rows).view(-1, self.M, self.K)

    def decode(self, onehots: torch.Tensor) -> torch.Tensor:
        """[B, M, K] (soft or hard) -> [B, dim]."""
        out = onehots.reshape(onehots.shape[0], -1) @ self.codebooks
        return self.proj(out) if self.proj is not None else out


def onehot_codes(codes: torch.Tensor, K: int) -> torch.Tensor:
    return F.one_hot(codes.long(), K).float()


def weighted_error(table: torch.Tensor, recon: torch.Tensor, weights: torch.Tensor) -> float:
    """Weighted relative squared error: sum w ||e' - e||^2 / sum w ||e||^2."""
    num = (weights * ((recon - table) ** 2).sum(-1)).sum()
    return float(num / (weights * (table**2).sum(-1)).sum())


def refit_codebooks(table: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor, K: int, chunk: int = 4096) -> torch.Tensor:
    """argmin_C sum_i w_i ||sum_m C[m*K + codes[i, m]] - e_i||^2, in float64, with a tiny ridge
    (the one-hot design is rank deficient: each codebook's columns sum to one)."""
    M = codes.shape[1]
    offsets = torch.arange(M) * K
    gram = torch.zeros(M * K, M * K, dtype=torch.float64)
    rhs = torch.zeros(M * K, table.shape[1], dtype=torch.float64)
    for start in range(0, table.shape[0], chunk):
        rows = codes[start : start + chunk].long() + offsets
        design = torch.zeros(rows.shape[0], M * K, dtype=torch.float64).scatter_(1, rows, 1.0)
        w = weights[start : start + chunk].double().unsqueeze(1)
        gram += design.T @ (w * design)
        rhs += design.T @ (w * table[start : start + chunk].double())
    ridge = 1e-6 * gram.diagonal().mean() + 1e-12
    solution = torch.linalg.solve(gram + ridge * torch.eye(M * K, dtype=torch.float64), rhs)
    return solution.float()


def fit_rows(table, weights, parameters, reconstruct, label: str, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool) -> list[float]:
    """Adam on seeded random minibatches of embedding rows, minimising the row-weighted squared error of
    `reconstruct(rows, step) -> (reconstruction, status note)`; flat lr, decayed over the last 10% of
    steps. Shared by the code and binary autoencoders. Returns the loss of every step."""

    V = table.shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, 10 * (1 - s / steps)))
    losses = []
    with progress_bar() as bar:
        task = bar.add_task(label, total=steps, status="", visible=progress)
        for step in range(steps):
            index = torch.randint(0, V, (min(batch_size, V),), generator=generator)
            rows, w = table[index], weights[index]
            recon, note = reconstruct(rows, step)
            loss = (w * ((recon - rows) ** 2).sum(-1)).sum() / w.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                bar.update(task, completed=step + 1, status=f"loss {sum(losses[-50:]) / len(losses[-50:]):.4f} {note}".strip())
    return losses


def learn_codes(
    table: torch.Tensor,
    weights: torch.Tensor,
    M: int,
    K: int,
    *,
    code_dim: int | None = None,
    linear: bool = False,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 3e-3,
    temperature: float = 1.0,
    final_temperature: float = 0.1,
    refit: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Codes and decoder for every row of `table` [V, dim]. Returns (state for runtime.CodeEmbedding,
    stats with the weighted relative reconstruction error)."""

    table = table.detach().float().cpu()
    weights = weights.float().cpu()
    V, dim = table.shape
    code_dim = code_dim or dim
    torch.manual_seed(seed)
    learner = CodeLearner(dim, M, K, code_dim, linear)

    def reconstruct(rows, step):
        tau = temperature * (final_temperature / temperature) ** (step / max(1, steps - 1))
        # straight-through: the forward pass uses one code per codebook, as the result will
        sample = F.gumbel_softmax(learner.logits(rows), tau=tau, hard=True, dim=-1)
        return learner.decode(sample), f"tau {tau:.2f}"

    losses = fit_rows(table, weights, list(learner.parameters()), reconstruct, "embedding codes",
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)

    with torch.no_grad():
        codes = torch.cat([learner.logits(table[s : s + 8192]).argmax(-1) for s in range(0, V, 8192)])
        recon = torch.cat([learner.decode(onehot_codes(codes[s : s + 8192], K)) for s in range(0, V, 8192)])
        stats = {"error_autoencoder": round(weighted_error(table, recon, weights), 5)}
        codebooks = learner.codebooks.detach().clone()
        proj = learner.proj
        state_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone()} if proj is not None else {}
        if refit:
            full = refit_codebooks(table, codes, weights, K)  # [M*K, dim]
            if linear:  # rank-code_dim truncation of the least-squares table: codebooks @ proj.weight^T
                u, s, vh = torch.linalg.svd(full.double(), full_matrices=False)
                codebooks = (u[:, :code_dim] * s[:code_dim]).float()
                state_proj = {"proj.weight": vh[:code_dim].T.float().contiguous(), "proj.bias": torch.zeros(dim)}
            else:
                codebooks = full
            recon = _decode_state(codes, codebooks, state_proj, K)
        stats["error"] = round(weighted_error(table, recon, weights), 5)
        stats["error_unweighted"] = round(weighted_error(table, recon, torch.ones(V)), 5)
        stats["codes_used"] = _used(codes, K)
    state = {"codes": codes.to(code_dtype(K)), "codebooks": codebooks.contiguous(), **state_proj}
    stats["loss_first"], stats["loss_last"] = round(losses[0], 5), round(sum(losses[-50:]) / len(losses[-50:]), 5)
    return state, stats


def _used(codes: torch.Tensor, K: int) -> float:
    """Mean fraction of each codebook's K rows that some token uses (collapse shows as a low value)."""
    return round(sum(codes[:, m].unique().numel() for m in range(codes.shape[1])) / (K * codes.shape[1]), 3)


def _decode_state(codes, codebooks, state_proj, K, product: bool = False) -> torch.Tensor:
    out = lookup_codes(codes, codebooks, K, product)
    if state_proj:
        out = out @ state_proj["proj.weight"].T + state_proj["proj.bias"]
    return out


def learn_product(table, weights, M: int, K: int, *, iterations: int = 25, seed: int = 0, progress: bool = True) -> tuple[dict, dict]:
    """Product codes (methods/product_codes.py) with the same stats as learn_codes."""

    state, extra = learn_product_codes(table, weights, M, K, iterations=iterations, seed=seed, progress=progress)
    table = table.detach().float().cpu()
    stats = {"error": round(weighted_error(table, extra["reconstruction"], weights), 5),
             "error_unweighted": round(weighted_error(table, extra["reconstruction"], torch.ones(table.shape[0])), 5),
             "codes_used": _used(state["codes"], K)}
    return state, stats


def add_frequent_tier(table, weights, counts, state: dict, frequent_tokens: int, extra_codebooks: int, K: int,
                      product: bool = False, **learn) -> tuple[dict, dict]:
    """The adaptive variant: the most frequent tokens get `extra_codebooks` more codes, learned on what the
    base codes leave unexplained (the residual) of those tokens alone. `learn` are the options of
    learn_codes (additive) or learn_product (product). Returns the TieredCodeEmbedding state and stats."""

    table = table.detach().float().cpu()
    seen = int((counts > 0).sum())
    n = min(frequent_tokens, seen)
    frequent = torch.argsort(counts, descending=True, stable=True)[:n]
    base = _decode_state(state["codes"], state["codebooks"], {}, K, product)
    learner = learn_product if product else learn_codes
    extra, stats = learner(table[frequent] - base[frequent], weights[frequent], extra_codebooks, K, **learn)
    extra_row = torch.full((table.shape[0],), n, dtype=torch.long)
    extra_row[frequent] = torch.arange(n)
    padding_row = torch.zeros(1, extra_codebooks, dtype=extra["codes"].dtype)
    tiered = {
        **state,
        "extra_row": extra_row.to(code_dtype(n + 1)),
        "extra_codes": torch.cat([extra["codes"], padding_row]),
        "extra_books": extra["codebooks"],
    }
    recon = base.clone()
    recon[frequent] += _decode_state(extra["codes"], extra["codebooks"], {}, K, product)
    stats = {"frequent_tokens": n, "frequent_error_before": round(weighted_error(table[frequent], base[frequent], weights[frequent]), 5),
             "frequent_error_after": round(weighted_error(table[frequent], recon[frequent], weights[frequent]), 5),
             "error": round(weighted_error(table, recon, weights), 5)}
    return tiered, stats


def replaceable_word_embeddings(model) -> torch.nn.Embedding:
    """The model's word-embedding table; an error when an earlier step already replaced it."""

    old = word_embeddings_of(model)
    if not isinstance(old, torch.nn.Embedding):
        raise BadInputError(f"word embeddings are already replaced ({type(old).__name__})", hint="use one embedding recipe per model")
    return old


@register("embedding.codes", options=CodesOptions,
          smoke={"options": {"layout": "product", "codebooks": 4, "codebook_size": 4, "iterations": 2}})
def embedding_codes(ctx: Context, target, options: CodesOptions) -> StepResult:
    """Replace the word embeddings by compositional codes (M codes of K values per token) learned to reconstruct them."""

    old = replaceable_word_embeddings(ctx.model)
    dim = old.embedding_dim
    if options.code_dim is not None and options.code_dim > dim:
        raise BadInputError(f"embedding.codes: code_dim {options.code_dim} is larger than the embedding size {dim}")
    product = options.layout == "product"
    if product:
        for m in (options.codebooks, *([options.extra_codebooks] if options.frequent_tokens else [])):
            if dim % m:
                raise BadInputError(f"embedding.codes: layout product needs codebooks that divide the hidden size {dim}; {m} does not")
    counts, weights = calibration_token_weights(ctx, options, old.num_embeddings)
    spec = {"codebooks": options.codebooks, "codebook_size": options.codebook_size, "layout": options.layout}
    if product:
        learn = {"iterations": options.iterations}
        state, stats = learn_product(old.weight, weights, options.codebooks, options.codebook_size, seed=ctx.seed, **learn)
    else:
        learn = {"steps": options.steps, "batch_size": options.batch_size, "lr": options.lr, "temperature": options.temperature,
                 "final_temperature": options.final_temperature, "refit": options.refit}
        state, stats = learn_codes(old.weight, weights, options.codebooks, options.codebook_size, code_dim=options.code_dim,
                                   linear=options.linear, seed=ctx.seed, **learn)
        spec |= {"code_dim": options.code_dim or dim, "linear": options.linear}
    kind = "codes"
    if options.frequent_tokens and int((counts > 0).sum()):
        state, tier_stats = add_frequent_tier(old.weight, weights, counts, state, options.frequent_tokens, options.extra_codebooks,
                                              options.codebook_size, product, seed=ctx.seed + 1, **learn)
        stats["adaptive"] = tier_stats
        kind = "tiered_codes"
        spec = {"codebooks": options.codebooks, "codebook_size": options.codebook_size, "layout": options.layout,
                "extra_codebooks": options.extra_codebooks, "frequent_tokens": tier_stats["frequent_tokens"]}
    stats["tokens_seen"] = int((counts > 0).sum())
    stats["bytes_before"] = old.weight.numel() * old.weight.element_size()
    stats["bytes_after"] = sum(t.numel() * t.element_size() for t in state.values())
    return StepResult(plan=[ReplaceEmbedding(kind, spec, state)], stats=stats)
