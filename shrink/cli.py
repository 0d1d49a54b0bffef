"""The `shrink` command. Each command is a thin wrapper over the library and lives in
shrink/commands/<name>.py; heavy libraries (torch, transformers, onnx) are imported inside the
commands so `shrink --help` is instant."""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from shrink import __version__
from shrink.console import state

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException


class ShrinkGroup(TyperGroup):
    """Usage errors (a missing argument, an unknown option or command) are click's own, on stderr,
    exit 2; with `--json` they also give the one JSON error document on stdout, as every other
    failure does."""

    def make_context(self, info_name, args, parent=None, **extra):
        self.wants_json = "--json" in args
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except ClickException as exc:
            self._json_error(exc)
            raise

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ClickException as exc:
            self._json_error(exc)
            raise

    def _json_error(self, exc) -> None:
        if getattr(self, "wants_json", False):
            from shrink.console import print_json

            ctx = getattr(exc, "ctx", None)
            command = ctx.command_path if ctx is not None else "shrink"
            print_json({"error": exc.format_message(), "exit_code": exc.exit_code, "hint": f"see `{command} --help`"})
            self.wants_json = False  # one document, even if the error passes through twice


app = typer.Typer(
    cls=ShrinkGroup,
    name="shrink",
    help="Make transformer encoders smaller and faster: exact pruning, ONNX export, honest benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = ["info", "recipes", "prune", "sweep", "eval", "export", "bench"]


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
    try:
        app()
    except KeyboardInterrupt:  # outside a command (while starting up): same exit code as inside
        from shrink.console import err

        err.print("[red]interrupted[/red]")
        raise SystemExit(130) from None


if __name__ == "__main__":  # `python -m shrink.cli` (what `accelerate launch -m shrink.cli` runs in each process)
    main()
