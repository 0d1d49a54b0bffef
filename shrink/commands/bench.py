"""shrink bench A [B ...]: latency, size, FLOPs (and quality) side by side, measured interleaved; CI gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shrink.console import note, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        models: Annotated[list[str], typer.Argument(help="Checkpoints (plain or slim, aliases, hub ids) and/or .onnx files; the first is the baseline.")],
        batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8",
        seq_lengths: Annotated[str, typer.Option("--seq-lengths", help="Comma-separated sequence lengths.")] = "128",
        threads: Annotated[int, typer.Option(help="Intra-op threads (torch and onnxruntime); 1 gives the most stable numbers.")] = 1,
        warmup: Annotated[int, typer.Option(help="Untimed runs per model and cell, first.")] = 5,
        rounds: Annotated[int, typer.Option(help="Timed rounds per cell; each round runs every model once.")] = 30,
        backend: Annotated[str, typer.Option(help="auto (torch for checkpoints, onnxruntime for .onnx), torch, or onnx (export checkpoints on the fly).")] = "auto",
        data: Annotated[Optional[str], typer.Option("--data", help="Also measure quality on this data (a .txt/.csv/.tsv/.jsonl file, a datasets name, or 'bundled').")] = None,
        text_column: Annotated[Optional[str], typer.Option(help="Text column of CSV/JSONL data.")] = None,
        text_pair_column: Annotated[Optional[str], typer.Option(help="Second text of sentence pairs.")] = None,
        label_column: Annotated[Optional[str], typer.Option(help="Class labels, or similarity scores for pairs.")] = None,
        tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer for --data (default: the first model's).")] = None,
        real_text: Annotated[bool, typer.Option("--real-text/--no-real-text", help="With --data, also time real texts: each at its own length (b=1, unpadded) and one input of --long-length real tokens; what token-pruned models must be timed on.")] = True,
        text_samples: Annotated[int, typer.Option("--text-samples", help="Texts of --data timed at their own lengths.")] = 64,
        long_length: Annotated[int, typer.Option("--long-length", help="Real tokens of the long input timed with --data.")] = 256,
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")] = False,
        markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Also write the tables as markdown to this file.")] = None,
        max_latency_ratio: Annotated[Optional[float], typer.Option(help="Gate: every model's p50 / baseline p50 at most this, in every cell.")] = None,
        min_speedup: Annotated[Optional[float], typer.Option(help="Gate: every model's speedup over the baseline at least this, in every cell.")] = None,
        max_size_mb: Annotated[Optional[float], typer.Option(help="Gate: every model's file size at most this many MB.")] = None,
        max_quality_drop: Annotated[Optional[float], typer.Option(help="Gate (needs --data): primary metric at most this much below the baseline's.")] = None,
        quality_metric: Annotated[Optional[str], typer.Option(help="The figure --max-quality-drop compares (default: the primary one); e.g. neighbour_recall.")] = None,
        sweep: Annotated[Optional[Path], typer.Option("--sweep", help="Add each compared model as a row of this sweep.json (speedup at b=1; quality with --data) and redraw its plots; for points comparable with the sweep's use --backend onnx and the original as the first model.")] = None,
        label: Annotated[Optional[str], typer.Option("--label", help="The row's name in --sweep (default: bench); eval --sweep with the same label fills in the same row.")] = None,
    ) -> None:
        """Benchmark models side by side: interleaved rounds, p50/p90/p99, ratios to the first model."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            from shrink.errors import BadInputError
            from shrink.measure.bench import bench as run_bench
            from shrink.measure.bench.render import show, to_markdown
            from shrink.measure.thresholds import bench_failures, check_quality_metric, raise_on_failures

            check_quality_metric(quality_metric)
            if sweep is not None:
                from shrink.prune.sweep import add_bench_rows, load_sweep

                load_sweep(sweep)  # a bad --sweep fails before anything is measured

            if max_quality_drop is not None and data is None:
                raise BadInputError("--max-quality-drop needs --data to measure quality on")
            batches = _quality_batches(data, text_column, text_pair_column, label_column, tokenizer, models[0]) if data else None
            texts = _text_batches(data, text_column, tokenizer, models[0], long_length) if data and real_text else None
            result = run_bench(
                models, batch_sizes=_ints(batch_sizes, "--batch-sizes"), seq_lengths=_ints(seq_lengths, "--seq-lengths"),
                threads=threads, warmup=warmup, rounds=rounds, backend=backend, data_batches=batches,
                text_batches=texts, text_samples=text_samples, long_length=long_length,
            )
            if json_output:
                print_json(result)
            else:
                show(result)
            if markdown is not None:
                markdown.parent.mkdir(parents=True, exist_ok=True)
                markdown.write_text(to_markdown(result), encoding="utf-8")
                note(f"wrote {markdown}")
            if sweep is not None:
                add_bench_rows(sweep, result, label)
            raise_on_failures(bench_failures(
                result, max_latency_ratio=max_latency_ratio, min_speedup=min_speedup,
                max_size_mb=max_size_mb, max_quality_drop=max_quality_drop, quality_metric=quality_metric,
            ))


def _ints(text: str, option: str) -> list[int]:
    """"1,8" -> [1, 8]; anything that is not an integer is bad input (positivity is bench's check)."""
    from shrink.errors import BadInputError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BadInputError(f"{option} {text!r}: expected comma-separated integers, e.g. 1,8") from None


def _quality_batches(data, text_column, text_pair_column, label_column, tokenizer, baseline: str):
    """Read the data now (a bad file fails before any model loads); batches are made later from
    the baseline's runner, so label mapping and pair encoding follow the baseline model."""
    from shrink.commands.eval import _tokenizer
    from shrink.data.examples import read_examples
    from shrink.measure.evaluate import batches_for

    examples = read_examples(data, text_column, text_pair_column, label_column)
    tok = _tokenizer(tokenizer, baseline)
    return lambda runner: batches_for(runner, examples, tok, max_length=128, batch_size=32)


def _text_batches(data, text_column, tokenizer, baseline: str, long_length: int) -> list[dict]:
    """The texts of --data, one unpadded row each, truncated to what the long input needs (real-text timing)."""
    from shrink.commands.eval import _tokenizer
    from shrink.data.examples import read_examples

    examples = read_examples(data, text_column)
    tok = _tokenizer(tokenizer, baseline)
    return [dict(tok(text, truncation=True, max_length=max(8, long_length), return_tensors="pt")) for text in examples.texts]
