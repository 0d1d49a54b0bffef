"""Word embeddings as binary codes with a linear decoder (after Tissier et al. 2019).

Every token becomes `bits` binary digits, stored 8 to a byte (runtime.BinaryEmbedding); its embedding
is decoder(bits), one Linear(bits, hidden). 256 bits per token for all-MiniLM-L6-v2: 30522 x 32 bytes
plus a 256 x 384 decoder (1.4 MB instead of 46.9 MB).

Learning, on the embedding rows alone: an encoder (Linear -> tanh MLP -> bits logits) and the linear
decoder are trained as an autoencoder on minibatches of rows, with a straight-through sign (the
forward pass uses the hard bits, the backward pass the sigmoid's gradient), rows weighted by token
frequency as in embedding.codes. Then the bits are fixed (logit > 0) and the decoder is refit by
weighted least squares, which is exact for a linear decoder.
"""

from __future__ import annotations

import torch
from pydantic import Field

from shrink.methods.base import Context, StepResult, register
from shrink.methods.embedding.codes import (
    TokenWeightOptions,
    calibration_token_weights,
    fit_rows,
    replaceable_word_embeddings,
    weighted_error,
)
from shrink.surgery import ReplaceEmbedding
from shrink.surgery.runtime import byte_bits_table


class BinaryOptions(TokenWeightOptions):
    bits: int = Field(256, ge=8, le=4096, multiple_of=8, description="binary digits per token (a multiple of 8)")
    steps: int = Field(3000, ge=1, description="autoencoder optimizer steps")
    batch_size: int = Field(512, ge=1, description="embedding rows per step")
    lr: float = Field(3e-3, gt=0)
    refit: bool = Field(True, description="refit the decoder by weighted least squares once the bits are fixed")


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[V, n] 0/1 -> [V, n/8] uint8, most significant bit first (runtime.byte_bits_table's order)."""
    V, n = bits.shape
    weights = 2 ** torch.arange(7, -1, -1)
    return (bits.long().view(V, n // 8, 8) * weights).sum(-1).to(torch.uint8)


def refit_decoder(table: torch.Tensor, bits: torch.Tensor, weights: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares for table ~ bits @ W^T + b: returns (W [dim, n], b [dim])."""
    n = bits.shape[1]
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    rhs = torch.zeros(n + 1, table.shape[1], dtype=torch.float64)
    for start in range(0, table.shape[0], chunk):
        design = torch.cat([bits[start : start + chunk].double(), torch.ones(min(chunk, table.shape[0] - start), 1, dtype=torch.float64)], 1)
        w = weights[start : start + chunk].double().unsqueeze(1)
        gram += design.T @ (w * design)
        rhs += design.T @ (w * table[start : start + chunk].double())
    ridge = 1e-6 * gram.diagonal().mean() + 1e-12
    solution = torch.linalg.solve(gram + ridge * torch.eye(n + 1, dtype=torch.float64), rhs).float()
    return solution[:n].T.contiguous(), solution[n].contiguous()


def learn_binary(
    table: torch.Tensor,
    weights: torch.Tensor,
    bits: int,
    *,
    steps: int = 3000,
    batch_size: int = 512,
    lr: float = 3e-3,
    refit: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Bits and decoder for every row of `table` [V, dim]: (state for runtime.BinaryEmbedding, stats)."""

    table = table.detach().float().cpu()
    weights = weights.float().cpu()
    V, dim = table.shape
    torch.manual_seed(seed)
    encoder = torch.nn.Sequential(torch.nn.Linear(dim, 2 * bits), torch.nn.Tanh(), torch.nn.Linear(2 * bits, bits))
    decoder = torch.nn.Linear(bits, dim)

    def reconstruct(rows, step):
        soft = torch.sigmoid(encoder(rows))
        hard = (soft > 0.5).float()
        code = hard + soft - soft.detach()  # straight-through: hard bits forward, sigmoid gradient back
        return decoder(code), ""

    losses = fit_rows(table, weights, [*encoder.parameters(), *decoder.parameters()], reconstruct, "embedding bits",
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress)

    with torch.no_grad():
        code = torch.cat([(encoder(table[s : s + 8192]) > 0).float() for s in range(0, V, 8192)])
        stats = {"error_autoencoder": round(weighted_error(table, decoder(code), weights), 5)}
        weight, bias = (refit_decoder(table, code, weights) if refit else (decoder.weight.detach().clone(), decoder.bias.detach().clone()))
        recon = code @ weight.T + bias
        stats["error"] = round(weighted_error(table, recon, weights), 5)
        stats["error_unweighted"] = round(weighted_error(table, recon, torch.ones(V)), 5)
        stats["bits_on"] = round(float(code.mean()), 3)
    state = {"packed": pack_bits(code), "bit_table": byte_bits_table(), "decoder.weight": weight, "decoder.bias": bias}
    stats["loss_first"], stats["loss_last"] = round(losses[0], 5), round(sum(losses[-50:]) / len(losses[-50:]), 5)
    return state, stats


@register("embedding.binary", options=BinaryOptions,
          smoke={"options": {"bits": 16, "steps": 5}})
def embedding_binary(ctx: Context, target, options: BinaryOptions) -> StepResult:
    """Replace the word embeddings by bit-packed binary codes with a linear decoder, learned to reconstruct them."""
    old = replaceable_word_embeddings(ctx.model)
    counts, weights = calibration_token_weights(ctx, options, old.num_embeddings)
    state, stats = learn_binary(
        old.weight, weights, options.bits, steps=options.steps,
        batch_size=options.batch_size, lr=options.lr, refit=options.refit, seed=ctx.seed,
    )
    stats["tokens_seen"] = int((counts > 0).sum())
    stats["bytes_before"] = old.weight.numel() * old.weight.element_size()
    stats["bytes_after"] = sum(t.numel() * t.element_size() for t in state.values())
    return StepResult(plan=[ReplaceEmbedding("binary", {"bits": options.bits}, state)], stats=stats)
