"""sentence-transformers models: read how a model turns token states into a sentence embedding, use
that pooling everywhere, and write it back beside a slim checkpoint.

A sentence-transformers (ST) directory is an HF model plus `modules.json`, which lists the modules
run after the transformer: Pooling (mean, cls, max, mean_sqrt_len_tokens, weightedmean, lasttoken;
several modes are concatenated), optional Dense layers and Normalize; `sentence_bert_config.json`
holds max_seq_length. `read_pooling(ref)` gives a `SentencePooling` (None for a plain HF model);
`attach(model, pooling)` keeps it on the model object, so the objectives, `shrink eval` and the
reports read it with `pooling_of(model)` (plain models: mean pooling, as before). The files come
through transformers' `cached_file`, so a hub model's ST files load like its config, offline from
the cache.

`write_modules(directory, pooling, width)` copies the ST files into a slim checkpoint, so
`SentenceTransformer(out, trust_remote_code=True)` loads the same kind of model; `SentenceEmbedder`
wraps a model into one that outputs the pooled `sentence_embedding` (the `--pooling-in-graph` ONNX).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from shrink.errors import BadInputError, CorruptCheckpointError

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_MODES = {  # ST < 5 wrote one boolean per mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ROOT_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
POOLING_ATTR = "shrink_sentence_pooling"


@dataclass(eq=False)
class Dense:
    """An ST Dense module: activation(x @ weight.T + bias), applied after pooling."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: str  # a torch.nn class name (Tanh, Identity, ...)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.device, x.dtype), None if self.bias is None else self.bias.to(x.device, x.dtype))
        return getattr(nn, self.activation)()(y)


@dataclass(eq=False)
class SentencePooling:
    """How token states become one embedding. The default (no ST files) is mean pooling."""

    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    normalize: bool = False
    dense: tuple[Dense, ...] = ()
    max_seq_length: int | None = None
    source: str | None = None  # the directory the ST files were read from (None: not an ST model)
    modules: list = field(default_factory=list)  # modules.json entries

    @property
    def is_sentence_transformer(self) -> bool:
        return self.source is not None

    def embed(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[batch, seq, dim] token states and [batch, seq] mask -> [batch, out] sentence embeddings,
        as sentence-transformers computes them (Pooling, then Dense layers, then Normalize)."""
        vectors = torch.cat([pool(mode, hidden, mask) for mode in self.modes], dim=-1)
        for dense in self.dense:
            vectors = dense(vectors)
        return F.normalize(vectors, p=2, dim=-1) if self.normalize else vectors

    def summary(self) -> dict:
        """What reports and the model card say about it."""
        return {
            "pooling": "+".join(self.modes),
            "normalize": self.normalize,
            "dense_modules": len(self.dense),
            "max_seq_length": self.max_seq_length,
            "include_prompt": self.include_prompt,
        }


MEAN = SentencePooling()


def pool(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One ST pooling mode (sentence_transformers Pooling._forward_padded, right or left padding)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":  # the first real token (with left padding, not position 0)
        first = mask.to(torch.int64).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    if mode == "max":
        return hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        count = weights.sum(dim=1).clamp(min=1e-9)
        return (hidden * weights).sum(dim=1) / (count if mode == "mean" else count.sqrt())
    if mode == "weightedmean":  # weight i for the i-th real token
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
        positions = positions - mask.to(torch.int64).argmax(dim=1).view(-1, 1, 1).to(hidden.dtype)
        weighted = weights * positions
        return (hidden * weighted).sum(dim=1) / weighted.sum(dim=1).clamp(min=1e-9)
    if mode == "lasttoken":
        values, flipped = mask.flip(1).max(dim=1)
        last = torch.where(values == 0, hidden.shape[1] - 1, hidden.shape[1] - 1 - flipped)
        return (hidden * weights)[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling mode {mode!r}")


def pooling_of(model) -> SentencePooling:
    """The model's sentence pooling: what `attach` stored, else mean pooling."""
    return getattr(model, POOLING_ATTR, None) or MEAN


def attach(model, pooling: SentencePooling | None) -> None:
    if pooling is not None:
        object.__setattr__(model, POOLING_ATTR, pooling)  # a plain attribute (not a submodule): deepcopy keeps it


# --- reading ------------------------------------------------------------------------------------


def _file(ref: str, name: str) -> Path | None:
    """A file of a local directory or a (cached) hub model, or None when it has none."""
    local = Path(ref) / name
    if Path(ref).is_dir():
        return local if local.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(ref, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _json(path: Path, ref: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptCheckpointError(f"cannot read {path.name} of the sentence-transformers model {ref}: {reason}") from None


def _modes(config: dict, where: str) -> tuple[str, ...]:
    if "pooling_mode" in config:
        raw = config["pooling_mode"]
        modes = (raw,) if isinstance(raw, str) else tuple(raw)
    else:
        modes = tuple(mode for key, mode in _LEGACY_MODES.items() if config.get(key))
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise BadInputError(f"{where}: pooling mode {unknown or 'none'} is not one shrink knows", hint=f"known: {', '.join(MODES)}")
    return modes


def _dense(ref: str, path: str) -> Dense:
    from safetensors.torch import load_file

    config_file = _file(ref, f"{path}/config.json")
    if config_file is None:
        raise CorruptCheckpointError(f"the Dense module {path} of {ref} has no config.json")
    config = _json(config_file, ref)
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if not isinstance(getattr(nn, activation, None), type):
        raise BadInputError(f"the Dense module {path} of {ref} uses activation {activation!r}, which is not a torch.nn module")
    weights_file = _file(ref, f"{path}/model.safetensors")
    if weights_file is not None:
        state = load_file(str(weights_file))
    else:
        pickled = _file(ref, f"{path}/pytorch_model.bin")
        if pickled is None:
            raise CorruptCheckpointError(f"the Dense module {path} of {ref} has no weights")
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    weight = state.get("linear.weight")
    if weight is None:
        raise CorruptCheckpointError(f"the Dense module {path} of {ref} has no linear.weight")
    return Dense(weight.float(), state.get("linear.bias"), activation)


def read_pooling(ref: str) -> SentencePooling | None:
    """The sentence pooling of an ST model (local directory or hub id), or None when `ref` has no
    modules.json. Modules shrink cannot follow are refused in one line, not silently mean-pooled."""
    modules_file = _file(ref, "modules.json")
    if modules_file is None:
        return None
    modules = _json(modules_file, ref)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CorruptCheckpointError(f"modules.json of {ref} is not a list of modules")
    pooling = SentencePooling(modes=(), source=ref, modules=modules)
    for module in modules:
        kind, path = str(module["type"]).rsplit(".", 1)[-1], module.get("path", "")
        if kind == "Transformer":
            if path:
                raise BadInputError(f"{ref} keeps its transformer in {path}/, not at the top of the directory", hint=f"pass {Path(ref) / path} as the model")
            continue
        if kind == "Pooling":
            config = _json(_file(ref, f"{path}/config.json") or Path(ref) / path / "config.json", ref)
            pooling.modes = _modes(config, f"{ref}/{path}/config.json")
            pooling.include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Dense":
            pooling.dense += (_dense(ref, path),)
        elif kind == "Normalize":
            pooling.normalize = True
        else:
            raise BadInputError(f"{ref} has a sentence-transformers {kind} module, which shrink does not support", hint="supported: Transformer, Pooling, Dense, Normalize")
    if not pooling.modes:
        raise BadInputError(f"{ref}: modules.json lists no Pooling module")
    config_file = _file(ref, "sentence_bert_config.json")
    if config_file is not None:
        length = _json(config_file, ref).get("max_seq_length")
        pooling.max_seq_length = int(length) if isinstance(length, int) and length > 0 else None
    return pooling


# --- writing ------------------------------------------------------------------------------------


def write_modules(directory: Path, pooling: SentencePooling, width: int) -> None:
    """Copy the ST files of `pooling.source` into a slim checkpoint: modules.json, the ST configs and
    every module folder (Pooling, Dense, Normalize), with the pooled width set to the slim hidden
    size `width` (it changes when hidden dims were pruned)."""
    if not pooling.is_sentence_transformer:
        return
    for name in ROOT_FILES:
        found = _file(pooling.source, name)
        if found is not None:
            shutil.copyfile(found, directory / name)
    for module in pooling.modules:
        path = module.get("path", "")
        if not path:
            continue
        target = directory / path
        target.mkdir(parents=True, exist_ok=True)
        kind = str(module["type"]).rsplit(".", 1)[-1]
        names = {"Pooling": ["config.json"], "Dense": ["config.json", "model.safetensors", "pytorch_model.bin"], "Normalize": ["config.json"]}[kind]
        for name in names:
            found = _file(pooling.source, f"{path}/{name}")
            if found is not None:
                shutil.copyfile(found, target / name)
        if kind == "Pooling":
            config = _json(target / "config.json", pooling.source)
            for key in ("word_embedding_dimension", "embedding_dimension"):
                if key in config:
                    config[key] = width
            (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def check_hidden_pruning(model) -> None:
    """A Dense module after pooling reads every original hidden dim, and concatenated pooling modes
    are not one dim per hidden dim: refuse to narrow the stream of such a model."""
    pooling = pooling_of(model)
    if pooling.dense or len(pooling.modes) > 1:
        what = "a Dense module after pooling" if pooling.dense else f"{len(pooling.modes)} pooling modes concatenated"
        raise BadInputError(f"this sentence-transformers model has {what}, which hidden-dim pruning cannot follow", hint="prune heads, FFN or layers instead")


class SentenceEmbedder(nn.Module):
    """A model whose output is the pooled (dense, normalized) `sentence_embedding`, for an ONNX
    that needs no Python around it."""

    def __init__(self, model, pooling: SentencePooling):
        super().__init__()
        self.model, self.pooling = model, pooling
        self.config = model.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from types import SimpleNamespace

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        return SimpleNamespace(sentence_embedding=self.pooling.embed(hidden, attention_mask))
