"""shrink: make transformer encoders smaller and faster.

Public API (imported lazily so `shrink --help` stays instant):
    shrink.load(ref)                 a model (hub id, alias, local or slim checkpoint), eval mode
    shrink.save(model, out_dir)      a slim checkpoint that reloads exactly
    shrink.Gates(model)              head / FFN / layer gates for scoring
    shrink.surgery                   exact structural surgery (prune_heads, prune_ffn, drop_layers, ...)
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("shrink.models.hub", "load_model"),
    "load_tokenizer": ("shrink.models.hub", "load_tokenizer"),
    "save": ("shrink.models.slim", "save_slim"),
    "Gates": ("shrink.surgery.gates", "Gates"),
    "describe": ("shrink.models.info", "describe"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "surgery":
        import importlib

        return importlib.import_module("shrink.surgery")
    raise AttributeError(f"module 'shrink' has no attribute {name!r}")


__all__ = ["load", "load_tokenizer", "save", "Gates", "describe", "surgery", "__version__"]
