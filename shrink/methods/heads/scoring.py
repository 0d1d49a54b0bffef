"""Exact scoring of many head masks on fixed calibration batches.

A mask is a frozenset of removed heads (flat ids over all layers). `score(masks, parent)` returns the
calibration objective of each mask, measured with per-sample gates (the inputs are repeated once
per mask, each copy gated by its own mask), so many candidates share one forward pass.

Reuse: when every mask in a call equals its parent below layer l, the layers below l are not run
again. The parent's layer outputs, captured when the parent was scored, are replayed instead (the
lower layers are swapped for stand-ins that return the cached tensors). This is exact: with equal
masks below l, the inputs of layer l are equal. Scored masks keep their own layer outputs in a small
LRU cache so their children can do the same.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from torch import nn

from shrink.surgery import heads_per_layer, layers_of
from shrink.surgery.gates import Gates


def repeat_rows(value, k: int):
    """Tile every tensor in a nested batch/targets structure k times along dim 0."""
    if torch.is_tensor(value):
        return value.repeat(k, *([1] * (value.dim() - 1))) if value.dim() else value
    if isinstance(value, dict):
        return {key: repeat_rows(v, k) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_rows(v, k) for v in value)
    return value


def _rows(output, start: int, stop: int):
    """Rows [start, stop) of a layer output (tensor or tuple whose first item is the hidden state)."""
    if isinstance(output, tuple):
        return (output[0][start:stop], *output[1:])
    return output[start:stop]


def _tile(output, k: int):
    if isinstance(output, tuple):
        return (repeat_rows(output[0], k), *output[1:])
    return repeat_rows(output, k)


class _Replay(nn.Module):
    """Stands in for a layer whose output is already known."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class _Skip(nn.Module):
    """Stands in for a layer below a replayed one: its result is never used."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


class MaskScorer:
    def __init__(self, model, batches: list[dict], objective, masks_per_pass: int = 8, cache_size: int = 16):
        self.model = model
        self.batches = batches
        self.objective = objective
        self.masks_per_pass = max(1, masks_per_pass)
        self.cache_size = cache_size
        self.layers = layers_of(model)
        counts = heads_per_layer(model)
        self.layer_of = [layer for layer, n in enumerate(counts) for _ in range(n)]
        self.position = [h for n in counts for h in range(n)]
        self.counts = counts
        self.num_heads = len(self.layer_of)
        self.sizes = [int(b["input_ids"].shape[0]) for b in batches]
        with torch.no_grad():
            self.targets = [objective.targets(b) for b in batches]
        self.cache: OrderedDict[frozenset, list[list]] = OrderedDict()
        self.forward_passes = 0
        self.masks_scored = 0
        self.layers_skipped = 0
        self.seconds = 0.0

    # --- helpers ---------------------------------------------------------------------------

    def first_layer(self, removed: frozenset) -> int:
        return min((self.layer_of[h] for h in removed), default=len(self.layers))

    def _gates(self, masks: list[frozenset], batch_size: int) -> list[torch.Tensor | None]:
        """Per-layer gate rows: mask j covers rows [j*b, (j+1)*b)."""
        gates = []
        for layer, n in enumerate(self.counts):
            if n == 0 or not any(self.layer_of[h] == layer for m in masks for h in m):
                gates.append(None)
                continue
            rows = torch.ones(len(masks), n)
            for j, m in enumerate(masks):
                for h in m:
                    if self.layer_of[h] == layer:
                        rows[j, self.position[h]] = 0.0
            gates.append(rows.repeat_interleave(batch_size, dim=0))
        return gates

    # --- scoring ---------------------------------------------------------------------------

    def score(self, masks: list[frozenset], parent: frozenset | None = None) -> list[float]:
        """Objective (mean per sample over the calibration set) of each mask."""
        results: list[float] = []
        for i in range(0, len(masks), self.masks_per_pass):
            results.extend(self._score_chunk(masks[i : i + self.masks_per_pass], parent))
        return results

    def _score_chunk(self, masks: list[frozenset], parent: frozenset | None) -> list[float]:
        started = time.perf_counter()
        k = len(masks)
        start = 0
        if parent is not None and parent in self.cache:
            self.cache.move_to_end(parent)
            start = min(self.first_layer(parent ^ m) for m in masks)
        totals = torch.zeros(k)
        captured: list[list[list]] = [[[] for _ in self.batches] for _ in masks]
        with Gates(self.model) as gates, torch.no_grad():
            for b, (batch, targets) in enumerate(zip(self.batches, self.targets)):
                size = self.sizes[b]
                gates.heads = self._gates(masks, size)
                outputs: dict[int, object] = {}
                handles = [
                    layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
                    for i, layer in enumerate(self.layers)
                    if i >= start
                ]
                originals = list(self.layers)
                try:
                    if start > 0:
                        parent_out = self.cache[parent][b]
                        as_tuple = isinstance(parent_out[0], tuple)
                        for i in range(start - 1):
                            self.layers[i] = _Skip(as_tuple)
                        self.layers[start - 1] = _Replay(_tile(parent_out[start - 1], k))
                    losses = self.objective.per_sample(self.model, repeat_rows(batch, k), repeat_rows(targets, k))
                finally:
                    for i, layer in enumerate(originals):
                        self.layers[i] = layer
                    for handle in handles:
                        handle.remove()
                totals += losses.detach().float().cpu().view(k, size).sum(dim=1)
                for j in range(k):
                    shared = self.cache[parent][b][:start] if start > 0 else []
                    own = [_rows(outputs[i], j * size, (j + 1) * size) for i in range(start, len(self.layers))]
                    captured[j][b] = shared + own
                self.forward_passes += 1
        for mask, layers in zip(masks, captured):
            self._remember(mask, layers)
        self.masks_scored += k
        self.layers_skipped += start * len(self.batches)
        self.seconds += time.perf_counter() - started
        return (totals / sum(self.sizes)).tolist()

    def _remember(self, mask: frozenset, per_batch_layers: list[list]) -> None:
        if self.cache_size <= 0:
            return
        self.cache[mask] = per_batch_layers
        self.cache.move_to_end(mask)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def stats(self) -> dict:
        return {
            "masks_scored": self.masks_scored,
            "forward_passes": self.forward_passes,
            "layers_skipped_by_reuse": self.layers_skipped,
            "scoring_seconds": round(self.seconds, 2),
        }
