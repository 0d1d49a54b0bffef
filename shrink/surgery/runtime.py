"""What a slim model is made of, and how to rebuild one from its manifest.

This file imports only torch and transformers, on purpose: it is copied verbatim into every slim
checkpoint as `modeling_shrink.py`, so `AutoModel.from_pretrained(dir, trust_remote_code=True)` works
on a machine without shrink. shrink itself uses the same code (`shrink.load`), so both paths rebuild
the same modules.

It is organised by its tables:
1. `ADAPTERS`: for each supported architecture family, where it keeps layers, attention projections,
   FFN and embeddings. Nothing else in shrink hard-codes a module path.
2. Replacement modules: a layer with no heads left, an FFN with no neurons left, a rank-r Linear and
   word embeddings stored compactly (factorized, compositional codes, binary codes, a nonlinear
   decomposition; `EMBEDDING_BUILDERS`).
   `MODULE_KINDS`: how each kind of linear module (nn.Linear, LowRankLinear) is sliced, rebuilt and
   priced, so nothing else in shrink branches on the type.
3. `REPLAY` and `apply_manifest(model, manifest)`: one entry per manifest op; apply_manifest replays
   the recorded ops on a freshly built original architecture so that every tensor has the slim shape;
   the weights are then loaded strictly.
4. Sparse weights (`SPARSE_FORMAT`, `read_weights`, `sparse_from_pretrained`): a checkpoint whose
   mostly-zero matrices are stored as a bitmask + their nonzeros is densified here, bit-exactly, by
   shrink.load and by trust_remote_code alike (safetensors, which transformers requires, reads it).

Manifest (the `shrink` section of config.json):
    {"format_version": 1, "ops": [op, ...], ...provenance...}
    format 2 adds "weights_format": "sparse-bitmask-v1" (section 4); a checkpoint is written with the
    lowest format that describes it (`manifest_version`), so a shrink that reads format 1 still reads
    every dense checkpoint and refuses a sparse one with "upgrade" rather than a size mismatch.
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
    {"op": "embedding", "kind": "nonlinear", "spec": {"rank": 40, "width": 384, "activation": "gelu", "residual": true}}
    {"op": "hidden", "keep": [0, 1, 3, ...]}            kept ORIGINAL hidden dims (ascending): the
        residual stream keeps these dims in the embeddings, every layer and the task head; the config
        keeps the original hidden size (a later op's ids still name original dims)
    {"op": "vocab", "keep": [0, 100, 101, ...]}         kept ORIGINAL token ids (ascending): token id i
        of the slim model is original id keep[i], in the word embeddings and a tied or untied output
        layer (MLM decoder rows and bias); unlike the other ops the config follows (vocab_size and its
        special token ids are the new ones), so a model built from the slim config has these shapes
        already and the replay leaves it as it is; at most one vocab op, before any embedding op
    {"op": "tokens", "keep": [1.0, 0.7, 0.5, ...], "restore": true, "significance": "attention", "fill": "state"}
        token pruning (PoWER-BERT): after ORIGINAL layer i a sample keeps its ceil(keep[i] x real
        length) tokens that received the most attention (the first token always, padding never);
        dropped positions in last_hidden_state hold the token's state when dropped (fill "state") or the
        mean of the kept tokens' final states ("kept_mean", for mean pooling; TOKEN_FILLS); no
        weights change, at most one tokens op
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions

MANIFEST_FORMAT_VERSION = 2  # the newest format this file reads (see manifest_version)


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


class NonlinearEmbedding(nn.Module):
    """Distilled nonlinear decomposition (Lioutas et al. 2020): token t is a rank-r code codes[t] and
    its embedding is down(act(up(code))) (+ skip(code), a linear path, when residual): an MLP decoder
    of `width` hidden units shared by all tokens, so the table costs vocab x rank floats."""

    ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, width: int, activation: str = "gelu",
                 residual: bool = True, padding_idx: int | None = None):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(self.ACTIVATIONS)}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.rank, self.width, self.activation, self.residual = rank, width, activation, residual
        self.codes = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.up = nn.Linear(rank, width)
        self.act = self.ACTIVATIONS[activation]()
        self.down = nn.Linear(width, embedding_dim)
        self.skip = nn.Linear(rank, embedding_dim, bias=False) if residual else None

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """[..., rank] codes -> [..., embedding_dim]."""
        out = self.down(self.act(self.up(codes)))
        return out + self.skip(codes) if self.skip is not None else out

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.codes(input_ids))


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
    # spec: {"rank": r, "width": w, "activation": "gelu" | "relu" | "tanh", "residual": bool}
    "nonlinear": lambda spec, n, d, pad: NonlinearEmbedding(
        n, d, int(spec["rank"]), int(spec["width"]), spec.get("activation", "gelu"), bool(spec.get("residual", True)), pad),
}


# ---------------------------------------------------------------------------------------------
# 3. Structural operations (shapes only) and manifest replay
# ---------------------------------------------------------------------------------------------


def new_manifest() -> dict:
    return {"format_version": 1, "ops": []}


def manifest_version(manifest: dict) -> int:
    """The lowest manifest format that describes `manifest`: 2 when its weights are stored sparse."""
    return 2 if manifest.get("weights_format") else 1


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


# --- tokens (PoWER-BERT token pruning with drop-and-restore) -----------------------------------

# Per-base-class subclasses whose forward prunes tokens; one class per encoder class, made on demand.
TOKEN_ENCODER_CLASSES: dict[type, type] = {}
TOKEN_SIGNIFICANCE = ("attention",)  # what a tokens op may rank tokens by
# What a dropped token's position holds in last_hidden_state: "state", its hidden state after the layer
# that dropped it (Length-Adaptive's drop-and-restore: token heads still see each token); "kept_mean",
# the mean of the sample's kept tokens' final states, so mean pooling over the attention mask is the
# mean over the kept tokens (embedding models: restored earlier-layer states do not mix with final ones)
TOKEN_FILLS = ("state", "kept_mean")


def encoder_of(adapter: Adapter, model: nn.Module) -> nn.Module:
    """The module that owns the layer list (BertEncoder, DistilBERT's Transformer, ...)."""
    return get_module(base_model(model), adapter.layers.rpartition(".")[0])


def key_padding(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """[B, S] 1.0 for real tokens, 0.0 for padding, from the mask the encoder got: None (no padding),
    a 2D 0/1 mask, or a 4D bool (True = attend) or additive (0 = attend) mask whose first query row
    is the key padding of a bidirectional encoder."""
    if attention_mask is None:
        return hidden.new_ones(hidden.shape[:2])
    row = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask
    if row.dtype == torch.bool:
        return row.to(hidden.dtype)
    if attention_mask.dim() == 2:
        return (row > 0).to(hidden.dtype)
    return (row > torch.finfo(row.dtype).min / 2).to(hidden.dtype)


def additive_mask(real: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, S] additive mask (0 for real keys, the dtype's minimum for padding); eager and sdpa
    attention both take it."""
    return ((1.0 - real) * torch.finfo(real.dtype).min)[:, None, None, :]


def token_significance(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, head_size: int,
                       position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """PoWER-BERT significance [B, S]: the attention probability each key receives, summed over heads
    and over real queries, from the layer's own projected queries and keys [B, S, heads*head_size]
    (eager math, whatever attention kernel the layer ran). `position_bias`: MPNet's [B, heads, S, S]."""
    batch, length = q.shape[0], q.shape[1]
    q = q.view(batch, length, -1, head_size).transpose(1, 2)
    k = k.view(batch, length, -1, head_size).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * head_size**-0.5
    if position_bias is not None:
        scores = scores + position_bias
    probs = torch.softmax(scores + additive_mask(real), dim=-1)
    # the sum over real queries as a product (a MatMul, much faster in onnxruntime than a ReduceSum)
    received = torch.matmul(real[:, None, None, :].expand(-1, probs.shape[1], 1, -1), probs)
    return received.sum(dim=1)[:, 0, :]


def kept_slots(significance: torch.Tensor, real: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, k_max], real [B, k_max]): per sample the `count` most significant real slots, slot 0
    (the first token) always among them, in their original order, padded to the batch's largest count
    with other slots marked as padding. Sorts and gathers only, with shapes taken from tensors, so the
    ONNX graph keeps dynamic batch and sequence axes."""
    length = significance.shape[1]
    slots = torch.arange(length, device=significance.device)
    score = significance.masked_fill(real == 0, float("-inf"))
    score = torch.where(slots[None, :] == 0, torch.full_like(score, float("inf")), score)
    order = score.argsort(dim=1, descending=True)
    rank = torch.zeros_like(order).scatter(1, order, slots[None, :].expand_as(order))
    keep = rank < count[:, None]
    index = (slots[None, :] + length * (~keep).long()).argsort(dim=1)  # kept slots first, in order
    widest = torch.arange(count.max(), device=significance.device)  # a Range on a tensor: no frozen size
    return index.index_select(1, widest), (widest[None, :] < count[:, None]).to(real.dtype)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, S, ...] at slots index [B, k] along dim 1 (row copies: GatherND in ONNX)."""
    rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
    return x[rows, index]


def write_back(full: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """full [B, S + 1, H] with the real slots of hidden [B, k, H] written at their original positions
    [B, k] (distinct within a row); padding slots write to the spare last row, which the caller drops
    (row copies, ScatterND in ONNX, and no read of `full`)."""
    spare = torch.full_like(positions, full.shape[1] - 1)
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
    return full.index_put((rows, torch.where(real > 0, positions, spare)), hidden)


class TokenPruningEncoder:
    """Mixed into an encoder's own class (TOKEN_ENCODER_CLASSES), so its parameters keep their names:
    after each layer with a kept fraction f < 1, a sample of real length L keeps its ceil(f * L)
    most significant tokens (token_significance; the first token always, padding never), at most as
    many as it has; f counts ORIGINAL real tokens, so later layers see at most that share. Each
    sample keeps its own count: the batch is compacted to its largest count [B, k_max, H] with an
    updated mask, so a padded batch gives each sample what it gets alone. Drop-and-restore: a dropped
    token's hidden state (after the layer that dropped it) is written back at its original position,
    so last_hidden_state stays [B, S, H]. Nothing is pruned after the last layer (restore makes it a
    no-op) or after a layer without heads (no attention to measure significance with).
    `shrink_tokens`: {"keep": [fraction per ORIGINAL layer], "restore": True}; `shrink_config`: the
    model config (its manifest names the layers still present)."""

    shrink_tokens: dict
    shrink_config: object

    def token_steps(self) -> dict[int, float]:
        """Current layer position -> kept fraction after it, for the layers that prune (a lower
        fraction than the layer before, or a threshold)."""
        adapter, config = adapter_for(self.shrink_config), self.shrink_config
        ids = kept_layer_ids(getattr(config, "shrink", None) or {}, getattr(config, adapter.num_layers_attr))
        layers = get_module(self, adapter.layers.rpartition(".")[2])
        keep, steps, current = self.shrink_tokens["keep"], {}, 1.0
        thresholds = self.shrink_tokens.get("thresholds") or [0.0] * len(keep)
        soft = self.shrink_tokens.get("soft") is not None
        for position, original in enumerate(ids[: len(layers) - 1]):
            if (keep[original] < current or soft or float(thresholds[original]) > 0) and layer_has_attention(adapter, layers[position]):
                steps[position] = current = min(current, float(keep[original]))
        return steps

    def token_threshold(self, position: int):
        """The threshold (hard) or the learned parameter (soft) of the layer at `position`, or None."""
        adapter, config = adapter_for(self.shrink_config), self.shrink_config
        original = kept_layer_ids(getattr(config, "shrink", None) or {}, getattr(config, adapter.num_layers_attr))[position]
        soft = self.shrink_tokens.get("soft")
        if soft is not None:
            return soft["thresholds"][original]
        thresholds = self.shrink_tokens.get("thresholds")
        return float(thresholds[original]) if thresholds and float(thresholds[original]) > 0 else None

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        steps = self.token_steps()
        if not steps:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("token pruning works on encoders only (no cross-attention)")
        config = self.shrink_config
        adapter = adapter_for(config)
        head_size = getattr(config, adapter.hidden_size_attr) // getattr(config, adapter.num_heads_attr)
        layers = get_module(self, adapter.layers.rpartition(".")[2])
        batch, length = hidden_states.shape[:2]
        real = key_padding(attention_mask, hidden_states)
        original_length = real.sum(dim=1)
        positions = torch.arange(length, device=hidden_states.device)[None, :].expand(batch, length)
        bias = self.compute_position_bias(hidden_states) if adapter.family == "mpnet" else None
        hidden, mask = hidden_states, attention_mask
        full = torch.cat([hidden_states, hidden_states[:, :1]], dim=1)  # + a spare row for padding slots
        keep_states = self.shrink_tokens.get("fill", "state") == "state"
        soft = self.shrink_tokens.get("soft")  # {"thresholds": [param per original layer], "temperature": T}
        weight, restored, work, counts = real, torch.zeros_like(hidden_states), [], []
        for position, layer in enumerate(layers):
            captured = {}
            hooks = []
            if position in steps:
                for name in ("query", "key"):  # the layer's own projections, whatever module kind holds them
                    module = get_module(layer, getattr(adapter, name))
                    hooks.append(module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o)))
            try:
                out = layer(hidden, mask, bias) if adapter.family == "mpnet" else layer(hidden, mask)
            finally:
                for hook in hooks:
                    hook.remove()
            hidden = out[0] if isinstance(out, tuple) else out
            if position not in steps:
                continue
            layer_bias = bias
            heads = getattr(get_module(layer, adapter.self_attention), "shrink_head_ids", None)
            if bias is not None and heads is not None:  # MPNet rows of the heads this layer kept
                layer_bias = bias.index_select(1, torch.tensor(heads, device=bias.device))
            significance = token_significance(captured["query"], captured["key"], real, head_size, layer_bias)
            threshold = self.token_threshold(position)
            if soft is not None:  # training: no token leaves, each is weighted by how kept it is
                # received attention per head: 1.0 for a token that gets the average share (LTP's score, length-free)
                score = significance / (captured["query"].shape[-1] // head_size)
                kept = torch.sigmoid((score - threshold) / soft["temperature"]) * real
                kept = torch.where(positions == 0, real, kept)  # the first token stays
                weight_now = weight * kept
                if keep_states:  # what leaves now is restored as this layer's state
                    restored = restored + (weight - weight_now)[:, :, None] * hidden
                weight = weight_now
                work.append(weight.sum(dim=1) / original_length)
                mask = additive_mask(real) + torch.log(weight.clamp_min(1e-6))[:, None, None, :] * real[:, None, None, :]
                continue
            count = torch.ceil(original_length * steps[position] - 1e-4).clamp(min=1)
            if threshold is not None:  # LTP: the tokens whose received attention per head is at least the threshold
                score = significance / (captured["query"].shape[-1] // head_size)
                above = ((score >= threshold) | (positions == 0)) & (real > 0)  # the first token counts as kept
                count = torch.minimum(count, above.sum(dim=1).to(count.dtype))
            count = torch.minimum(count, real.sum(dim=1)).long()
            counts.append(count)
            if keep_states:
                full = write_back(full, hidden, positions, real)
            index, real = kept_slots(significance, real, count)
            hidden, positions = gather_tokens(hidden, index), positions.gather(1, index)
            if bias is not None:
                bias = bias.gather(2, index[:, None, :, None].expand(-1, bias.shape[1], -1, bias.shape[3]))
                bias = bias.gather(3, index[:, None, None, :].expand(-1, bias.shape[1], bias.shape[2], -1))
            mask = additive_mask(real)
        # what the family's own encoder returns (BertModel reads .cache; DistilBERT returns it as is)
        output = BaseModelOutput if adapter.family == "distilbert" else BaseModelOutputWithPastAndCrossAttentions
        if soft is not None:
            # the share of each sample's tokens the layers process (the first layer all), for a penalty
            self.shrink_soft_work = (1 + sum(work) + (len(layers) - 1 - len(work)) * (work[-1] if work else 1)) / len(layers)
            if keep_states:
                return output(last_hidden_state=restored + weight[:, :, None] * hidden)
            mean = (hidden * weight[:, :, None]).sum(dim=1) / weight.sum(dim=1, keepdim=True)
            return output(last_hidden_state=weight[:, :, None] * hidden + (real - weight)[:, :, None] * mean[:, None, :])
        self.shrink_kept_counts = (original_length, counts)  # what the last batch kept (for reports)
        if not keep_states:  # every position the mean of the kept tokens; theirs are written back next
            mean = (hidden * real[:, :, None]).sum(dim=1) / real.sum(dim=1, keepdim=True)
            full = mean[:, None, :].expand_as(full)
        return output(last_hidden_state=write_back(full, hidden, positions, real)[:, :length])


def check_token_keep(keep, num_layers: int) -> list[float]:
    """A tokens op's fractions: one per ORIGINAL layer, each in (0, 1]."""
    if not isinstance(keep, (list, tuple)) or len(keep) != num_layers:
        raise ValueError(f"a tokens op keeps one fraction per original layer ({num_layers}), got {keep!r}")
    values = [float(f) for f in keep]
    if not all(0 < f <= 1 for f in values):
        raise ValueError(f"kept token fractions must be in (0, 1], got {values}")
    return values


def install_token_pruning(adapter: Adapter, model: nn.Module, keep: list[float], restore: bool = True,
                          significance: str = "attention", fill: str = "state", thresholds: list[float] | None = None) -> None:
    """Make the encoder prune tokens (TokenPruningEncoder) with `keep`, one fraction per ORIGINAL
    layer. Only drop-and-restore is built: without restore a task head would need to be told which
    tokens are left."""
    if not restore:
        raise ValueError("token pruning without restore is not supported (the output keeps its [batch, sequence] shape)")
    if significance not in TOKEN_SIGNIFICANCE:
        raise ValueError(f"unknown token significance {significance!r}; known: {list(TOKEN_SIGNIFICANCE)}")
    if fill not in TOKEN_FILLS:
        raise ValueError(f"unknown token fill {fill!r}; known: {list(TOKEN_FILLS)}")
    keep = check_token_keep(keep, getattr(model.config, adapter.num_layers_attr))
    encoder = encoder_of(adapter, model)
    if adapter.family == "mpnet" and not hasattr(encoder, "compute_position_bias"):
        raise ValueError("this MPNet encoder has no compute_position_bias; token pruning cannot rebuild its position bias")
    cls = type(encoder)
    if not isinstance(encoder, TokenPruningEncoder):
        if cls not in TOKEN_ENCODER_CLASSES:
            TOKEN_ENCODER_CLASSES[cls] = type(f"TokenPruning{cls.__name__}", (TokenPruningEncoder, cls), {})
        encoder.__class__ = TOKEN_ENCODER_CLASSES[cls]
    encoder.shrink_tokens = {"keep": keep, "restore": True, "significance": significance, "fill": fill}
    if thresholds is not None:
        if len(thresholds) != len(keep) or not all(float(t) >= 0 for t in thresholds):
            raise ValueError(f"a tokens op's thresholds are one number >= 0 per original layer ({len(keep)}), got {thresholds!r}")
        encoder.shrink_tokens["thresholds"] = [float(t) for t in thresholds]
    encoder.shrink_config = model.config


def token_keep(adapter: Adapter, model: nn.Module) -> list[float] | None:
    """The kept fractions (per ORIGINAL layer) of a token-pruned model, or None."""
    encoder = encoder_of(adapter, model)
    return list(encoder.shrink_tokens["keep"]) if isinstance(encoder, TokenPruningEncoder) else None


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



def replay_tokens(adapter: Adapter, model: nn.Module, manifest: dict, op: dict) -> None:
    if any(o["op"] == "tokens" for o in manifest.get("ops", [])):
        raise ValueError("a second tokens op (a model prunes tokens by one schedule)")
    install_token_pruning(adapter, model, op["keep"], bool(op.get("restore", True)), op.get("significance", "attention"), op.get("fill", "state"),
                          op.get("thresholds"))

REPLAY = {
    "heads": replay_heads,
    "ffn": replay_ffn,
    "drop_layers": replay_drop_layers,
    "low_rank": replay_low_rank,
    "embedding": replay_embedding,
    "hidden": replay_hidden,
    "vocab": replay_vocab,
    "tokens": replay_tokens,
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


# ---------------------------------------------------------------------------------------------
# 4. Sparse weights
# ---------------------------------------------------------------------------------------------
#
# sparse-bitmask-v1, inside an ordinary safetensors file. A matrix W stored sparse becomes:
#     W                  its nonzeros, 1-D, W's dtype, in row-major (C) order
#     W + SPARSE_MASK    uint8, ceil(numel / 8) bytes: bit i (numpy.packbits order: element 0 is the
#                        most significant bit of byte 0) is 1 where element i of W.flatten() != 0
#     W + SPARSE_SIGNS   only when some zero of W is -0.0 (masking by multiplication leaves one where
#                        a weight was negative): the same bit order over W's zeros, 1 for -0.0
# and the file's metadata holds {SPARSE_KEY: SPARSE_FORMAT, SPARSE_SHAPES_KEY: json {name: shape}}.
# Every tensor comes back bit-identical (NaN is a nonzero, -0.0 keeps its sign). Keeping W's own
# name for the 1-D nonzeros makes a loader that knows nothing of the format fail with a size
# mismatch instead of silently initialising W afresh.

SPARSE_FORMAT = "sparse-bitmask-v1"
SPARSE_MASK = ".sparse_mask"
SPARSE_SIGNS = ".sparse_signs"
SPARSE_KEY = "shrink_weights_format"
SPARSE_SHAPES_KEY = "shrink_sparse_shapes"


def unpack_mask(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of numpy.packbits-ordered bytes, as a bool tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:count].bool()


def unpack_exactly(packed: torch.Tensor | None, count: int, what: str) -> torch.Tensor:
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise ValueError(f"{what} is missing or is not {(count + 7) // 8} uint8 bytes")
    return unpack_mask(packed, count)


def densify(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse-bitmask-v1 file's tensors (`shapes`: the sparse ones')."""
    import math

    if not isinstance(shapes, dict) or not all(
        isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape) for shape in shapes.values()
    ):
        raise ValueError(f"the file's {SPARSE_SHAPES_KEY} metadata is not a mapping of names to shapes")
    parts = {name + suffix for name in shapes for suffix in (SPARSE_MASK, SPARSE_SIGNS)}
    dense = {name: t for name, t in tensors.items() if name not in parts}
    for name, shape in shapes.items():
        count, values = math.prod(shape), tensors.get(name)
        mask = unpack_exactly(tensors.get(name + SPARSE_MASK), count, f"the bitmask of sparse tensor {name}")
        stored = int(mask.sum())
        if values is None or values.dim() != 1 or values.numel() != stored:
            raise ValueError(f"sparse tensor {name}: its bitmask marks {stored} values, the file has {None if values is None else values.numel()}")
        full = torch.zeros(count, dtype=values.dtype)
        full[mask] = values
        if name + SPARSE_SIGNS in tensors:
            negative = unpack_exactly(tensors[name + SPARSE_SIGNS], count - stored, f"the zero signs of sparse tensor {name}")
            full[~mask] = torch.zeros(count - stored, dtype=values.dtype).masked_fill_(negative, -0.0)
        dense[name] = full.reshape(shape)
    return dense


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, dense: a sparse-bitmask-v1 file is densified."""
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    kind = metadata.get(SPARSE_KEY)
    if kind is None:
        return tensors
    if kind != SPARSE_FORMAT:
        raise ValueError(f"{path} stores its weights as {kind!r}; this runtime reads {SPARSE_FORMAT!r} (a newer shrink wrote it)")
    return densify(tensors, json.loads(metadata.get(SPARSE_SHAPES_KEY, "{}")))


HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def sparse_from_pretrained(load, path, *args, config=None, **kwargs):
    """transformers' `from_pretrained` (the bound `load`) for a checkpoint whose manifest says its
    weights are stored sparse: the file is densified here and handed to transformers as a state dict,
    strictly (a missing, unexpected or mis-shaped weight is an error, never a fresh initialisation).
    Any other checkpoint goes to `load` exactly as it was called."""
    import os

    from transformers import AutoConfig
    from transformers.utils import cached_file

    hub = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    given, rest = config, kwargs
    if config is None or isinstance(config, (str, os.PathLike)):  # AutoModel passes the config it read
        config, rest = AutoConfig.from_pretrained(config or path, return_unused_kwargs=True, **hub, **kwargs)
    kind = (getattr(config, "shrink", None) or {}).get("weights_format")
    if kind is None:
        return load(path, *args, config=given, **hub, **kwargs)
    if kind != SPARSE_FORMAT:
        raise ValueError(f"{path} stores its weights as {kind!r}; this runtime reads {SPARSE_FORMAT!r} (a newer shrink wrote it)")
    state = read_weights(cached_file(path, "model.safetensors", **hub))
    wanted = rest.pop("output_loading_info", False)
    # the file is resolved already, and transformers takes a state dict only without a path
    model, info = load(None, *args, config=config, state_dict=state, output_loading_info=True, **rest)
    wrong = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(k)}
    if wrong:
        raise ValueError(f"{path}: the sparse weights do not fit the model: {wrong}"[:500])
    return (model, info) if wanted else model
