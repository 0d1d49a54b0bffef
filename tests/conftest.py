"""Tiny random models for every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

ARCHITECTURES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet"]


def tiny_config(model_type: str, **overrides):
    import transformers as T

    if model_type == "distilbert":
        config = T.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=37, vocab_size=99, max_position_embeddings=64)
    else:
        cls = {
            "bert": T.BertConfig,
            "roberta": T.RobertaConfig,
            "xlm-roberta": T.XLMRobertaConfig,
            "electra": T.ElectraConfig,
            "mpnet": T.MPNetConfig,
        }[model_type]
        extra = {"embedding_size": 24} if model_type == "electra" else {}
        config = cls(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, vocab_size=99,
            max_position_embeddings=64, **extra,
        )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(model_type: str, task: str = "base", seed: int = 0, num_labels: int = 3):
    """A randomly initialised tiny model; biases and LayerNorms randomised too so that exactness
    tests cannot pass by accident on zeros and ones."""
    import transformers as T

    torch.manual_seed(seed)
    config = tiny_config(model_type, num_labels=2 if task == "qa" else num_labels)  # QA heads emit start/end
    auto = {
        "base": T.AutoModel,
        "seq": T.AutoModelForSequenceClassification,
        "tok": T.AutoModelForTokenClassification,
        "qa": T.AutoModelForQuestionAnswering,
        "mlm": T.AutoModelForMaskedLM,
    }[task]
    model = auto.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_inputs(model, batch: int = 2, length: int = 9, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -3:] = 0  # some padding, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def main_output(output) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if hasattr(output, "start_logits"):
        return torch.cat([output.start_logits, output.end_logits], dim=-1)
    return output.last_hidden_state


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
