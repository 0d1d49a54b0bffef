"""The `shrink` command. Each command is a thin wrapper over the library and lives in
shrink/commands/<name>.py; heavy libraries (torch, transformers, onnx) are imported inside the
commands so `shrink --help` is instant."""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from shrink import __version__
from shrink.console import state

app = typer.Typer(
    name="shrink",
    help="Make transformer encoders smaller and faster: exact pruning, ONNX export, honest benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = ["info", "recipes", "prune", "eval", "export", "bench"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shrink {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes.")] = False,
) -> None:
    state["debug"] = debug
    state["quiet"] = quiet


# each command module is imported here (not lazily) but imports its heavy libraries inside the command
for _name in COMMANDS:
    importlib.import_module(f"shrink.commands.{_name}").register(app)


def main() -> None:
    app()
