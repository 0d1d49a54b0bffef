"""Exact structural surgery (the only code that changes tensor shapes) and the slim-model runtime."""

from shrink.surgery.ops import (
    adapter_of,
    drop_layers,
    factorize_linear,
    factorize_word_embeddings,
    ffn_per_layer,
    heads_per_layer,
    install_word_embeddings,
    layers_of,
    manifest_of,
    original_layer_ids,
    prune_ffn,
    prune_heads,
    replace_word_embeddings,
    word_embeddings_of,
)

__all__ = [
    "adapter_of",
    "drop_layers",
    "factorize_linear",
    "factorize_word_embeddings",
    "ffn_per_layer",
    "heads_per_layer",
    "install_word_embeddings",
    "layers_of",
    "manifest_of",
    "original_layer_ids",
    "prune_ffn",
    "prune_heads",
    "replace_word_embeddings",
    "word_embeddings_of",
]
