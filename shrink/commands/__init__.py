"""One module per command; each has register(app) and keeps heavy imports inside the command."""

from __future__ import annotations

import contextlib

import typer

from shrink.console import err, print_json, state
from shrink.errors import EXIT_INTERNAL, ShrinkError


@contextlib.contextmanager
def cli_errors(json_output: bool = False):
    """Turn errors into one line on stderr and the documented exit code; with `--json` also one
    JSON document on stdout: {"error": ..., "exit_code": ..., "hint": ...} (unless the command
    already printed its result document, as a CI gate failing after the report does)."""
    state["json_printed"] = False
    try:
        yield
    except ShrinkError as exc:
        if state["debug"]:
            raise
        fail(exc.message, exc.exit_code, exc.hint, json_output)
    except KeyboardInterrupt:
        fail("nothing was written", 130, None, json_output, label="interrupted")
    except typer.Exit:
        raise
    except Exception as exc:
        if interrupted(exc):  # Ctrl-C inside a C extension's import (pybind11: ImportError from KeyboardInterrupt)
            fail("nothing was written", 130, None, json_output, label="interrupted")
        if state["debug"]:
            raise
        fail(f"{type(exc).__name__}: {exc}", EXIT_INTERNAL, "rerun with --debug for the traceback", json_output, label="internal error")


def interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind this error (its cause or context, at any depth)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def one_line(text: str) -> str:
    """Newlines, tabs and other control characters escaped, so an error is always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def fail(message: str, exit_code: int, hint: str | None, json_output: bool, label: str = "error") -> None:
    """Print the one-line error (and the JSON error document) and exit with `exit_code`."""
    from rich.markup import escape

    message, hint = one_line(message), one_line(hint) if hint else None
    shown = f"{message} (hint: {hint})" if hint else message
    if label == "internal error" and hint:
        shown = f"{message} ({hint})"
    err.print(f"[red]{label}:[/red] {escape(shown)}", highlight=False)
    if json_output and not state["json_printed"]:
        error = message if label == "error" else f"{label}: {message}"
        print_json({"error": error, "exit_code": exit_code, "hint": hint})
    raise typer.Exit(exit_code)
