"""Shared test helpers: tiny random models of every family, a tiny tokenizer, saved model + data
for CLI runs, and checks used across the test packages (tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import json
import string
import textwrap

import torch

from shrink import surgery

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


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *("##" + c for c in string.ascii_lowercase), *".,!?'\"-;:"]


def tiny_tokenizer():
    """A character-level WordPiece tokenizer with 66 ids, so it fits the tiny models' vocab of 99."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})


SENTENCES = [f"the {w} sat on the mat and thought about {v}." for w in ("cat", "dog", "bird", "fox", "owl") for v in ("rain", "sun", "snow", "fog", "wind", "ice", "dew", "hail")]

# heads-a-star on a tiny model in a few seconds (CLI arguments)
FAST = [
    "--set", "steps.0.target={heads_count: 5}",
    "--set", "steps.0.options.calibration_samples=8",
    "--set", "steps.0.options.max_evaluations=20",
    "--set", "steps.1.options.max_steps=2",
    "--max-samples", "16", "--eval-samples", "8", "--max-length", "32",
]


def write_model_and_data(root):
    """A saved tiny BERT with the tiny tokenizer (root/model) and SENTENCES (root/data.txt)."""
    model = tiny_model("bert")
    model.config.architectures = ["BertModel"]
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(SENTENCES) + "\n")
    return root


def assert_exit(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr


def slim_everything(model):
    """Every kind of op, non-uniform: heads (one layer headless), FFN, a dropped layer, low rank."""
    adapter = surgery.adapter_of(model)
    surgery.prune_heads(model, {0: [0, 2], 1: [], 2: [1, 2, 3]})
    surgery.prune_ffn(model, {0: list(range(20)), 2: [3, 4]})
    surgery.drop_layers(model, [1])
    surgery.factorize_linear(model, f"{adapter.layers}.1.{adapter.ffn_in}", rank=1)
    surgery.factorize_linear(model, f"{adapter.layers}.0.{adapter.query}", rank=5)
    return model


REMOTE = textwrap.dedent(
    """
    import sys, json, torch
    sys.modules["shrink"] = None  # prove the checkpoint does not need shrink
    import transformers
    path, cls_name = sys.argv[1], sys.argv[2]
    model = getattr(transformers, cls_name).from_pretrained(path, trust_remote_code=True).eval()
    inputs = torch.load(path + "/inputs.pt")
    with torch.no_grad():
        out = model(**inputs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save(out, path + "/remote_out.pt")
    """
)


def sharp(model, factor: float = 8.0):
    """Tiny random models (weights std 0.02) barely react to pruning, so their logits hardly move;
    larger matrices make every loss see the difference."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(factor)
    return model


def shrink_process(*args, cwd=None):
    """`shrink ARGS` as a real subprocess (for races and signals), offline, one thread."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", "from shrink.cli import main; main()", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )


def method_context(model, batches=None, evaluation=(), seed: int = 0):
    """A shrink.methods.base.Context on a tiny model: a frozen copy as teacher, unlabeled batches
    (default: three of 4 x 10 tokens), the objective shrink prune would pick."""
    import copy

    from shrink.methods.base import Context
    from shrink.train.objectives import choose_objective

    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    batches = batches if batches is not None else [tiny_inputs(model, batch=4, length=10, seed=s) for s in range(3)]
    return Context(
        model=model, teacher=teacher, tokenizer=None, calibration=batches,
        calibration_batches=lambda n, length, size: batches, evaluation=list(evaluation),
        objective=choose_objective(model, teacher, has_labels=False), has_labels=False, seed=seed,
    )


def labeled_method_context(model, labels=(0, 1, 2, 1), batches: int = 2, length: int = 10, evaluation: int = 0):
    """method_context on `batches` labeled batches (one row per label): the objective is the task
    loss, which is informative at the original model (a distillation loss has no gradient there).
    The first `evaluation` batches double as the held-out ones."""
    from shrink.train.objectives import choose_objective

    data = []
    for seed in range(batches):
        batch = tiny_inputs(model, batch=len(labels), length=length, seed=seed)
        batch["labels"] = torch.tensor(list(labels))
        data.append(batch)
    ctx = method_context(model, data, evaluation=data[:evaluation])
    ctx.objective, ctx.has_labels = choose_objective(model, ctx.teacher, has_labels=True), True
    return ctx


def write_st_files(directory, pooling: dict, modules=("Pooling", "Normalize"), max_seq_length=64):
    """modules.json + module folders of an ST model whose transformer is `directory` itself."""
    entries = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, kind in enumerate(modules, start=1):
        path = f"{i}_{kind}"
        entries.append({"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"})
        (directory / path).mkdir(parents=True, exist_ok=True)
        if kind == "Pooling":
            (directory / path / "config.json").write_text(json.dumps(pooling))
    (directory / "modules.json").write_text(json.dumps(entries))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
