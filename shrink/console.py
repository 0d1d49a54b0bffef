"""Terminal output: results on stdout, everything else (progress, notes, errors) on stderr, so
`--json` leaves exactly one JSON document on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.errors import MarkupError


class SafeConsole(Console):
    """Text from the user (a path, a model or recipe name) can look like rich markup: `[/b]` in a
    directory name. What does not parse as markup is printed as it is, never a failed command."""

    def print(self, *objects, **kwargs):
        try:
            return super().print(*objects, **kwargs)
        except MarkupError:
            markup, self._markup = self._markup, False  # also for table titles, which ignore markup=False
            try:
                return super().print(*objects, **{**kwargs, "markup": False})
            finally:
                self._markup = markup


out = SafeConsole(soft_wrap=True)
err = SafeConsole(stderr=True, soft_wrap=True)

state = {"debug": False, "quiet": False, "json_printed": False}


def print_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()
    state["json_printed"] = True  # a failure after this (a CI gate) prints no second document


def note(message: str) -> None:
    if not state["quiet"]:
        err.print(message, highlight=False)


def progress(transient: bool = True):
    """A rich progress bar on stderr (disabled by --quiet)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        transient=transient,
        disable=state["quiet"],
    )
