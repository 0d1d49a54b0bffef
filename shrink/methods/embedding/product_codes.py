"""Product codes for embedding rows: frequency-weighted k-means on each of M slices of the dimensions.

Product quantization is the special case of compositional codes where codebook m is zero outside
the m-th slice of the dimensions, so a token's embedding (the sum of its M codebook rows) is the
concatenation of M slice centroids. That structure lets each codebook row store dim/M floats instead
of dim, so K = 256 values per code (a full uint8) fit the size budget, and it can be learned by
plain weighted Lloyd iterations, one independent k-means per slice, instead of a Gumbel-softmax
autoencoder. On all-MiniLM-L6-v2 it reconstructs the rows far better per byte (README, Embedding
compression) because it spends every bit of each uint8 code.
"""

from __future__ import annotations

import torch

from shrink.console import progress as progress_bar
from shrink.surgery.runtime import code_dtype, code_width


def assign(slices: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Nearest centroid of every slice: slices [M, V, s], centroids [M, K, s] -> codes [M, V]."""
    M, V, _ = slices.shape
    codes = torch.empty(M, V, dtype=torch.long)
    squared = (centroids * centroids).sum(-1).unsqueeze(1)  # [M, 1, K]
    for start in range(0, V, chunk):
        x = slices[:, start : start + chunk]
        codes[:, start : start + chunk] = (squared - 2 * x @ centroids.transpose(1, 2)).argmin(-1)
    return codes


def weighted_means(slices: torch.Tensor, codes: torch.Tensor, weights: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of the slices assigned to each centroid, and each centroid's total weight."""
    M, V, s = slices.shape
    sums = torch.zeros(M, K, s, dtype=slices.dtype).scatter_add_(1, codes.unsqueeze(-1).expand(M, V, s), slices * weights.view(1, V, 1))
    mass = torch.zeros(M, K, dtype=slices.dtype).scatter_add_(1, codes, weights.expand(M, V).contiguous())
    return sums / mass.clamp_min(1e-30).unsqueeze(-1), mass


def learn_product_codes(table: torch.Tensor, weights: torch.Tensor, M: int, K: int, *, iterations: int = 25, seed: int = 0,
                        progress: bool = True, label: str = "product codes") -> tuple[dict[str, torch.Tensor], dict]:
    """Codes [V, M] and codebooks [M*K, dim/M] (runtime.CodeEmbedding with product=True) minimising the
    row-weighted squared reconstruction error of `table` [V, dim] by weighted k-means per slice.
    Centroids start at distinct rows drawn with probability proportional to their weight; a centroid
    that loses all its rows restarts at the worst-reconstructed heavy row, so none stays unused."""

    table = table.detach().float().cpu()
    weights = weights.detach().float().cpu()
    V, dim = table.shape
    width = code_width(dim, M, product=True)
    K_used = min(K, V)  # fewer rows than K (tiny vocabularies): the surplus centroids stay unused
    slices = table.view(V, M, width).transpose(0, 1).contiguous()  # [M, V, width]
    generator = torch.Generator().manual_seed(seed)
    start = torch.multinomial(weights / weights.sum(), K_used, replacement=False, generator=generator)
    centroids = slices[:, start].clone()
    with progress_bar() as bar:
        task = bar.add_task(label, total=iterations, status="", visible=progress)
        for _ in range(iterations):
            codes = assign(slices, centroids)
            centroids, mass = weighted_means(slices, codes, weights, K_used)
            for m, k in (mass <= 0).nonzero().tolist():  # empty cluster: move it to the costliest row of its slice
                cost = weights * ((slices[m] - centroids[m, codes[m]]) ** 2).sum(-1)
                centroids[m, k] = slices[m, int(cost.argmax())]
            bar.update(task, advance=1)
    codes = assign(slices, centroids)
    codebooks = torch.zeros(M, K, width)
    codebooks[:, :K_used] = centroids
    recon = centroids[torch.arange(M).unsqueeze(1), codes].transpose(0, 1).reshape(V, dim)
    state = {"codes": codes.T.contiguous().to(code_dtype(K)), "codebooks": codebooks.reshape(M * K, width).contiguous()}
    return state, {"reconstruction": recon}
