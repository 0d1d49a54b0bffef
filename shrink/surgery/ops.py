"""Exact surgery: the only code in shrink that changes tensor shapes.

Every function here takes a plan in terms of the model as it is NOW (current layer positions,
current head/neuron positions), physically removes or factorizes the weights, and appends an op to
the manifest in `model.config.shrink` (in ORIGINAL layer and head ids, see runtime.py) so the slim
model can be rebuilt from the original config. Removal is exact: the result equals the original with
the removed parts gated to zero (except hidden dims: the LayerNorms then normalise fewer dims).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shrink.errors import BadInputError, UnsupportedModelError
from shrink.surgery import runtime
from shrink.surgery.runtime import Adapter, LowRankLinear, get_module, kind_of, set_module

# The matrices of an encoder layer, by Adapter field: what weight-level methods may touch.
ENCODER_MODULES = ("query", "key", "value", "attention_out", "ffn_in", "ffn_out")
ATTENTION_MODULES = ("query", "key", "value", "attention_out")


def check_supported(config) -> Adapter:
    """The adapter of a config's family; UnsupportedModelError (exit 2) for any other family."""
    adapter = runtime.adapter_for(config)
    if adapter is None:
        supported = ", ".join(sorted(runtime.ADAPTERS))
        raise UnsupportedModelError(
            f"model type {getattr(config, 'model_type', None)!r} is not supported",
            hint=f"supported types: {supported}",
        )
    return adapter


def adapter_of(model: nn.Module) -> Adapter:
    return check_supported(model.config)


def manifest_of(model: nn.Module) -> dict:
    """The live manifest of a model (created empty on first use)."""
    manifest = getattr(model.config, "shrink", None)
    if not manifest:
        manifest = runtime.new_manifest()
        model.config.shrink = manifest
    return manifest


def layers_of(model: nn.Module) -> nn.ModuleList:
    return get_module(runtime.base_model(model), adapter_of(model).layers)


def original_layer_ids(model: nn.Module) -> list[int]:
    adapter = adapter_of(model)
    return runtime.kept_layer_ids(manifest_of(model), getattr(model.config, adapter.num_layers_attr))


def head_size(model: nn.Module) -> int:
    """Per-head width, from the ORIGINAL config (which a hidden op leaves unchanged: heads keep their size)."""
    adapter = adapter_of(model)
    return getattr(model.config, adapter.hidden_size_attr) // getattr(model.config, adapter.num_heads_attr)


def hidden_size(model: nn.Module) -> int:
    """The residual stream's width now (the config keeps the original one; see prune_hidden)."""
    return len(original_hidden_ids(model))


def original_hidden_ids(model: nn.Module) -> list[int]:
    adapter = adapter_of(model)
    return runtime.kept_hidden_ids(manifest_of(model), getattr(model.config, adapter.hidden_size_attr))


def original_token_ids(model: nn.Module) -> list[int]:
    """The original token id of each current one (a pruned vocabulary keeps some, renumbered)."""
    return runtime.kept_vocab_ids(manifest_of(model), model.config.vocab_size)


def heads_per_layer(model: nn.Module) -> list[int]:
    adapter, size = adapter_of(model), head_size(model)
    return [
        get_module(layer, adapter.query).out_features // size if runtime.layer_has_attention(adapter, layer) else 0
        for layer in layers_of(model)
    ]


def ffn_per_layer(model: nn.Module) -> list[int]:
    adapter = adapter_of(model)
    return [
        get_module(layer, adapter.ffn_in).out_features if runtime.layer_has_ffn(adapter, layer) else 0
        for layer in layers_of(model)
    ]


def encoder_linears(model: nn.Module, modules: Sequence[str] = ENCODER_MODULES) -> list[tuple[str, nn.Module]]:
    """(path from the base model, module) of each linear-like matrix named in `modules` (ENCODER_MODULES
    names) in every layer, skipping removed attention and FFN blocks."""
    adapter, found = adapter_of(model), []
    for position, layer in enumerate(layers_of(model)):
        for name in modules:
            present = runtime.layer_has_attention if name in ATTENTION_MODULES else runtime.layer_has_ffn
            if not present(adapter, layer):
                continue
            module = get_module(layer, getattr(adapter, name))
            if kind_of(module) is not None:
                found.append((f"{adapter.layers}.{position}.{getattr(adapter, name)}", module))
    return found


def encoder_weights(model: nn.Module, modules: Sequence[str] = ENCODER_MODULES) -> dict[str, torch.Tensor]:
    """The weight matrices (both factors of a LowRankLinear) of the encoder_linears, by state-dict name
    relative to the base model."""
    return {
        f"{path}.{suffix}": weight
        for path, module in encoder_linears(model, modules)
        for suffix, weight in kind_of(module).weight_matrices(module).items()
    }


# --- slicing Linear / LowRankLinear along their input or output features -----------------------


def _rows(module: nn.Module, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """State of `module` restricted to output features `index`."""
    return kind_of(module).rows(module, index)


def _columns(module: nn.Module, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """State of `module` restricted to input features `index`."""
    return kind_of(module).columns(module, index)


def _load(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        module.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)


def _check_positions(what: str, positions: list[int], count: int, layer: int) -> list[int]:
    positions = sorted(set(int(p) for p in positions))
    bad = [p for p in positions if not 0 <= p < count]
    if bad:
        raise BadInputError(f"layer {layer}: {what} {bad} out of range (it has {count})")
    return positions


# --- heads ------------------------------------------------------------------------------------


def prune_heads(model: nn.Module, keep: dict[int, list[int]]) -> None:
    """Keep only the given heads (current positions) in each listed layer (current position).
    An empty list removes the layer's attention entirely."""
    adapter, manifest, size = adapter_of(model), manifest_of(model), head_size(model)
    layers, layer_ids, counts = layers_of(model), original_layer_ids(model), heads_per_layer(model)
    num_heads = getattr(model.config, adapter.num_heads_attr)
    for position, kept in sorted(keep.items()):
        if not 0 <= position < len(layers):
            raise BadInputError(f"layer {position} out of range (the model has {len(layers)} layers)")
        kept = _check_positions("heads", kept, counts[position], position)
        if len(kept) == counts[position]:
            continue
        layer, original = layers[position], layer_ids[position]
        before = runtime.kept_head_ids(manifest, original, num_heads)
        columns = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept]) if kept else None
        if kept:
            states = {p: _rows(get_module(layer, p), columns) for p in (adapter.query, adapter.key, adapter.value)}
            states[adapter.attention_out] = _columns(get_module(layer, adapter.attention_out), columns)
            bias = None
        else:
            out = get_module(layer, adapter.attention_out)
            bias = out.bias.detach().clone() if out.bias is not None else None
        runtime.reshape_heads(adapter, model.config, layer, [before[h] for h in kept])
        if kept:
            for path, state in states.items():
                _load(get_module(layer, path), state)
        elif bias is not None:
            with torch.no_grad():
                get_module(layer, adapter.attention_block).bias.copy_(bias)
        manifest["ops"].append({"op": "heads", "layer": original, "keep": [before[h] for h in kept]})


# --- FFN neurons --------------------------------------------------------------------------------


def prune_ffn(model: nn.Module, keep: dict[int, list[int]]) -> None:
    """Keep only the given FFN neurons (current positions) in each listed layer (current position).
    An empty list removes the layer's FFN entirely."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    layers, layer_ids, sizes = layers_of(model), original_layer_ids(model), ffn_per_layer(model)
    for position, kept in sorted(keep.items()):
        if not 0 <= position < len(layers):
            raise BadInputError(f"layer {position} out of range (the model has {len(layers)} layers)")
        kept = _check_positions("FFN neurons", kept, sizes[position], position)
        if len(kept) == sizes[position]:
            continue
        layer = layers[position]
        ffn_in, ffn_out = get_module(layer, adapter.ffn_in), get_module(layer, adapter.ffn_out)
        if kept:
            index = torch.tensor(kept, dtype=torch.long)
            state_in, state_out = _rows(ffn_in, index), _columns(ffn_out, index)
            runtime.reshape_ffn(adapter, model.config, layer, len(kept))
            _load(get_module(layer, adapter.ffn_in), state_in)
            _load(get_module(layer, adapter.ffn_out), state_out)
        else:
            bias = kind_of(ffn_out).output_bias(ffn_out)
            bias = bias.detach().clone() if bias is not None else None
            runtime.reshape_ffn(adapter, model.config, layer, 0)
            if bias is not None:
                with torch.no_grad():
                    get_module(layer, adapter.ffn_blocks[-1]).bias.copy_(bias)
        manifest["ops"].append({"op": "ffn", "layer": layer_ids[position], "size": len(kept)})


# --- hidden dims ----------------------------------------------------------------------------------


def prune_hidden(model: nn.Module, keep: list[int]) -> None:
    """Keep only hidden dims `keep` (current positions, ascending, non-empty) of the residual stream, in
    the embeddings, every layer and the task head (runtime.slice_hidden), as CoFi prunes its hidden
    dims. Not exact: every LayerNorm on the stream now normalises over the kept dims only. Heads keep
    their size, FFNs their neurons; ELECTRA's smaller embeddings keep theirs (embeddings_project
    loses rows). A base (embedding) model's output gets narrower: a method for embedding models has
    to avoid that itself."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    before = original_hidden_ids(model)
    keep = [int(k) for k in keep]
    if not keep:
        raise BadInputError("KeepHidden: keep at least one hidden dim")
    if keep != sorted(set(keep)):
        raise BadInputError(f"KeepHidden: hidden dims must be ascending without duplicates, got {keep}")
    if not 0 <= keep[0] <= keep[-1] < len(before):
        raise BadInputError(f"KeepHidden: hidden dims {[k for k in keep if not 0 <= k < len(before)]} out of range (the model has {len(before)})")
    if len(keep) == len(before):
        return
    try:  # refuses (compressed word embeddings on the stream, an unknown head) before it changes anything
        runtime.slice_hidden(adapter, model, torch.tensor(keep, dtype=torch.long))
    except ValueError as exc:
        hint = "prune the hidden dims before replacing the word embeddings" if "embeddings" in str(exc) else None
        raise BadInputError(f"KeepHidden: {exc}", hint=hint) from None
    manifest["ops"].append({"op": "hidden", "keep": [before[k] for k in keep]})


# --- vocabulary -----------------------------------------------------------------------------------


def prune_vocab(model: nn.Module, keep: list[int]) -> None:
    """Keep only token ids `keep` (ascending, non-empty, the padding token among them): the word
    embeddings' rows, a tied or untied output layer's rows and bias (runtime.slice_vocab); new id i is
    old id keep[i], and config.vocab_size and the config's special token ids follow. Exact for the
    kept tokens. The tokenizer must be rewritten to match (shrink.models.vocab_tokenizer.rewrite)."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    if any(op["op"] == "vocab" for op in manifest["ops"]):
        raise BadInputError("KeepVocab: the vocabulary was already pruned", hint="use one vocabulary step per model")
    embedding = word_embeddings_of(model)
    if not isinstance(embedding, nn.Embedding):
        raise BadInputError(f"KeepVocab: the word embeddings are already replaced ({type(embedding).__name__})",
                            hint="prune the vocabulary before compressing the embeddings")
    keep, size = [int(k) for k in keep], embedding.num_embeddings
    if not keep:
        raise BadInputError("KeepVocab: keep at least one token")
    if keep != sorted(set(keep)):
        raise BadInputError("KeepVocab: token ids must be ascending without duplicates")
    if not 0 <= keep[0] <= keep[-1] < size:
        raise BadInputError(f"KeepVocab: token ids {[k for k in keep if not 0 <= k < size][:5]} out of range (the vocabulary has {size})")
    if embedding.padding_idx is not None and embedding.padding_idx not in keep:
        raise BadInputError(f"KeepVocab: the padding token (id {embedding.padding_idx}) must be kept")
    if len(keep) == size:
        return
    runtime.slice_vocab(adapter, model, torch.tensor(keep, dtype=torch.long))
    manifest["ops"].append({"op": "vocab", "keep": keep})


# --- tokens -------------------------------------------------------------------------------------


def prune_tokens(model: nn.Module, keep: dict[int, float], restore: bool = True, fill: str = "state",
                 thresholds: dict[int, float] | None = None) -> None:
    """Token pruning with drop-and-restore (runtime.TokenPruningEncoder): after the layer at each
    current position listed, a sample keeps ceil(fraction x its real length) tokens, those that
    received the most attention (the first token always, padding never). Fractions count ORIGINAL
    real tokens and must not rise from one layer to the next. Changes no weight: the manifest op
    ({"op": "tokens", "keep": [one fraction per ORIGINAL layer]}) rebuilds it. `fill`: what a dropped
    token's position holds in the output (runtime.TOKEN_FILLS: "state" or "kept_mean"). `thresholds`
    (LTP, tokens.ltp): after the layer at each current position listed, a sample also drops the tokens
    whose received attention per head is below the threshold (1.0: the average token's share), so
    the kept count follows the text, not only its length; unlisted layers apply none."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    if any(op["op"] == "tokens" for op in manifest["ops"]):
        raise BadInputError("KeepTokens: the model already prunes tokens", hint="use one token-pruning step per model")
    if not restore:
        raise BadInputError("KeepTokens: only drop-and-restore is built (restore=True)",
                            hint="the output keeps [batch, sequence]; pool with the attention mask as before")
    layer_ids, num_layers = original_layer_ids(model), getattr(model.config, adapter.num_layers_attr)
    for position, fraction in keep.items():
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(layer_ids):
            raise BadInputError(f"KeepTokens: layer {position!r} out of range (the model has {len(layer_ids)} layers)")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
            raise BadInputError(f"KeepTokens: layer {position}: the kept fraction must be in (0, 1], got {fraction!r}")
    listed = [(p, float(f)) for p, f in sorted(keep.items())]
    rising = [p for (_, before), (p, f) in zip(listed, listed[1:]) if f > before]
    if rising:
        raise BadInputError(f"KeepTokens: layer {rising[0]} keeps more tokens ({keep[rising[0]]}) than an earlier layer",
                            hint="a dropped token does not come back: use non-increasing fractions")
    # an unlisted layer prunes nothing more: it carries the fraction of the layer before it
    fractions, current = [1.0] * num_layers, 1.0
    for original in range(num_layers):
        if original in layer_ids:
            current = float(keep.get(layer_ids.index(original), current))
        fractions[original] = current
    if fill not in runtime.TOKEN_FILLS:
        raise BadInputError(f"KeepTokens: unknown fill {fill!r}", hint=f"use one of {', '.join(runtime.TOKEN_FILLS)}")
    per_layer = None
    if thresholds:
        per_layer = [0.0] * num_layers
        for position, value in thresholds.items():
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(layer_ids):
                raise BadInputError(f"KeepTokens: threshold layer {position!r} out of range (the model has {len(layer_ids)} layers)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
                raise BadInputError(f"KeepTokens: layer {position}: a threshold must be a number >= 0, got {value!r}")
            per_layer[layer_ids[position]] = float(value)
        if not any(per_layer):
            per_layer = None
    if all(f == 1.0 for f in fractions) and per_layer is None:
        return
    try:
        runtime.install_token_pruning(adapter, model, fractions, restore, fill=fill, thresholds=per_layer)
    except ValueError as exc:
        raise UnsupportedModelError(f"KeepTokens: {exc}") from None
    record = {"op": "tokens", "keep": fractions, "restore": True, "significance": "attention", "fill": fill}
    if per_layer is not None:
        record["thresholds"] = per_layer
    manifest["ops"].append(record)


# --- layers -------------------------------------------------------------------------------------


def drop_layers(model: nn.Module, positions: list[int]) -> None:
    """Remove whole layers (current positions); the residual stream passes through unchanged."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    layer_ids = original_layer_ids(model)
    positions = _check_positions("layers", positions, len(layer_ids), -1) if positions else []
    if not positions:
        return
    runtime.remove_layers(adapter, model, positions)
    manifest["ops"].append({"op": "drop_layers", "layers": [layer_ids[p] for p in positions]})


# --- low rank -----------------------------------------------------------------------------------


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors (first: r x in, second: out x r) of weight (out x in), energy split evenly."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    first = (root[:, None] * vh[:rank]).to(weight.dtype)
    second = (u[:, :rank] * root[None, :]).to(weight.dtype)
    return first, second


def factorize_linear(model: nn.Module, path: str, rank: int, factors: tuple[torch.Tensor, ...] | None = None) -> None:
    """Replace the Linear at `path` (relative to the base model, current layer positions) by a rank-r
    pair; a LowRankLinear already there is re-factorized to a rank no higher than its own. `factors`
    (first, second) or (first, second, bias) lets a method supply its own (e.g. activation-weighted)
    factors; by default the truncated SVD is used."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    base = runtime.base_model(model)
    try:
        old = get_module(base, path)
    except AttributeError:
        raise BadInputError(f"no module named {path!r} in the model") from None
    kind = kind_of(old)  # a LowRankLinear is re-factorized to a lower rank (iterated compression)
    if kind is None:
        raise BadInputError(f"{path!r} is a {type(old).__name__}, not a Linear")
    weight, bias, limit = kind.dense_weight(old), kind.output_bias(old), kind.max_rank(old)
    if not 1 <= rank <= limit:
        raise BadInputError(f"rank {rank} out of range for {path!r} ({old.out_features}x{old.in_features}, max {limit})")
    first, second = factors[:2] if factors is not None else svd_factors(weight, rank)
    if factors is not None and len(factors) == 3:  # a new bias too (e.g. mean-corrected factors)
        if bias is None:
            raise BadInputError(f"{path!r} has no bias to replace")
        bias = factors[2]
    new = LowRankLinear(old.in_features, old.out_features, rank, bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    state = {"first.weight": first, "second.weight": second}
    if bias is not None:
        state["second.bias"] = bias
    _load(new, state)
    set_module(base, path, new)

    prefix = adapter.layers + "."
    if path.startswith(prefix):
        position, _, inner = path[len(prefix):].partition(".")
        op = {"op": "low_rank", "layer": original_layer_ids(model)[int(position)], "module": inner, "rank": rank}
    else:
        op = {"op": "low_rank", "layer": None, "module": path, "rank": rank}
    manifest["ops"].append(op)


# --- word embeddings ----------------------------------------------------------------------------


def replace_word_embeddings(model: nn.Module, module: nn.Module, kind: str, spec: dict) -> None:
    """Install a new word-embedding module of a kind runtime.EMBEDDING_BUILDERS knows, so that the
    slim checkpoint can rebuild it. The caller fills its weights."""
    adapter, manifest = adapter_of(model), manifest_of(model)
    if kind not in runtime.EMBEDDING_BUILDERS:
        raise BadInputError(f"unknown embedding kind {kind!r}", hint=f"known: {sorted(runtime.EMBEDDING_BUILDERS)}")
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        raise UnsupportedModelError(
            "this model ties its output layer to the word embeddings; replacing them is not supported",
            hint="use the base model (e.g. BertModel) or a task head without tied embeddings",
        )
    set_module(runtime.base_model(model), adapter.word_embeddings, module)
    manifest["ops"].append({"op": "embedding", "kind": kind, "spec": dict(spec)})


def word_embeddings_of(model: nn.Module) -> nn.Module:
    return get_module(runtime.base_model(model), adapter_of(model).word_embeddings)


def install_word_embeddings(model: nn.Module, kind: str, spec: dict, state: dict[str, torch.Tensor]) -> None:
    """Replace the word embeddings by a module of `kind` built from `spec` exactly as a slim checkpoint
    rebuilds it (runtime.build_embedding), filled strictly with `state` (e.g. codes and codebooks)."""
    old = word_embeddings_of(model)
    if not isinstance(old, nn.Embedding):
        raise BadInputError(f"word embeddings are already replaced ({type(old).__name__})", hint="use one embedding recipe per model")
    if kind not in runtime.EMBEDDING_BUILDERS:
        raise BadInputError(f"unknown embedding kind {kind!r}", hint=f"known: {sorted(runtime.EMBEDDING_BUILDERS)}")
    try:
        new = runtime.build_embedding(kind, spec, old)
    except (KeyError, ValueError) as exc:
        raise BadInputError(f"embedding {kind} spec {spec}: {exc}") from None
    _load(new, state)
    replace_word_embeddings(model, new, kind, spec)


def factorize_word_embeddings(model: nn.Module, rank: int) -> None:
    """Word embeddings as vocab x rank codes times a rank x dim projection, from the truncated SVD."""
    adapter = adapter_of(model)
    old = get_module(runtime.base_model(model), adapter.word_embeddings)
    if not isinstance(old, nn.Embedding):
        raise BadInputError(f"word embeddings are already replaced ({type(old).__name__})")
    if not 1 <= rank <= min(old.num_embeddings, old.embedding_dim):
        raise BadInputError(f"embedding rank {rank} out of range (1..{min(old.num_embeddings, old.embedding_dim)})")
    new = runtime.build_embedding("factorized", {"rank": rank}, old)
    # weight (vocab x dim) = codes (vocab x r) @ proj^T (r x dim)
    first, second = svd_factors(old.weight.T, rank)  # old.weight.T (dim x vocab) ~ second @ first
    _load(new, {"codes.weight": first.T, "proj.weight": second})
    replace_word_embeddings(model, new, "factorized", {"rank": rank})
