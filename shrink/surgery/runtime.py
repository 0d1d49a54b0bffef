"""What a slim model is made of, and how to rebuild one from its manifest.

This file imports only torch and transformers, on purpose: it is copied verbatim into every slim
checkpoint as `modeling_shrink.py`, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works
on a machine without shrink. shrink itself uses the same code (`shrink.load`), so both paths rebuild
the same modules.

It is organised by its tables:
1. `ADAPTERS`: for each supported architecture family, where it keeps layers, attention projections,
   FFN and embeddings. Nothing else in shrink hard-codes a module path.
2. Replacement modules: a layer with no heads left, an FFN with no neurons left, a rank-r Linear and
   word embeddings stored compactly (factorized, compositional codes, binary codes; `EMBEDDING_BUILDERS`).
   `MODULE_KINDS`: how each kind of linear module (nn.Linear, LowRankLinear) is sliced, rebuilt and
   priced, so nothing else in shrink branches on the type.
3. `REPLAY` and `apply_manifest(model, manifest)`: one entry per manifest op; apply_manifest replays
   the recorded ops on a freshly built original architecture so that every tensor has the slim shape;
   the weights are then loaded strictly.

Manifest (the `shrink` section of config.json):
    {"format_version": 1, "ops": [op, ...], ...provenance...}
Layer numbers in ops are ORIGINAL layer indices, so an op stays meaningful after layers are dropped.
Only shape changes are recorded: weight-only plan ops (shrink.surgery.plan.ScaleUnits, the folded
unit scales of post-training mask tuning) leave no op, the checkpoint holds the scaled weights.
    {"op": "heads", "layer": 3, "keep": [0, 2, 5]}     kept original head ids (ascending)
    {"op": "ffn", "layer": 3, "size": 912}              FFN width after the op
    {"op": "drop_layers", "layers": [4, 5]}
    {"op": "low_rank", "layer": 0, "module": "intermediate.dense", "rank": 64}
        (layer null: "module" is a path from the base model, e.g. "pooler.dense")
    {"op": "embedding", "kind": "factorized", "spec": {"rank": 64}}
    {"op": "embedding", "kind": "codes", "spec": {"codebooks": 32, "codebook_size": 16, "code_dim": 384, "linear": false}}
    {"op": "embedding", "kind": "tiered_codes", "spec": {"codebooks": 16, "codebook_size": 16, "extra_codebooks": 16, "frequent_tokens": 4000}}
    {"op": "embedding", "kind": "binary", "spec": {"bits": 256}}
    {"op": "hidden", "keep": [0, 1, 3, ...]}            kept ORIGINAL hidden dims (ascending): the
        residual stream keeps these dims in the embeddings, every layer and the task head; the config
        keeps the original hidden size (a later op's ids still name original dims)
    {"op": "vocab", "keep": [0, 100, 101, ...]}         kept ORIGINAL token ids (ascending): token id i
        of the slim model is original id keep[i], in the word embeddings and a tied or untied output
        layer (MLM decoder rows and bias); unlike the other ops the config follows (vocab_size and its
        special token ids are the new ones), so a model built from the slim config has these shapes
        already and the replay leaves it as it is; at most one vocab op, before any embedding op
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MANIFEST_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# 1. Architecture adapters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Adapter:
    """Where one architecture family keeps its parts. Paths inside a layer are relative to it."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of layers, relative to the base model
    self_attention: str  # module holding q/k/v (its head-count attributes get updated)
    query: str
    key: str
    value: str
    attention_out: str  # output projection: its input is the concatenation of heads
    attention_block: str  # what a headless layer replaces
    attention_norm: str | None  # LayerNorm applied to (attention + residual) inside attention_block
    attention_returns: str  # "pair" -> (out, weights); "tuple" -> (out,)
    ffn_in: str
    ffn_out: str  # its input is the FFN activations (one column per neuron)
    ffn_blocks: tuple[str, ...]  # what an FFN with no neurons replaces, in order
    ffn_norm: str | None  # LayerNorm applied to (ffn + residual) inside the FFN output block
    word_embeddings: str
    num_heads_attr: str
    num_layers_attr: str
    ffn_size_attr: str
    hidden_size_attr: str
    max_positions_attr: str = "max_position_embeddings"
    uses_token_type_ids: bool = True
    position_offset: int = 0  # positions that are never used (RoBERTa-style ids start after padding_idx)
    embeddings: str = "embeddings"  # the block that writes the residual stream (or ELECTRA's smaller embeddings)
    embeddings_project: str | None = None  # ELECTRA: embedding_size -> hidden_size (present only when they differ)
    pooler: str | None = None  # a Linear that reads the stream (first token) in base models that have one


_BERT_LIKE = dict(
    layers="encoder.layer",
    self_attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_out="attention.output.dense",
    attention_block="attention",
    attention_norm="attention.output.LayerNorm",
    attention_returns="pair",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    ffn_blocks=("intermediate", "output"),
    ffn_norm="output.LayerNorm",
    word_embeddings="embeddings.word_embeddings",
    num_heads_attr="num_attention_heads",
    num_layers_attr="num_hidden_layers",
    ffn_size_attr="intermediate_size",
    hidden_size_attr="hidden_size",
    pooler="pooler.dense",
)

ADAPTERS: dict[str, Adapter] = {
    "bert": Adapter(family="bert", model_types=("bert",), **_BERT_LIKE),
    # RoBERTa-style models have a single token type: exporters (and Optimum) leave token_type_ids out
    "roberta": Adapter(family="roberta", model_types=("roberta",), **{**_BERT_LIKE, "uses_token_type_ids": False, "position_offset": 2}),
    "xlm-roberta": Adapter(family="xlm-roberta", model_types=("xlm-roberta",), **{**_BERT_LIKE, "uses_token_type_ids": False, "position_offset": 2}),
    "electra": Adapter(family="electra", model_types=("electra",), **{**_BERT_LIKE, "embeddings_project": "embeddings_project", "pooler": None}),
    "distilbert": Adapter(
        family="distilbert",
        model_types=("distilbert",),
        layers="transformer.layer",
        self_attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_out="attention.out_lin",
        attention_block="attention",
        attention_norm=None,  # the block applies sa_layer_norm itself
        attention_returns="pair",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        ffn_blocks=("ffn",),
        ffn_norm=None,  # the block applies output_layer_norm itself
        word_embeddings="embeddings.word_embeddings",
        num_heads_attr="n_heads",
        num_layers_attr="n_layers",
        ffn_size_attr="hidden_dim",
        hidden_size_attr="dim",
        uses_token_type_ids=False,
    ),
    "mpnet": Adapter(
        family="mpnet",
        model_types=("mpnet",),
        layers="encoder.layer",
        self_attention="attention.attn",
        query="attention.attn.q",
        key="attention.attn.k",
        value="attention.attn.v",
        attention_out="attention.attn.o",
        attention_block="attention",
        attention_norm="attention.LayerNorm",
        attention_returns="tuple",
        ffn_in="intermediate.dense",
        ffn_out="output.dense",
        ffn_blocks=("intermediate", "output"),
        ffn_norm="output.LayerNorm",
        word_embeddings="embeddings.word_embeddings",
        num_heads_attr="num_attention_heads",
        num_layers_attr="num_hidden_layers",
        ffn_size_attr="intermediate_size",
        hidden_size_attr="hidden_size",
        uses_token_type_ids=False,
        position_offset=2,
        pooler="pooler.dense",
    ),
}


def adapter_for(config) -> Adapter | None:
    """The adapter for a config's model_type, or None when the family is not supported."""
    return ADAPTERS.get(getattr(config, "model_type", None))


def max_sequence_length(config) -> int:
    """The longest input the position embeddings allow."""
    adapter = adapter_for(config)
    return getattr(config, adapter.max_positions_attr) - adapter.position_offset


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(root, parent_path), name, module)


def base_model(model: nn.Module) -> nn.Module:
    """The encoder without task head (BertModel inside BertForSequenceClassification, ...)."""
    return getattr(model, "base_model", model)


# ---------------------------------------------------------------------------------------------
# 2. Replacement modules
# ---------------------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """y = second(first(x)): a Linear factorized into rank `rank` (first has no bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class DenseKind:
    """nn.Linear: y = x W^T + b, W out x in."""

    @staticmethod
    def rows(module: nn.Linear, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """State restricted to output features `index`."""
        state = {"weight": module.weight[index]}
        if module.bias is not None:
            state["bias"] = module.bias[index]
        return state

    @staticmethod
    def columns(module: nn.Linear, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """State restricted to input features `index`."""
        state = {"weight": module.weight[:, index]}
        if module.bias is not None:
            state["bias"] = module.bias
        return state

    @staticmethod
    def empty_like(module: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
        """The same kind with new sizes, weights left for the caller (or a checkpoint) to fill."""
        new = nn.Linear(in_features, out_features, bias=module.bias is not None)
        return new.to(device=module.weight.device, dtype=module.weight.dtype)

    @staticmethod
    def dense_weight(module: nn.Linear) -> torch.Tensor:
        """The equivalent out x in matrix (detached, in the module's dtype)."""
        return module.weight.detach()

    @staticmethod
    def output_bias(module: nn.Linear) -> nn.Parameter | None:
        return module.bias

    @staticmethod
    def input_weight(module: nn.Linear) -> nn.Parameter:
        """The matrix whose columns multiply the input features."""
        return module.weight

    @staticmethod
    def weight_matrices(module: nn.Linear) -> dict[str, nn.Parameter]:
        """Weight matrices by state-dict suffix (biases left out)."""
        return {"weight": module.weight}

    @staticmethod
    def max_rank(module: nn.Linear) -> int:
        """The highest rank a factorization of it may have."""
        return min(module.in_features, module.out_features)

    @staticmethod
    def flops(module: nn.Linear, tokens: int) -> int:
        """Matrix-product FLOPs (2 x multiply-adds) on `tokens` input vectors."""
        return 2 * tokens * module.in_features * module.out_features


class LowRankKind:
    """LowRankLinear: y = second(first(x)); the same interface as DenseKind."""

    @staticmethod
    def rows(module: LowRankLinear, index: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {"first.weight": module.first.weight, "second.weight": module.second.weight[index]}
        if module.second.bias is not None:
            state["second.bias"] = module.second.bias[index]
        return state

    @staticmethod
    def columns(module: LowRankLinear, index: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {"first.weight": module.first.weight[:, index], "second.weight": module.second.weight}
        if module.second.bias is not None:
            state["second.bias"] = module.second.bias
        return state

    @staticmethod
    def empty_like(module: LowRankLinear, in_features: int, out_features: int) -> LowRankLinear:
        new = LowRankLinear(in_features, out_features, module.rank, bias=module.second.bias is not None)
        return new.to(device=module.first.weight.device, dtype=module.first.weight.dtype)

    @staticmethod
    def dense_weight(module: LowRankLinear) -> torch.Tensor:
        return (module.second.weight @ module.first.weight).detach()

    @staticmethod
    def output_bias(module: LowRankLinear) -> nn.Parameter | None:
        return module.second.bias

    @staticmethod
    def input_weight(module: LowRankLinear) -> nn.Parameter:
        return module.first.weight

    @staticmethod
    def weight_matrices(module: LowRankLinear) -> dict[str, nn.Parameter]:
        return {"first.weight": module.first.weight, "second.weight": module.second.weight}

    @staticmethod
    def max_rank(module: LowRankLinear) -> int:
        return module.rank  # re-factorizing never raises the rank

    @staticmethod
    def flops(module: LowRankLinear, tokens: int) -> int:
        return 2 * tokens * module.rank * (module.in_features + module.out_features)


# Linear-like module types and how to handle each (Torch-Pruning's per-module-type functions).
MODULE_KINDS = {nn.Linear: DenseKind, LowRankLinear: LowRankKind}


def kind_of(module: nn.Module):
    """The MODULE_KINDS entry for a module (subclasses included), or None for any other module."""
    for cls in type(module).__mro__:
        if cls in MODULE_KINDS:
            return MODULE_KINDS[cls]
    return None


class HeadlessAttention(nn.Module):
    """An attention block whose heads were all removed: the output projection contributes only its
    bias, so the block is norm(hidden + bias) (or just bias where the caller adds the residual)."""

    def __init__(self, hidden_size: int, norm: nn.LayerNorm | None, returns: str):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.norm = norm
        self.returns = returns

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.norm is not None:
            out = self.norm(hidden_states + self.bias)
        else:
            out = self.bias.expand_as(hidden_states)
        return (out, None) if self.returns == "pair" else (out,)


class PassThrough(nn.Module):
    """Stands in for an FFN's first half when no neuron is left: nothing to compute."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class NeuronlessFFNOutput(nn.Module):
    """An FFN output block with no neurons left: norm(residual + bias), or just the bias where the
    caller adds the residual and the norm (distilbert)."""

    def __init__(self, hidden_size: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor | None = None):
        if self.norm is None:
            return self.bias.expand_as(hidden_states)
        return self.norm(input_tensor + self.bias)


class FactorizedEmbedding(nn.Module):
    """A vocab x dim embedding stored as vocab x rank codes times a rank x dim projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.codes = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.codes(input_ids))


def code_dtype(num_values: int) -> torch.dtype:
    """The smallest integer dtype holding 0..num_values-1 (safetensors stores uint8 and int16 as is)."""
    if num_values <= 256:
        return torch.uint8
    return torch.int16 if num_values <= 32768 else torch.int32


def lookup_codes(codes: torch.Tensor, codebooks: torch.Tensor, codebook_size: int, product: bool) -> torch.Tensor:
    """[..., M] integer codes -> [..., dim]: row codes[m] of codebook m (rows m*K .. m*K+K-1 of the
    codebooks table) for every m, then their sum (additive codes) or their concatenation (product codes,
    each codebook a slice of the dimensions). Widened only after the gather, so tables stay uint8."""
    offsets = torch.arange(codes.shape[-1], device=codes.device) * codebook_size
    rows = nn.functional.embedding(codes.long() + offsets, codebooks)
    return rows.flatten(-2) if product else rows.sum(dim=-2)


def code_width(embedding_dim: int, num_codebooks: int, product: bool, code_dim: int | None = None) -> int:
    """Codebook row size: a 1/M slice of the embedding for product codes, code_dim (or the embedding
    size) for additive ones."""
    if not product:
        return code_dim or embedding_dim
    if embedding_dim % num_codebooks:
        raise ValueError(f"product codes need the number of codebooks ({num_codebooks}) to divide the embedding size {embedding_dim}")
    return embedding_dim // num_codebooks


class CodeEmbedding(nn.Module):
    """Compositional codes (Shu & Nakayama 2018): token t is M integers codes[t] in [0, K), and its
    embedding is the sum over m of row codes[t, m] of codebook m (optionally mapped by a Linear from
    code_dim to embedding_dim). With product=True (product quantization, the special case where
    codebook m only covers the m-th slice of the dimensions) the rows are concatenated instead, so each
    codebook stores dim/M floats per row. The M codebooks are one (M*K) x width table: codebook m is
    rows m*K .. m*K+K-1, so a lookup is two Gathers and a sum (or a reshape) in ONNX too."""

    def __init__(self, num_embeddings: int, embedding_dim: int, num_codebooks: int, codebook_size: int,
                 code_dim: int | None = None, linear: bool = False, padding_idx: int | None = None, product: bool = False):
        super().__init__()
        if product and linear:
            raise ValueError("product codes have no linear map")
        code_dim = code_width(embedding_dim, num_codebooks, product, code_dim)
        if not linear and not product and code_dim != embedding_dim:
            raise ValueError(f"code_dim {code_dim} != embedding dim {embedding_dim} needs linear=True")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.num_codebooks, self.codebook_size, self.code_dim, self.product = num_codebooks, codebook_size, code_dim, product
        self.register_buffer("codes", torch.zeros(num_embeddings, num_codebooks, dtype=code_dtype(codebook_size)))
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks * codebook_size, code_dim))
        self.proj = nn.Linear(code_dim, embedding_dim) if linear else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = lookup_codes(self.codes[input_ids], self.codebooks, self.codebook_size, self.product)
        return self.proj(out) if self.proj is not None else out


class TieredCodeEmbedding(CodeEmbedding):
    """Adaptive code lengths (after Kim et al. 2020), two tiers: every token has M base codes, and the
    `frequent_tokens` most frequent ones also have `extra_codebooks` codes into codebooks of their own
    (K rows each), added to the base embedding. extra_row[t] is token t's row of extra_codes, or
    frequent_tokens (a row that is masked out) when t has no extra codes. Both tiers are additive or
    both are product codes (then each tier concatenates its own slices)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, num_codebooks: int, codebook_size: int,
                 extra_codebooks: int, frequent_tokens: int, padding_idx: int | None = None, product: bool = False):
        super().__init__(num_embeddings, embedding_dim, num_codebooks, codebook_size, padding_idx=padding_idx, product=product)
        self.extra_codebooks, self.frequent_tokens = extra_codebooks, frequent_tokens
        self.register_buffer("extra_row", torch.full((num_embeddings,), frequent_tokens, dtype=code_dtype(frequent_tokens + 1)))
        self.register_buffer("extra_codes", torch.zeros(frequent_tokens + 1, extra_codebooks, dtype=code_dtype(codebook_size)))
        width = code_width(embedding_dim, extra_codebooks, product)
        self.extra_books = nn.Parameter(torch.zeros(extra_codebooks * codebook_size, width))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        row = self.extra_row[input_ids].long()
        extra = lookup_codes(self.extra_codes[row], self.extra_books, self.codebook_size, self.product)
        return super().forward(input_ids) + extra * (row < self.frequent_tokens).unsqueeze(-1).to(extra.dtype)


def byte_bits_table() -> torch.Tensor:
    """[256, 8] float: the bits of each byte value, most significant first."""
    values = torch.arange(256).unsqueeze(1)
    shifts = torch.arange(7, -1, -1).unsqueeze(0)
    return ((values >> shifts) & 1).float()


class BinaryEmbedding(nn.Module):
    """Binarized embeddings (Tissier et al. 2019): token t is `bits` binary digits stored 8 to a byte,
    decoded by a Linear(bits, embedding_dim). Unpacking is a Gather in a 256 x 8 table of bits (a
    persistent buffer: it must exist after any loader, and it exports as a plain Gather)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, padding_idx: int | None = None):
        super().__init__()
        if bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {bits}")
        self.num_embeddings, self.embedding_dim, self.padding_idx, self.bits = num_embeddings, embedding_dim, padding_idx, bits
        self.register_buffer("packed", torch.zeros(num_embeddings, bits // 8, dtype=torch.uint8))
        self.register_buffer("bit_table", byte_bits_table())
        self.decoder = nn.Linear(bits, embedding_dim)

    def unpacked(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[..., bits] float 0/1."""
        bits = self.bit_table[self.packed[input_ids].long()]  # [..., bytes, 8]
        return bits.flatten(-2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.unpacked(input_ids))


# Embedding kinds a manifest may name. Each builder gets (spec, num_embeddings, dim, padding_idx)
# and returns an empty module of the right shapes.
EMBEDDING_BUILDERS = {
    "factorized": lambda spec, n, d, pad: FactorizedEmbedding(n, d, int(spec["rank"]), pad),
    # spec: {"codebooks": M, "codebook_size": K, "code_dim": d, "linear": bool, "layout": "additive" | "product"}
    "codes": lambda spec, n, d, pad: CodeEmbedding(
        n, d, int(spec["codebooks"]), int(spec["codebook_size"]), spec.get("code_dim"), bool(spec.get("linear", False)), pad,
        product=spec.get("layout") == "product",
    ),
    # spec: {"codebooks": M, "codebook_size": K, "extra_codebooks": E, "frequent_tokens": N, "layout": ...}
    "tiered_codes": lambda spec, n, d, pad: TieredCodeEmbedding(
        n, d, int(spec["codebooks"]), int(spec["codebook_size"]), int(spec["extra_codebooks"]), int(spec["frequent_tokens"]), pad,
        product=spec.get("layout") == "product",
    ),
    # spec: {"bits": B}
    "binary": lambda spec, n, d, pad: BinaryEmbedding(n, d, int(spec["bits"]), pad),
}


# ---------------------------------------------------------------------------------------------
# 3. Structural operations (shapes only) and manifest replay
# ---------------------------------------------------------------------------------------------


def new_manifest() -> dict:
    return {"format_version": MANIFEST_FORMAT_VERSION, "ops": []}


def kept_layer_ids(manifest: dict, num_layers: int) -> list[int]:
    """Original indices of the layers still present, in order."""
    dropped = {i for op in manifest.get("ops", []) if op["op"] == "drop_layers" for i in op["layers"]}
    return [i for i in range(num_layers) if i not in dropped]


def kept_head_ids(manifest: dict, original_layer: int, num_heads: int) -> list[int]:
    """Original head ids still present in a layer."""
    keep = list(range(num_heads))
    for op in manifest.get("ops", []):
        if op["op"] == "heads" and op["layer"] == original_layer:
            keep = list(op["keep"])
    return keep


def set_head_count(attention: nn.Module, num_heads: int, head_size: int) -> None:
    """Keep the bookkeeping attributes of an attention module true after its heads change."""
    for attr in ("num_attention_heads", "n_heads"):
        if hasattr(attention, attr):
            setattr(attention, attr, num_heads)
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = num_heads * head_size


def _slice_position_bias(module, args, kwargs):
    """MPNet shares one relative-position bias (one row per ORIGINAL head) across layers; a layer
    with fewer heads must see only the rows of the heads it kept."""
    if "position_bias" in kwargs and kwargs["position_bias"] is not None:
        bias = kwargs["position_bias"]
        kwargs["position_bias"] = bias.index_select(1, torch.tensor(module.shrink_head_ids, device=bias.device))
    elif len(args) > 2 and args[2] is not None:
        ids = torch.tensor(module.shrink_head_ids, device=args[2].device)
        args = (*args[:2], args[2].index_select(1, ids), *args[3:])
    return args, kwargs


def install_head_selection(adapter: Adapter, layer: nn.Module, keep: list[int]) -> None:
    """Architectures with per-head inputs computed outside the layer (MPNet's position bias) need
    to know which original heads a layer kept. A plain attribute, not a buffer: it is structure
    (rebuilt from the manifest), not a weight."""
    if adapter.family != "mpnet":
        return
    attention = get_module(layer, adapter.self_attention)
    if not hasattr(attention, "shrink_head_ids"):
        attention.register_forward_pre_hook(_slice_position_bias, with_kwargs=True)
    attention.shrink_head_ids = list(keep)


def resized(old: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """An empty module of `old`'s kind with new in/out sizes."""
    return kind_of(old).empty_like(old, in_features, out_features)


def headless_attention_for(adapter: Adapter, layer: nn.Module, hidden_size: int) -> HeadlessAttention:
    norm = get_module(layer, adapter.attention_norm) if adapter.attention_norm else None
    device = next(layer.parameters()).device
    return HeadlessAttention(hidden_size, norm, adapter.attention_returns).to(device)


def neuronless_ffn_for(adapter: Adapter, layer: nn.Module, hidden_size: int) -> list[nn.Module]:
    """Replacements for adapter.ffn_blocks, in the same order."""
    norm = get_module(layer, adapter.ffn_norm) if adapter.ffn_norm else None
    device = next(layer.parameters()).device
    out = NeuronlessFFNOutput(hidden_size, norm).to(device)
    return [PassThrough(), out] if len(adapter.ffn_blocks) == 2 else [out]


def layer_has_attention(adapter: Adapter, layer: nn.Module) -> bool:
    return not isinstance(get_module(layer, adapter.attention_block), HeadlessAttention)


def layer_has_ffn(adapter: Adapter, layer: nn.Module) -> bool:
    return not isinstance(get_module(layer, adapter.ffn_blocks[-1]), NeuronlessFFNOutput)


def reshape_heads(adapter: Adapter, config, layer: nn.Module, keep: list[int]) -> None:
    """Give a layer's attention the shapes of `keep` heads (weights left unset)."""
    head_size = getattr(config, adapter.hidden_size_attr) // getattr(config, adapter.num_heads_attr)
    if not keep:  # the stream's width as it is now (a hidden op may have narrowed it)
        width = get_module(layer, adapter.attention_out).out_features
        set_module(layer, adapter.attention_block, headless_attention_for(adapter, layer, width))
        return
    width = len(keep) * head_size
    for path in (adapter.query, adapter.key, adapter.value):
        old = get_module(layer, path)
        set_module(layer, path, resized(old, old.in_features, width))
    old = get_module(layer, adapter.attention_out)
    set_module(layer, adapter.attention_out, resized(old, width, old.out_features))
    set_head_count(get_module(layer, adapter.self_attention), len(keep), head_size)
    install_head_selection(adapter, layer, keep)


def reshape_ffn(adapter: Adapter, config, layer: nn.Module, size: int) -> None:
    """Give a layer's FFN `size` neurons (weights left unset)."""
    if size == 0:  # the stream's width as it is now (a hidden op may have narrowed it)
        width = get_module(layer, adapter.ffn_out).out_features
        for path, module in zip(adapter.ffn_blocks, neuronless_ffn_for(adapter, layer, width)):
            set_module(layer, path, module)
        return
    old_in, old_out = get_module(layer, adapter.ffn_in), get_module(layer, adapter.ffn_out)
    set_module(layer, adapter.ffn_in, resized(old_in, old_in.in_features, size))
    set_module(layer, adapter.ffn_out, resized(old_out, size, old_out.out_features))


def remove_layers(adapter: Adapter, model: nn.Module, positions: list[int]) -> None:
    """Remove layers at CURRENT positions from the layer list."""
    layers = get_module(base_model(model), adapter.layers)
    gone = set(positions)
    set_module(base_model(model), adapter.layers, nn.ModuleList([m for i, m in enumerate(layers) if i not in gone]))


# --- hidden dims (the residual stream) ---------------------------------------------------------

# Task-head modules on the stream, by class-name suffix; paths from the whole model, those present are
# used. "reads": Linears whose input is the stream (BERT's sequence classifier reads the pooler instead,
# and the pooler is the adapter's). MLM: "transform" reads the stream and writes the word-embedding
# space, "norm" normalises that space, and the decoder (the output embeddings, usually tied to the
# word embeddings) reads it: that space is the stream unless ELECTRA projects the embeddings.
HIDDEN_HEADS = {
    "ForSequenceClassification": {"reads": ("classifier.dense", "pre_classifier")},
    "ForTokenClassification": {"reads": ("classifier",)},
    "ForQuestionAnswering": {"reads": ("qa_outputs",)},
    "ForMaskedLM": {
        "transform": ("cls.predictions.transform.dense", "lm_head.dense", "vocab_transform", "generator_predictions.dense"),
        "norm": ("cls.predictions.transform.LayerNorm", "lm_head.layer_norm", "vocab_layer_norm", "generator_predictions.LayerNorm"),
    },
}


def kept_hidden_ids(manifest: dict, hidden: int) -> list[int]:
    """Original hidden dims still present (each hidden op lists them all)."""
    keep = list(range(hidden))
    for op in manifest.get("ops", []):
        if op["op"] == "hidden":
            keep = list(op["keep"])
    return keep


def embeddings_project(adapter: Adapter, model: nn.Module) -> nn.Module | None:
    """ELECTRA's embedding_size -> hidden_size Linear, or None where the embeddings write the stream."""
    base = base_model(model)
    present = adapter.embeddings_project and _has_module(base, adapter.embeddings_project)
    return get_module(base, adapter.embeddings_project) if present else None


def _sliced(owner: nn.Module, name: str, dim: int, index: torch.Tensor, memo: dict) -> None:
    """owner.<name> restricted to `index` along `dim`, as a new Parameter. `memo` (old id -> (old, new))
    gives a tied parameter the same new one, so ties survive; it holds the old ones so ids stay unique."""
    old = getattr(owner, name)
    if old is None:
        return
    if id(old) not in memo:
        new = nn.Parameter(old.detach().index_select(dim, index.to(old.device)).clone(), requires_grad=old.requires_grad)
        memo[id(old)] = (old, new)
    setattr(owner, name, memo[id(old)][1])


def _slice_linear(module: nn.Module, index: torch.Tensor, side: str, memo: dict) -> None:
    """A Linear-like module (MODULE_KINDS) keeps input features (side "columns") or output features
    ("rows") `index`: the parameters its kind slices are replaced, then the size attributes follow."""
    kind = kind_of(module)
    if kind is None:
        raise ValueError(f"cannot slice the hidden dims of a {type(module).__name__}")
    for name, value in getattr(kind, side)(module, index).items():
        owner_path, _, attr = name.rpartition(".")
        owner = get_module(module, owner_path)
        if value.shape != getattr(owner, attr).shape:
            _sliced(owner, attr, 0 if side == "rows" else 1, index, memo)
    for m in reversed(list(module.modules())):  # halves before the pair that holds them
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, LowRankLinear):
            m.in_features, m.out_features = m.first.in_features, m.second.out_features


def _slice_norm(norm: nn.LayerNorm, index: torch.Tensor, memo: dict) -> None:
    _sliced(norm, "weight", 0, index, memo)
    _sliced(norm, "bias", 0, index, memo)
    norm.normalized_shape = (len(index),)


def _slice_embedding(embedding: nn.Embedding, index: torch.Tensor, memo: dict) -> None:
    _sliced(embedding, "weight", 1, index, memo)
    embedding.embedding_dim = len(index)


def slice_hidden(adapter: Adapter, model: nn.Module, index: torch.Tensor) -> None:
    """Keep hidden dims `index` (current positions) of the residual stream everywhere: the embeddings
    (or ELECTRA's embeddings_project rows), per layer the q/k/v and FFN-in input columns, the attention
    and FFN output rows (or a removed block's bias) and every LayerNorm, the pooler's and the task
    head's input columns; MLM heads also their transform rows, norm and decoder columns where the word
    embeddings are the stream. Attention heads keep their size and FFNs their neurons. Values are
    sliced too (the live op and the replay are one code path; a replay's values are then overwritten by
    the strict load). The config keeps the original hidden size: forward passes read only shapes."""
    base, memo = base_model(model), {}
    head = None  # what cannot be sliced is refused before anything is
    if model is not base:
        names = [cls.__name__ for cls in type(model).__mro__]  # a checkpoint's ShrinkModelForTask subclasses the head
        head = next((h for suffix, h in HIDDEN_HEADS.items() if any(n.endswith(suffix) for n in names)), None)
        if head is None:
            raise ValueError(f"no hidden-dim slicing known for the task head of {type(model).__name__}")
    project = embeddings_project(adapter, model)
    if project is None and not isinstance(get_module(base, adapter.word_embeddings), nn.Embedding):
        raise ValueError("compressed word embeddings write the hidden dims; they cannot be sliced")
    if project is not None:
        _slice_linear(project, index, "rows", memo)
    else:
        for m in get_module(base, adapter.embeddings).modules():
            if isinstance(m, nn.Embedding):
                _slice_embedding(m, index, memo)
            elif isinstance(m, nn.LayerNorm):
                _slice_norm(m, index, memo)
    for layer in get_module(base, adapter.layers):
        if layer_has_attention(adapter, layer):
            for path in (adapter.query, adapter.key, adapter.value):
                _slice_linear(get_module(layer, path), index, "columns", memo)
            _slice_linear(get_module(layer, adapter.attention_out), index, "rows", memo)
        else:
            _sliced(get_module(layer, adapter.attention_block), "bias", 0, index, memo)
        if layer_has_ffn(adapter, layer):
            _slice_linear(get_module(layer, adapter.ffn_in), index, "columns", memo)
            _slice_linear(get_module(layer, adapter.ffn_out), index, "rows", memo)
        else:
            _sliced(get_module(layer, adapter.ffn_blocks[-1]), "bias", 0, index, memo)
        for m in layer.modules():  # every LayerNorm inside a layer normalises the stream, in these families
            if isinstance(m, nn.LayerNorm):
                _slice_norm(m, index, memo)
    if adapter.pooler and _has_module(base, adapter.pooler):  # None in models built without it
        _slice_linear(get_module(base, adapter.pooler), index, "columns", memo)
    if head is None:
        return
    present = lambda key: [get_module(model, p) for p in head.get(key, ()) if _has_module(model, p)]  # noqa: E731
    for module in present("reads") + present("transform"):
        _slice_linear(module, index, "columns", memo)
    if head.get("transform") and project is None:  # the word-embedding space is the stream
        for module in present("transform"):
            _slice_linear(module, index, "rows", memo)
        for norm in present("norm"):
            _slice_norm(norm, index, memo)
        _slice_linear(model.get_output_embeddings(), index, "columns", memo)


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


# --- the vocabulary (token ids) ---------------------------------------------------------------

TOKEN_ID_ATTRS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id")


def kept_vocab_ids(manifest: dict, vocab_size: int) -> list[int]:
    """Original token ids still present (the vocab op lists them all)."""
    keep = list(range(vocab_size))
    for op in manifest.get("ops", []):
        if op["op"] == "vocab":
            keep = list(op["keep"])
    return keep


def slice_vocab(adapter: Adapter, model: nn.Module, index: torch.Tensor) -> None:
    """Keep token ids `index` (current ids, ascending): the word-embedding rows and the output layer's
    rows and bias (an MLM decoder; ties survive, and a head's own handle on the decoder bias follows);
    new id i is old id index[i]. The padding index, config.vocab_size and the config's special token
    ids follow (an id not kept becomes None). Values are sliced too (the live op and the replay are
    one code path; a replay's values are then overwritten by the strict load)."""
    base, memo = base_model(model), {}
    embedding = get_module(base, adapter.word_embeddings)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError("compressed word embeddings cannot be cut to a vocabulary; prune the vocabulary first")
    rows, ids = embedding.num_embeddings, [int(i) for i in index.tolist()]
    position = {old: new for new, old in enumerate(ids)}
    output = model.get_output_embeddings() if model is not base else None
    _sliced(embedding, "weight", 0, index, memo)
    embedding.num_embeddings = len(ids)
    if output is not None and output.weight.shape[0] == rows:
        _sliced(output, "weight", 0, index, memo)
        _sliced(output, "bias", 0, index, memo)
        output.out_features = len(ids)
    for module in model.modules():  # e.g. BertLMPredictionHead.bias is the decoder's bias
        for name, value in list(module.named_parameters(recurse=False)):
            if id(value) in memo:
                setattr(module, name, memo[id(value)][1])
    # the token padding id: the embedding's, and RoBERTa-style embeddings' (it finds the positions)
    for module in (embedding, get_module(base, adapter.embeddings)):
        if isinstance(getattr(module, "padding_idx", None), int):
            module.padding_idx = position.get(module.padding_idx)
    for attr in TOKEN_ID_ATTRS:
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(model.config, attr, position.get(value))
    model.config.vocab_size = len(ids)


def low_rank_target(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> tuple[nn.Module, str]:
    """(root, path) of the Linear a low_rank op refers to."""
    base = base_model(model)
    if op.get("layer") is None:
        return base, op["module"]
    layer_ids = kept_layer_ids(manifest, getattr(model.config, adapter.num_layers_attr))
    layers = get_module(base, adapter.layers)
    return layers[layer_ids.index(op["layer"])], op["module"]


def build_embedding(kind: str, spec: dict, old: nn.Embedding) -> nn.Module:
    if kind not in EMBEDDING_BUILDERS:
        raise ValueError(f"unknown embedding kind {kind!r}; known: {sorted(EMBEDDING_BUILDERS)}")
    module = EMBEDDING_BUILDERS[kind](spec, old.num_embeddings, old.embedding_dim, old.padding_idx)
    return module.to(old.weight.device)


# Manifest replay: one entry per op kind, each (adapter, model, manifest so far, op) -> None, giving
# the model the op's shapes.


def current_layer(adapter: Adapter, model: nn.Module, manifest: dict, original: int) -> nn.Module:
    """The layer that was ORIGINAL layer `original`, given the ops replayed so far."""
    layer_ids = kept_layer_ids(manifest, getattr(model.config, adapter.num_layers_attr))
    return get_module(base_model(model), adapter.layers)[layer_ids.index(original)]


def replay_heads(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    reshape_heads(adapter, model.config, current_layer(adapter, model, manifest, op["layer"]), list(op["keep"]))


def replay_ffn(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    reshape_ffn(adapter, model.config, current_layer(adapter, model, manifest, op["layer"]), int(op["size"]))


def replay_drop_layers(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    layer_ids = kept_layer_ids(manifest, getattr(model.config, adapter.num_layers_attr))
    remove_layers(adapter, model, [layer_ids.index(i) for i in op["layers"]])


def replay_low_rank(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    root, path = low_rank_target(adapter, model, manifest, op)
    old = get_module(root, path)
    kind = kind_of(old)  # a LowRankLinear already when it was re-factorized
    if kind is None:
        raise ValueError(f"low_rank op on {path!r}, a {type(old).__name__}, not a Linear")
    new = LowRankLinear(old.in_features, old.out_features, int(op["rank"]), bias=kind.output_bias(old) is not None)
    set_module(root, path, new.to(next(old.parameters()).device))


def replay_embedding(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    base, path = base_model(model), adapter.word_embeddings
    set_module(base, path, build_embedding(op["kind"], op.get("spec", {}), get_module(base, path)))


def replay_hidden(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    before = kept_hidden_ids(manifest, getattr(model.config, adapter.hidden_size_attr))
    missing = [i for i in op["keep"] if i not in before]
    if missing or not op["keep"] or list(op["keep"]) != sorted(set(op["keep"])):
        raise ValueError(f"hidden op keeps dims {missing or op['keep']} that are not present, or not ascending")
    slice_hidden(adapter, model, torch.tensor([before.index(i) for i in op["keep"]], dtype=torch.long))


def replay_vocab(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    keep = list(op["keep"])
    embedding = get_module(base_model(model), adapter.word_embeddings)
    if not isinstance(embedding, nn.Embedding):
        raise ValueError("a vocab op after the word embeddings were replaced")
    if embedding.num_embeddings == len(keep):
        return  # built from the slim config, whose vocab_size is the kept one
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= embedding.num_embeddings:
        raise ValueError(f"vocab op keeps ids that are not present or not ascending (the model has {embedding.num_embeddings})")
    slice_vocab(adapter, model, torch.tensor(keep, dtype=torch.long))


REPLAY = {
    "heads": replay_heads,
    "ffn": replay_ffn,
    "drop_layers": replay_drop_layers,
    "low_rank": replay_low_rank,
    "embedding": replay_embedding,
    "hidden": replay_hidden,
    "vocab": replay_vocab,
}


def apply_manifest(model: nn.Module, manifest: dict) -> None:
    """Replay every recorded op on a model built from the ORIGINAL config, giving it the slim shapes.
    Weights are not restored here; load the checkpoint afterwards, strictly."""
    version = manifest.get("format_version", 0)
    if version > MANIFEST_FORMAT_VERSION:
        raise ValueError(
            f"this checkpoint uses shrink manifest format {version}, newer than {MANIFEST_FORMAT_VERSION}"
        )
    adapter = adapter_for(model.config)
    if adapter is None:
        raise ValueError(f"unsupported model_type {getattr(model.config, 'model_type', None)!r}")
    replayed = {"format_version": version, "ops": []}  # the manifest as of each op
    for op in manifest.get("ops", []):
        replay = REPLAY.get(op["op"])
        if replay is None:
            raise ValueError(f"unknown manifest op {op['op']!r}")
        replay(adapter, model, replayed, op)
        replayed["ops"].append(op)
