"""Task heads: which transformers classes shrink keeps, how to feed them, and where their logits are.

The architecture FAMILIES (where layers, projections and embeddings live) are the adapters of the
shipped runtime (shrink.surgery.runtime.ADAPTERS); this module is the one table of task HEADS.

    TASK_HEADS        class-name suffix -> head kind ("sequence", "token", "qa", "mlm")
    task_head(model)  the head kind, or None for a base (embedding) model
    model_class(cfg)  the transformers class to build for a config (its head if we keep it)
    model_inputs      the tensors of a batch this model's forward accepts
    logits_of         logits of any head ([batch, 2, seq] for QA)
"""

from __future__ import annotations

import inspect
import sys

TASK_HEADS = {
    "ForSequenceClassification": "sequence",
    "ForTokenClassification": "token",
    "ForQuestionAnswering": "qa",
    "ForMaskedLM": "mlm",
}
MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def head_of_class_name(name: str) -> str | None:
    return next((head for suffix, head in TASK_HEADS.items() if name.endswith(suffix)), None)


def task_head(model) -> str | None:
    """"sequence", "token", "qa", "mlm", or None for a base (embedding) model."""
    return head_of_class_name(type(model).__name__)


def head_suffix(model) -> str | None:
    """The class-name suffix of the model's task head ("ForSequenceClassification"), or None."""
    name = type(model).__name__
    return next((suffix for suffix in TASK_HEADS if name.endswith(suffix)), None)


def model_class(config):
    """The transformers class named by config.architectures when it is a head we keep, else the base
    model class."""
    import transformers
    from transformers import AutoModel

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None and head_of_class_name(name):
            return cls
    base = AutoModel._model_mapping[type(config)]
    named = (getattr(config, "architectures", None) or [base.__name__])[0]
    if named != base.__name__:
        print(f"note: task head {named} is not supported; loading the base model {base.__name__}", file=sys.stderr)
    return base


def model_inputs(model, batch: dict) -> dict:
    """The tensors of a batch that this model's forward accepts (DistilBERT and MPNet take no
    token_type_ids; labels are kept out so HF never computes its own loss)."""
    accepted = _forward_parameters(type(model))
    return {k: batch[k] for k in MODEL_KEYS if k in batch and k in accepted}


_PARAMETERS: dict[type, frozenset] = {}


def _forward_parameters(cls) -> frozenset:
    if cls not in _PARAMETERS:
        _PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _PARAMETERS[cls]


def logits_of(output):
    """The logits of a head's output; QA: start and end stacked, [batch, 2, seq]."""
    if getattr(output, "start_logits", None) is not None:
        import torch

        return torch.stack([output.start_logits, output.end_logits], dim=1)
    return output.logits
