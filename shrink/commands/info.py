"""shrink info MODEL: structure, heads and FFN per layer, parameters by component."""

from __future__ import annotations

from typing import Annotated

import typer

from shrink.console import out, print_json


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        model: Annotated[str, typer.Argument(help="Local directory, slim checkpoint, alias (minilm, bert-base, ...) or hub id.")],
        json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    ) -> None:
        """Show a model's structure: layers, heads and FFN size per layer, parameters by component."""
        from shrink.commands import cli_errors

        with cli_errors(json_output):
            from shrink.models.hub import load_model, resolve
            from shrink.models.info import describe

            summary = describe(load_model(model), resolve(model))
            summary["model"] = model
            if json_output:
                print_json(summary)
            else:
                show(summary)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def show(summary: dict) -> None:
    from rich.table import Table

    head = summary["task_head"] or "none (base model)"
    from rich.markup import escape

    out.print(f"[bold]{escape(summary['model'])}[/bold]  {summary['model_type']}  task head: {head}")
    out.print(
        f"hidden {summary['hidden_size']}, head size {summary['head_size']}, vocab {summary['vocab_size']}, "
        f"max positions {summary['max_positions']}"
        + (f", slim ({', '.join(sorted(set(summary['manifest_ops'])))})" if summary["slim"] else "")
    )
    if summary.get("checkpoint"):
        out.print(f"checkpoint: {summary['checkpoint']['kind']} ({escape(summary['checkpoint']['why'])})")
    if summary.get("sentence_transformers"):
        st = summary["sentence_transformers"]
        out.print(f"sentence-transformers: {st['pooling']} pooling, {st['dense_modules']} Dense, "
                  f"{'normalized' if st['normalize'] else 'not normalized'}, max_seq_length {st['max_seq_length']}")
    layers = Table(title="layers", show_edge=False)
    for col in ("layer", "original", "heads", "ffn"):
        layers.add_column(col, justify="right")
    for i, (orig, h, f) in enumerate(zip(summary["original_layers"], summary["heads_per_layer"], summary["ffn_per_layer"])):
        layers.add_row(str(i), str(orig), str(h), str(f))
    out.print(layers)
    params = Table(title="parameters", show_edge=False)
    params.add_column("component")
    params.add_column("params", justify="right")
    params.add_column("share", justify="right")
    total = summary["params_total"]
    for name, n in summary["params"].items():
        params.add_row(name, _millions(n), f"{100 * n / total:.1f}%")
    params.add_row("[bold]total[/bold]", f"[bold]{_millions(total)}[/bold]", "100%")
    out.print(params)
    if summary["size_on_disk_bytes"] is not None:
        out.print(f"size on disk: {summary['size_on_disk_bytes'] / 2**20:.1f} MiB")
