"""Terminal output: results on stdout, everything else (progress, notes, errors) on stderr, so
`--json` leaves exactly one JSON document on stdout."""

from __future__ import annotations

import json
import sys

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

state = {"debug": False, "quiet": False}


def print_json(document) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


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
