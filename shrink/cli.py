"""The `shrink` command. Each command is a thin wrapper over the library and lives in
shrink/commands/<name>.py; heavy libraries (torch, transformers, onnx) are imported inside the
commands so `shrink --help` is instant."""

from __future__ import annotations

import contextlib
import importlib
from typing import Annotated, Optional

import typer

from . import __version__
from .console import err, state
from .errors import EXIT_INTERNAL, ShrinkError

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


@contextlib.contextmanager
def cli_errors():
    """Turn errors into one line on stderr and the documented exit code."""
    try:
        yield
    except ShrinkError as exc:
        if state["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc.one_line()}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was written")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        if state["debug"]:
            raise
        err.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", highlight=False)
        raise typer.Exit(EXIT_INTERNAL) from None


for _name in COMMANDS:
    importlib.import_module(f"shrink.commands.{_name}").register(app)


def main() -> None:
    app()
