"""One module per command; each has register(app) and keeps heavy imports inside the command."""

from __future__ import annotations

import contextlib

import typer

from shrink.console import err, state
from shrink.errors import EXIT_INTERNAL, ShrinkError


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
