"""Evaluation: the task metric and fidelity to a teacher, for torch models and ONNX files alike.

    evaluate(model, batches, teacher=None) -> dict
    evaluate(model, examples=..., tokenizer=...) -> dict   (batches built here)

Metrics, each present only when it applies:
    accuracy, macro_f1      classification head + class labels
    spearman                numeric scores: a regression head's output, or for an embedding model
                            with sentence pairs, the cosine of the two embeddings
    top1_agreement          share of argmax predictions equal to the teacher's (task heads)
    logits_kl               mean KL(teacher || model) of the softmax outputs (task heads)
    embedding_cosine        mean cosine of sentence embeddings with the teacher's (base models; each
                            pooled as the model pools: its sentence-transformers modules, else mean)
    neighbour_recall        share of each text's k nearest neighbours under the teacher (cosine, the
                            other evaluation texts) that are also among its k nearest under the model:
                            what a search index built on the model keeps (base models; k in neighbour_k)

`model` and `teacher` are torch models or paths to .onnx files (run with onnxruntime, same metrics).
A batch may carry the teacher's own tokenization of its rows under batch["teacher"] (the student's
vocabulary was pruned): the teacher then reads that, and fidelity compares per text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shrink.arch import logits_of, model_inputs, task_head
from shrink.console import progress as progress_bar
from shrink.data.examples import make_batches
from shrink.errors import BadInputError, CorruptCheckpointError
from shrink.measure.onnx_session import checkpoint_dir, graph_feed, session
from shrink.models.hub import load_model
from shrink.models.sentence import MEAN, pooling_of, read_pooling
from shrink.train.device import to_device

# --- runners: one call per batch, the same answers from torch and ONNX -------------------------


class TorchRunner:
    def __init__(self, model):
        self.model = model.eval()
        self.kind = "embedding" if task_head(model) is None else "logits"
        self.config = model.config
        self.device = next(model.parameters()).device
        self.pooling = pooling_of(model)

    def embed(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states -> the model's sentence embedding (its own pooling)."""
        return self.pooling.embed(out, mask)

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        """logits for a task head, else the last hidden state."""

        output = self.model(**to_device(model_inputs(self.model, batch), self.device))
        result = output.last_hidden_state if self.kind == "embedding" else logits_of(output)
        return result.float().cpu()


class OnnxRunner:
    """An exported model run by onnxruntime. Feeds only the inputs the graph declares; reads the
    output named `logits` (task heads), `last_hidden_state` (base models; pooled as the checkpoint
    the file sits in pools, see shrink.models.sentence) or `sentence_embedding` (pooled in the graph)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"ONNX file {path} does not exist")
        self.session = session(path, threads=None)  # evaluation: throughput, all cores
        self.inputs = [i.name for i in self.session.get_inputs()]
        checkpoint = checkpoint_dir(path)
        self.config = _sibling_config(checkpoint, path)  # for label names
        self.pooling = (read_pooling(str(checkpoint)) if checkpoint else None) or MEAN
        outputs = [o.name for o in self.session.get_outputs()]
        if "logits" in outputs:
            self.output, self.kind = "logits", "logits"
        elif "sentence_embedding" in outputs:
            self.output, self.kind, self.pooling = "sentence_embedding", "embedding", None
        elif "last_hidden_state" in outputs:
            self.output, self.kind = "last_hidden_state", "embedding"
        else:
            raise BadInputError(f"{path} has outputs {outputs}; expected `logits`, `last_hidden_state` or `sentence_embedding`")

    def embed(self, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return out if self.pooling is None else self.pooling.embed(out, mask)

    def __call__(self, batch: dict) -> torch.Tensor:
        missing = [name for name in self.inputs if name not in batch]
        if missing:
            raise BadInputError(f"the ONNX model needs inputs {missing} that the tokenizer does not produce")
        return torch.from_numpy(self.session.run([self.output], graph_feed(self.session, batch))[0]).float()


def _sibling_config(checkpoint: Path | None, path: Path):
    import json
    from types import SimpleNamespace

    if checkpoint is None:
        return None  # then labels must be class ids
    config_file = checkpoint / "config.json"

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("it is not a JSON object")
        id2label = config.get("id2label") or {}
        label2id = config.get("label2id") or {v: int(k) for k, v in id2label.items()}
        num_labels = config.get("num_labels") or len(id2label)
        if not isinstance(label2id, dict) or not isinstance(num_labels, int):
            raise ValueError("label2id / num_labels have the wrong types")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptCheckpointError(
            f"cannot read {config_file} (beside {path.name}, for its label names): {reason}",
            hint="fix or remove that config.json",
        ) from None
    return SimpleNamespace(label2id=label2id, num_labels=num_labels, problem_type=config.get("problem_type"))


def runner_for(model_or_path):
    if isinstance(model_or_path, (str, Path)):
        if str(model_or_path).endswith(".onnx"):
            return OnnxRunner(model_or_path)

        return TorchRunner(load_model(str(model_or_path)))
    if isinstance(model_or_path, (TorchRunner, OnnxRunner)):
        return model_or_path
    return TorchRunner(model_or_path)


# --- metrics ----------------------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their mean rank (what Spearman needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # average the ranks of tied values
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a, b) -> float:
    a, b = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions."""
    scores = []
    for c in np.union1d(predictions, labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


NEIGHBOURS = 10  # k of neighbour_recall: a search result page


def _top_neighbours(embeddings: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[n, k] ids of each row's k most cosine-similar other rows (itself excluded), in row chunks so
    that 10k texts need no 10k x 10k matrix at once."""
    unit = F.normalize(embeddings.double(), dim=-1)  # float64: near-ties rank the same on torch and ONNX
    ids = []
    for start in range(0, len(unit), chunk):
        similarity = unit[start:start + chunk] @ unit.T
        rows = torch.arange(start, start + len(similarity))
        similarity[rows - start, rows] = float("-inf")
        ids.append(similarity.topk(k, dim=-1).indices)
    return torch.cat(ids)


def neighbour_recall(embeddings: torch.Tensor, teacher_embeddings: torch.Tensor, k: int = NEIGHBOURS) -> float:
    """Mean over texts of |model's k nearest neighbours & teacher's k nearest| / k (recall@k of the
    teacher's neighbours)."""
    ours, theirs = _top_neighbours(embeddings, k), _top_neighbours(teacher_embeddings, k)
    hits = (ours[:, :, None] == theirs[:, None, :]).any(dim=-1).sum(dim=-1)
    return float(hits.double().mean() / k)


# --- evaluation -------------------------------------------------------------------------------


def evaluate(model, batches: list[dict] | None = None, *, examples=None, tokenizer=None, teacher=None, max_length: int = 128, batch_size: int = 32, progress: bool = True, neighbours: int = NEIGHBOURS) -> dict:
    """Task metrics and (with a teacher) fidelity, over all batches. See the module docstring."""

    runner = runner_for(model)
    teacher_runner = runner_for(teacher) if teacher is not None else None
    if batches is None:
        batches = batches_for(runner, examples, tokenizer, max_length, batch_size)
    if teacher_runner is not None and teacher_runner.kind != runner.kind:
        raise BadInputError(f"cannot compare a model that outputs {runner.kind} with a teacher that outputs {teacher_runner.kind}")

    outputs, teacher_outputs, labels, masks, pair_cos = [], [], [], [], []
    with progress_bar() as bar:
        task = bar.add_task("evaluate", total=len(batches), status="", visible=progress)
        for batch in batches:
            mask = batch["attention_mask"]
            out = runner(batch)
            pooled = runner.kind == "embedding"
            outputs.append(runner.embed(out, mask) if pooled else out)
            masks.append(mask)
            if teacher_runner is not None:  # the teacher's own tokenization of the rows, after vocabulary pruning
                own = batch.get("teacher", batch)
                t = teacher_runner(own)
                teacher_outputs.append(teacher_runner.embed(t, own["attention_mask"]) if pooled else t)
            if "labels" in batch:
                labels.append(batch["labels"])
            if pooled and "pair" in batch:
                other = runner.embed(runner(batch["pair"]), batch["pair"]["attention_mask"])
                pair_cos.append(F.cosine_similarity(outputs[-1], other, dim=-1))
            bar.update(task, advance=1)

    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    result: dict = {"samples": n, "output": runner.kind}
    if labels:
        result.update(task_metrics(outputs, torch.cat(labels), pair_cos, runner.kind))
    if teacher_runner is not None:
        result.update(fidelity(outputs, teacher_outputs, masks, runner.kind, neighbours))
    return result


def task_metrics(outputs: list[torch.Tensor], labels: torch.Tensor, pair_cos: list[torch.Tensor], kind: str) -> dict:
    if kind == "embedding":
        if not pair_cos:
            return {}  # labels on single sentences mean nothing to an embedding model
        return {"spearman": spearman(torch.cat(pair_cos).numpy(), labels.numpy())}
    if outputs[0].dim() != 2:
        return {}  # token-level heads: the data holds one label per example, not per token
    logits = torch.cat(outputs)
    if logits.shape[-1] == 1:  # regression head (e.g. STS-B): rank correlation with the scores
        return {"spearman": spearman(logits[:, 0].numpy(), labels.numpy())}
    predictions, gold = logits.argmax(dim=-1).numpy(), labels.long().numpy()
    return {"accuracy": float((predictions == gold).mean()), "macro_f1": macro_f1(predictions, gold)}


def fidelity(outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor], masks: list[torch.Tensor], kind: str, neighbours: int = NEIGHBOURS) -> dict:
    if kind == "embedding":
        cos = torch.cat([F.cosine_similarity(o, t, dim=-1) for o, t in zip(outputs, teacher_outputs)])
        result = {"embedding_cosine": float(cos.mean())}
        k = min(neighbours, len(cos) - 1)  # a tiny evaluation set still ranks what it has
        if k >= 1:
            result.update(neighbour_recall=neighbour_recall(torch.cat(outputs), torch.cat(teacher_outputs), k), neighbour_k=k)
        return result
    agree, kl, count = 0.0, 0.0, 0
    for out, t, mask in zip(outputs, teacher_outputs, masks):
        if out.shape[-1] == 1:  # regression: no distribution to compare; agreement is meaningless
            continue
        logp, teacher_logp = F.log_softmax(out, dim=-1), F.log_softmax(t, dim=-1)
        per_item_kl = (teacher_logp.exp() * (teacher_logp - logp)).sum(dim=-1)
        same = (out.argmax(dim=-1) == t.argmax(dim=-1)).float()
        if out.dim() == 3 and out.shape[1] == mask.shape[1]:  # per-token outputs: real tokens only
            weight = mask.float()
        else:
            weight = torch.ones_like(same)
        agree += float((same * weight).sum())
        kl += float((per_item_kl * weight).sum())
        count += float(weight.sum())
    if not count:
        return {}
    return {"top1_agreement": agree / count, "logits_kl": kl / count}


def batches_for(runner, examples, tokenizer, max_length: int, batch_size: int, teacher_tokenizer=None) -> list[dict]:
    """Batches for this model: class labels mapped through its config; sentence pairs encoded
    separately for embedding models (bi-encoder cosine), jointly for task heads (cross-encoder).
    teacher_tokenizer: the teacher's own where it differs (a pruned vocabulary): batch["teacher"]."""

    if examples is None or tokenizer is None:
        raise ValueError("evaluate needs batches, or examples and a tokenizer")
    head = task_head(runner.model) if isinstance(runner, TorchRunner) else None
    if examples.pairs is not None and head in ("token", "qa", "mlm"):
        raise BadInputError(
            f"a text-pair column was given, but {type(runner.model).__name__} does not take sentence pairs",
            hint="pairs work with sequence classifiers (cross-encoders) and embedding models (bi-encoders)",
        )
    if examples.labels is not None and runner.kind == "embedding" and examples.pairs is None:
        raise BadInputError(
            "labels were given, but the model is an embedding model with no classification head",
            hint="labels need a classifier, or sentence pairs with a numeric similarity score",
        )
    label_ids = runner.config if runner.kind == "logits" else None
    encoding = "separate" if runner.kind == "embedding" else "cross"
    return make_batches(tokenizer, examples, max_length=max_length, batch_size=batch_size, label_ids=label_ids, pair_encoding=encoding,
                        teacher_tokenizer=teacher_tokenizer)
