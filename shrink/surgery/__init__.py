"""Exact structural surgery (the only code that changes tensor shapes) and the slim-model runtime.

    surgery.apply(model, [surgery.LowRank("pooler.dense", 8), surgery.KeepHeads({0: [0, 2]})])
"""

from shrink.surgery.ops import (
    adapter_of,
    drop_layers,
    encoder_linears,
    encoder_weights,
    factorize_linear,
    factorize_word_embeddings,
    ffn_per_layer,
    heads_per_layer,
    hidden_size,
    install_word_embeddings,
    layers_of,
    manifest_of,
    original_hidden_ids,
    original_layer_ids,
    prune_ffn,
    prune_heads,
    prune_hidden,
    replace_word_embeddings,
    word_embeddings_of,
)
from shrink.surgery.plan import DropLayers, KeepFFN, KeepHeads, KeepHidden, LowRank, ReplaceEmbedding, apply

__all__ = [
    "DropLayers",
    "KeepFFN",
    "KeepHeads",
    "KeepHidden",
    "LowRank",
    "ReplaceEmbedding",
    "adapter_of",
    "apply",
    "drop_layers",
    "encoder_linears",
    "encoder_weights",
    "factorize_linear",
    "factorize_word_embeddings",
    "ffn_per_layer",
    "heads_per_layer",
    "hidden_size",
    "install_word_embeddings",
    "layers_of",
    "manifest_of",
    "original_hidden_ids",
    "original_layer_ids",
    "prune_ffn",
    "prune_heads",
    "prune_hidden",
    "replace_word_embeddings",
    "word_embeddings_of",
]
