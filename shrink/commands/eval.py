"""shrink eval MODEL --data FILE: task metric and fidelity to a teacher, for checkpoints and ONNX files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shrink.console import note, out, print_json

METRICS = {  # result key: label in the table
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "spearman": "Spearman",
    "top1_agreement": "top-1 agreement with teacher",
    "logits_kl": "KL(teacher || model)",
    "embedding_cosine": "embedding cosine with teacher",
    "neighbour_recall": "recall@k of the teacher's nearest neighbours",
}


def register(app: typer.Typer) -> None:
    @app.command(name="eval")
    def eval_command(
        model: Annotated[str, typer.Argument(help="Model directory, slim checkpoint, alias, hub id, or an .onnx file.")],
        data: Annotated[Optional[str], typer.Option("--data", help="A .txt/.csv/.tsv/.jsonl file, a datasets name, or 'bundled' (the default: the bundled corpus).")] = None,
        teacher: Annotated[Optional[str], typer.Option(help="Compare with this model (ref or .onnx); default for a slim checkpoint: its source model.")] = None,
        text_column: Annotated[Optional[str], typer.Option(help="Text column of CSV/JSONL data (default: `text`, else the only text column).")] = None,
        text_pair_column: Annotated[Optional[str], typer.Option(help="Second text of sentence pairs.")] = None,
        label_column: Annotated[Optional[str], typer.Option(help="Class names/ids, or numeric similarity scores for pairs.")] = None,
        tokenizer: Annotated[Optional[str], typer.Option(help="Where to load the tokenizer from (default: the model, or the .onnx file's directory).")] = None,
        eval_fraction: Annotated[Optional[float], typer.Option(help="Evaluate only the held-out split `shrink prune` makes with this fraction and --seed.")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the split and of --samples.")] = 0,
        samples: Annotated[Optional[int], typer.Option(min=1, help="Evaluate a seeded subset of this many examples.")] = None,
        max_length: Annotated[int, typer.Option(min=8, help="Truncate examples to this many tokens.")] = 128,
        batch_size: Annotated[int, typer.Option(min=1)] = 32,
        neighbours: Annotated[int, typer.Option(min=1, help="k of neighbour_recall (embedding models with a teacher).")] = 10,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto (torch models; ONNX runs on CPU).")] = "cpu",
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
        sweep: Annotated[Optional[Path], typer.Option("--sweep", help="Add the figures as a row of this sweep.json and redraw its plots (no speedup: bench --sweep with the same --label adds it).")] = None,
        label: Annotated[Optional[str], typer.Option("--label", help="The row's name in --sweep (default: eval).")] = None,
    ) -> None:
        """Measure a model on data: accuracy/macro-F1 or Spearman, and fidelity to a teacher."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            from shrink.data.examples import read_examples, split_examples
            from shrink.measure.evaluate import batches_for, evaluate, runner_for

            if sweep is not None:
                from shrink.prune.sweep import add_eval_row, load_sweep

                load_sweep(sweep)  # a bad --sweep fails before anything is measured
            # The data first: a bad file should fail before seconds of model loading.
            examples = read_examples(data, text_column, text_pair_column, label_column)
            if eval_fraction is not None:
                examples = split_examples(examples, eval_fraction, seed)[1]
            if samples is not None:
                examples = _sample(examples, samples, seed)

            from shrink.train.device import resolve_device

            device = resolve_device(device)
            runner = runner_for(_model_or_path(model, device))
            teacher_ref = teacher or _default_teacher(model)
            teacher_runner = runner_for(_model_or_path(teacher_ref, device)) if teacher_ref else None
            tok = _tokenizer(tokenizer, model)
            batches = batches_for(runner, examples, tok, max_length, batch_size, _teacher_tokenizer(teacher_ref, tok))
            if teacher_runner is None and examples.labels is None:
                note("note: no labels and no teacher, so there is nothing to score (pass --teacher REF or --label-column)")
            result = evaluate(runner, batches, teacher=teacher_runner, neighbours=neighbours)
            document = {"model": model, "teacher": teacher_ref, "data": data or "bundled corpus", **result}
            if json_output:
                print_json(document)
            else:
                show(document)
            if sweep is not None:
                add_eval_row(sweep, document, label)


def _model_or_path(ref: str, device: str):
    """An .onnx path stays a path (run by onnxruntime); anything else is loaded as a torch model."""
    if ref.endswith(".onnx"):
        return ref
    from shrink.models.hub import load_model

    return load_model(ref, device=device)


def _default_teacher(model: str) -> str | None:
    """A slim checkpoint remembers the model it was cut from; compare with that."""
    from shrink.models.hub import is_local, read_config_dict, resolve

    if model.endswith(".onnx"):
        directory = str(Path(model).parent)
        if not (Path(directory) / "config.json").is_file():
            return None
    else:
        directory = resolve(model)
        if not is_local(directory):
            return None
    config = read_config_dict(directory)
    manifest = config.get("shrink") if isinstance(config, dict) else None
    source = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(source, str):
        return None
    if source:
        from rich.markup import escape

        note(f"teacher: {escape(source)} (the source of this slim checkpoint; --teacher to change)")
    return source


def _tokenizer(tokenizer: str | None, model: str):
    from shrink.errors import BadInputError
    from shrink.models.hub import load_tokenizer

    if tokenizer:
        return load_tokenizer(tokenizer)
    if model.endswith(".onnx"):
        directory = Path(model).parent
        if not (directory / "tokenizer_config.json").is_file() and not (directory / "tokenizer.json").is_file():
            raise BadInputError(f"no tokenizer beside {model}", hint="pass --tokenizer REF")
        return load_tokenizer(str(directory.resolve()))
    return load_tokenizer(model)


def _teacher_tokenizer(teacher: str | None, tokenizer):
    """The teacher's own tokenizer where its vocabulary differs from the model's (the model's was
    pruned: embedding.vocab), so that each is fed its own ids; None where they are the same (or the
    teacher has no tokenizer of its own)."""
    from shrink.errors import BadInputError

    if teacher is None:
        return None
    try:
        own = _tokenizer(None, teacher)
    except BadInputError:
        return None
    return own if own.get_vocab() != tokenizer.get_vocab() else None


def _sample(examples, samples: int, seed: int):
    """A seeded subset; asking for more than exist warns and uses them all."""
    import random

    if samples > len(examples):
        note(f"[yellow]warning:[/yellow] {samples} samples requested but only {len(examples)} exist; using {len(examples)}")
    if samples >= len(examples):
        return examples
    return examples.subset(sorted(random.Random(seed).sample(range(len(examples)), samples)))


def _format(value) -> str:
    return "n/a" if value != value else f"{value:.4f}"  # NaN: e.g. Spearman of constant scores


def show(document: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    teacher = f"  teacher: {escape(document['teacher'])}" if document["teacher"] else ""
    out.print(f"[bold]{escape(document['model'])}[/bold]  on {escape(document['data'])}  ({document['samples']} examples){teacher}")
    table = Table(show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in METRICS.items():
        if key in document:
            label = label.replace("@k", f"@{document.get('neighbour_k', 'k')}")
            table.add_row(label, _format(document[key]))
    if table.row_count:
        out.print(table)
    else:
        out.print("no metrics: the data has no labels and there is no teacher to compare with")
