"""shrink prune MODEL --recipe NAME|FILE [...]: the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shrink.console import print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def prune(
        model: Annotated[str, typer.Argument(help="Local directory, alias (minilm, bert-base, ...) or hub id.")],
        recipe: Annotated[list[str], typer.Option("--recipe", "-r", help="Built-in recipe name or YAML file; repeat to chain.")],
        data: Annotated[Optional[str], typer.Option("--data", help="Calibration data (.txt/.csv/.tsv/.jsonl or a datasets name); default: the bundled corpus.")] = None,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output directory (default ./<model>-<recipe>).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: steps.0.target.heads_fraction=0.4")] = None,
        eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Held-out data file for the report (default: a split of --data).")] = None,
        text_column: Annotated[Optional[str], typer.Option(help="Text column of CSV/JSONL data.")] = None,
        text_pair_column: Annotated[Optional[str], typer.Option(help="Second text column for sentence pairs.")] = None,
        label_column: Annotated[Optional[str], typer.Option(help="Label column (enables the task loss and accuracy).")] = None,
        eval_fraction: Annotated[float, typer.Option(min=0.01, max=0.9, help="Held-out share of the data for the report.")] = 0.2,
        max_samples: Annotated[Optional[int], typer.Option(min=1, help="Cap on the calibration examples the training steps use (default: the whole calibration split; scoring steps use their own calibration_samples).")] = None,
        budget: Annotated[Optional[str], typer.Option("--budget", help="Wall time for all the training in the run, e.g. 90s, 10m, 1.5h (a plain number is minutes): a step whose planned epochs do not fit trains fewer steps, with its schedule rescaled; the report says what it traded. A shortened run depends on the machine's speed.")] = None,
        eval_samples: Annotated[int, typer.Option(min=1, help="Held-out examples the report's quality figures use.")] = 512,
        max_length: Annotated[int, typer.Option(min=8, help="Tokens per example.")] = 128,
        seed: Annotated[int, typer.Option(help="Random seed; same inputs + seed give the same slim model.")] = 0,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="Training forward passes in no, bf16 (CPU or a GPU that has it) or fp16 (GPU) autocast; weights stay fp32.")] = "no",
        gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward while training (large models within memory; slower).")] = False,
        no_export: Annotated[bool, typer.Option("--no-export", help="Skip ONNX export and latency measurement.")] = False,
        int8: Annotated[bool, typer.Option("--int8", help="Also write model-int8.onnx (dynamic int8, settings for this CPU, agreement-gated) and report fp32/int8 speedups against dense fp32 and dense int8, timed in one run.")] = False,
        pooling_in_graph: Annotated[bool, typer.Option("--pooling-in-graph", help="Embedding models: also write an ONNX whose output is the pooled, normalized `sentence_embedding` (the model's own sentence-transformers pooling), for runtimes with no Python.")] = False,
        shrink_format: Annotated[bool, typer.Option("--shrink-format", help="Always write the shrink format (manifest + modeling_shrink.py, loads with trust_remote_code), even when a plain config could describe the slim model.")] = False,
        sparse_format: Annotated[str, typer.Option("--sparse-format", help="auto, on or off: store mostly-zero matrices (unstructured pruning, weights.*) as a bitmask + their nonzeros (at 90% zeros in fp32 they take 7.6x fewer bytes; dense embeddings stay as they are), densified bit-exactly on load; auto does when the whole file gets >= 1.5x smaller. Such a checkpoint is always the shrink format (trust_remote_code=True or shrink.load). No speedup: dense kernels run the same.")] = "auto",
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")] = False,
        max_quality_drop: Annotated[Optional[float], typer.Option(help="Exit 1 if the held-out quality drops more than this.")] = None,
        min_speedup: Annotated[Optional[float], typer.Option(help="Exit 1 if the ONNX speedup (slim fp32 vs dense fp32) is below this.")] = None,
        quality_metric: Annotated[Optional[str], typer.Option(help="The figure --max-quality-drop compares (default: accuracy, else Spearman, else embedding cosine / top-1 agreement); e.g. neighbour_recall.")] = None,
        json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on stdout.")] = False,
    ) -> None:
        """Apply recipes and write a slim checkpoint, model.onnx and a before/after report."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            from shrink.errors import BadInputError
            from shrink.measure.thresholds import check_quality_metric, prune_failures, raise_on_failures
            from shrink.models.sparse import check_mode as check_sparse_mode
            from shrink.prune.pipeline import PruneSettings
            from shrink.prune.pipeline import prune as run_prune
            from shrink.prune.report import show
            from shrink.train.distributed import check_launch, is_main
            from shrink.train.loop import check_precision, parse_duration

            if device not in ("cpu", "cuda"):
                raise BadInputError(f"--device {device!r}: use cpu or cuda")
            check_launch()
            check_quality_metric(quality_metric)
            check_sparse_mode(sparse_format)
            for flag, given in (("--int8", int8), ("--pooling-in-graph", pooling_in_graph)):
                if given and no_export:
                    raise BadInputError(f"{flag} needs the ONNX export", hint="drop --no-export")
            budget_s = parse_duration(budget, "--budget") if budget is not None else None
            settings = PruneSettings(
                data=data, eval_data=eval_data, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
                eval_fraction=eval_fraction, max_samples=max_samples, eval_samples=eval_samples, max_length=max_length, seed=seed,
                device=device, export=not no_export, int8=int8, overwrite=overwrite, overrides=list(set_ or []), budget=budget_s,
                pooling_in_graph=pooling_in_graph, standard_checkpoint=not shrink_format, sparse_format=sparse_format,
                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
            )
            check_precision(mixed_precision, device if device == "cpu" else None)  # (a GPU is checked once it is resolved)
            report = run_prune(model, recipe, output, settings)
            if not is_main():  # launched as several processes: the main one reports and checks
                return
            if json_output:
                print_json(report)
            else:
                show(report)
            # checked after everything is written, so a failing CI run still has the outputs to inspect
            failures = prune_failures(report, max_quality_drop=max_quality_drop, min_speedup=min_speedup, quality_metric=quality_metric)
            raise_on_failures(failures, report["output"])
