"""`shrink info`: the structure of a model as it really is (read off the module shapes, not the config)."""

from __future__ import annotations

from pathlib import Path

from shrink.models.sentence import pooling_of
from shrink.models.slim import checkpoint_kind, read_provenance
from shrink.surgery import runtime
from shrink.surgery.ops import adapter_of, ffn_per_layer, head_size, heads_per_layer, hidden_size, layers_of, original_layer_ids


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def params_by_component(model) -> dict[str, int]:
    """Parameters split into embeddings / attention / ffn / other (pooler, heads, norms outside blocks).
    Tied parameters are counted once."""
    adapter = adapter_of(model)
    base = runtime.base_model(model)
    seen: set[int] = set()

    def count(module) -> int:
        total = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    embeddings = count(runtime.get_module(base, adapter.word_embeddings.rpartition(".")[0]))
    if hasattr(base, "embeddings_project"):  # electra projects small embeddings up to hidden size
        embeddings += count(base.embeddings_project)
    attention = ffn = 0
    for layer in layers_of(model):
        attention += count(runtime.get_module(layer, adapter.attention_block))
        ffn += sum(count(runtime.get_module(layer, path)) for path in adapter.ffn_blocks)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"embeddings": embeddings, "attention": attention, "ffn": ffn, "other": total - embeddings - attention - ffn}


WEIGHT_FILES = (".safetensors", ".bin")  # a checkpoint's weights
MODEL_FILES = (*WEIGHT_FILES, ".onnx", ".data")  # everything that holds tensors, exports included


def files_size(paths) -> int:
    """Bytes of the files that exist among `paths`."""
    return sum(p.stat().st_size for p in map(Path, paths) if p.is_file())


def size_on_disk(resolved: str, suffixes=MODEL_FILES) -> int | None:
    """Bytes of the files with these suffixes in a local model directory (None for hub ids)."""
    path = Path(resolved)
    if not path.is_dir():
        return None
    return files_size(f for f in path.iterdir() if f.suffix in suffixes)


def tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers in memory (tied tensors once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def _original_layers(model, manifest: dict) -> list[int]:
    """Original ids of the layers present; a standard checkpoint's config counts only the layers it
    has, so its ids come from the manifest in shrink.json."""
    if getattr(model.config, "shrink", None) or not manifest:
        return original_layer_ids(model)
    dropped = sum(len(op.get("layers", [])) for op in manifest.get("ops", []) if op.get("op") == "drop_layers")
    return runtime.kept_layer_ids(manifest, len(layers_of(model)) + dropped)


def describe(model, resolved: str | None = None) -> dict:
    adapter = adapter_of(model)
    config = model.config
    params = params_by_component(model)
    manifest = getattr(config, "shrink", None) or {}
    pooling = pooling_of(model)
    if not manifest and resolved and Path(resolved).is_dir():  # a standard checkpoint keeps it in shrink.json
        manifest = (read_provenance(resolved) or {}).get("manifest") or {}
    return {
        "model_type": config.model_type,
        "architecture": type(model).__name__,
        "task_head": None if model is runtime.base_model(model) else type(model).__name__,
        "num_layers": len(layers_of(model)),
        "original_layers": _original_layers(model, manifest),
        "heads_per_layer": heads_per_layer(model),
        "ffn_per_layer": ffn_per_layer(model),
        "hidden_size": hidden_size(model),  # the stream's width now: a hidden op narrows it, the config keeps the original
        "head_size": head_size(model),
        "vocab_size": config.vocab_size,
        "max_positions": getattr(config, adapter.max_positions_attr, None),
        "params": params,
        "params_total": sum(params.values()),
        "size_on_disk_bytes": size_on_disk(resolved) if resolved else None,
        "slim": bool(manifest.get("ops")),
        "manifest_ops": [op["op"] for op in manifest.get("ops", [])],
        # which kind of checkpoint shrink wrote (standard: plain config; shrink: manifest + runtime)
        "checkpoint": checkpoint_kind(resolved) if resolved and Path(resolved).is_dir() else None,
        "sentence_transformers": pooling.summary() if pooling.is_sentence_transformer else None,
    }
