"""Sparse weights files: an unstructured-pruned model's mostly-zero matrices stored compactly.

The layout (sparse-bitmask-v1, defined and decoded in shrink.surgery.runtime section 4, which every
checkpoint ships as modeling_shrink.py) is an ordinary safetensors file in which a floating matrix
with at least `min_sparsity` zeros is its nonzeros (1-D, same dtype, row-major) under its own name
plus a numpy.packbits bitmask under `<name>.sparse_mask` (and, only if some of its zeros are -0.0,
their signs under `<name>.sparse_signs`); everything else is stored as it is.

Why a bitmask, not CSR: per weight a bitmask costs 1 bit and CSR (int16 column indices, the narrowest
that fits an encoder matrix) 16 bits per nonzero, so at sparsity s the bitmask wins while
16 (1 - s) > 1, i.e. below 93.75% zeros. Stored bits per fp32 weight:

    sparsity   dense   bitmask (32(1-s) + 1)   CSR int16 (48(1-s), + row pointers)
    50%        32      17.0  (1.9x smaller)     24.0 (1.3x)
    80%        32       7.4  (4.3x)              9.6 (3.3x)
    90%        32       4.2  (7.6x)              4.8 (6.7x)

`encode` builds the file's tensors and metadata; `choose` applies the --sparse-format setting (auto:
sparse only when the whole file gets >= 1.5x smaller). Loading is runtime.read_weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from shrink.errors import BadInputError
from shrink.surgery.runtime import SPARSE_FORMAT, SPARSE_KEY, SPARSE_MASK, SPARSE_SHAPES_KEY, SPARSE_SIGNS

MODES = ("auto", "on", "off")
MIN_SPARSITY = 0.5  # a matrix with fewer zeros stays dense (where a bitmask starts to clearly pay)
AUTO_MIN_RATIO = 1.5  # auto writes sparse only when the whole weights file gets this much smaller


@dataclass
class SparseWeights:
    """What `choose` decided: the tensors and metadata to write, and the sizes behind the decision."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sparse_tensors: int
    dense_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.stored_bytes, 1)

    def summary(self) -> dict:
        return {"format": SPARSE_FORMAT, "sparse_tensors": self.sparse_tensors, "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes, "ratio": round(self.ratio, 2)}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise BadInputError(f"sparse format {mode!r}: use {', '.join(MODES)}", hint="--sparse-format auto (sparse when it makes the file >= 1.5x smaller)")
    return mode


def saved_state(model) -> dict[str, torch.Tensor]:
    """The tensors safetensors.torch.save_model writes for `model`: tied (aliased) tensors once, under
    the first of their names in sorted order, as save_model keeps them, so the loader ties them back."""
    groups: dict[tuple, list[str]] = {}
    state = model.state_dict()
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        groups.setdefault(key, []).append(name)
    kept = sorted(sorted(names)[0] for names in groups.values())
    return {name: state[name].detach().cpu().contiguous() for name in kept}


def is_candidate(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() > 0


def zero_fraction(tensor: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(tensor)) / tensor.numel()  # -0.0 is a zero, NaN is not


def encode(state: dict[str, torch.Tensor], min_sparsity: float = MIN_SPARSITY) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the sparse-bitmask-v1 file for `state`: every floating tensor of rank
    >= 2 with at least `min_sparsity` zeros as nonzeros + bitmask, the rest unchanged."""
    tensors, shapes = {}, {}
    for name, tensor in state.items():
        if name.endswith((SPARSE_MASK, SPARSE_SIGNS)):
            raise BadInputError(f"tensor {name} ends in {SPARSE_MASK} or {SPARSE_SIGNS}, which the sparse format reserves", hint="--sparse-format off")
        tensor = tensor.detach().cpu().contiguous()
        if not (is_candidate(tensor) and zero_fraction(tensor) >= min_sparsity):
            tensors[name] = tensor
            continue
        flat = tensor.reshape(-1)
        keep = flat != 0
        tensors[name] = flat[keep]  # (boolean indexing copies)
        tensors[name + SPARSE_MASK] = packbits(keep)
        negative = torch.signbit(flat[~keep])
        if negative.any():  # -0.0 where masking multiplied a negative weight by 0: kept, for exactness
            tensors[name + SPARSE_SIGNS] = packbits(negative)
        shapes[name] = list(tensor.shape)
    metadata = {"format": "pt", SPARSE_KEY: SPARSE_FORMAT, SPARSE_SHAPES_KEY: json.dumps(shapes, separators=(",", ":"))}
    return tensors, metadata


def packbits(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.numpy()))  # bitorder "big": runtime.unpack_mask's order


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def choose(state: dict[str, torch.Tensor], mode: str) -> SparseWeights | None:
    """The sparse file to write for `state` under --sparse-format `mode`, or None for the plain dense
    file: off never, on whenever a matrix qualifies, auto when the file gets >= AUTO_MIN_RATIO smaller."""
    if check_mode(mode) == "off" or not any(is_candidate(t) and zero_fraction(t) >= MIN_SPARSITY for t in state.values()):
        return None
    tensors, metadata = encode(state)
    weights = SparseWeights(tensors, metadata, len(json.loads(metadata[SPARSE_SHAPES_KEY])), nbytes(state), nbytes(tensors))
    if mode == "auto" and weights.ratio < AUTO_MIN_RATIO:
        return None
    return weights


def describe_choice(mode: str, weights: SparseWeights | None) -> str:
    """One clause for the checkpoint's "why": what was stored sparse, or why not."""
    if weights is not None:
        return (f"its weights are stored sparse ({SPARSE_FORMAT}: {weights.sparse_tensors} matrices as bitmask + nonzeros, "
                f"the file {weights.ratio:.1f}x smaller than dense), which only shrink's runtime reads "
                f"(trust_remote_code=True or shrink.load; --sparse-format off writes plain dense weights)")
    if mode == "on":
        return f"no matrix is {MIN_SPARSITY:.0%} zeros, so the weights are stored dense"
    return ""  # off, or auto found it not worth a non-standard file
