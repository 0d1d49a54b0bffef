"""Terminal output: results on stdout, everything else (progress, notes, errors) on stderr, so
`--json` leaves exactly one JSON document on stdout."""

from __future__ import annotations

import json
import math
import os
import sys

from rich.console import Console
from rich.errors import MarkupError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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


PROGRESS_INTERVAL_S = 10.0  # without a terminal: at most one progress line per task this often


def progress_interval() -> float:
    """Seconds between two progress lines of a task when stderr is no terminal: $SHRINK_PROGRESS_INTERVAL
    (0: a line per finished step), else PROGRESS_INTERVAL_S."""
    try:
        value = float(os.environ.get("SHRINK_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
    except ValueError:
        return PROGRESS_INTERVAL_S
    return value if math.isfinite(value) and value >= 0 else PROGRESS_INTERVAL_S


def live_display(console: Console) -> bool:
    """Whether rich can redraw a bar in place there (a terminal that is not dumb, or Jupyter)."""
    return console.is_jupyter or (console.is_terminal and not console.is_dumb_terminal)


def progress(transient: bool = True, *, console: Console | None = None, interval: float | None = None, get_time=None):
    """Progress on stderr, the same API wherever it goes (rich's Progress: add_task, update, advance).

    In a terminal a rich bar. Elsewhere (CI logs, `2> file`), where a live bar shows nothing until it
    ends, plain lines instead (LineProgress). Nothing with --quiet."""
    console = console or err
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    if state["quiet"] or live_display(console):
        return Progress(*columns, console=console, transient=transient, disable=state["quiet"], get_time=get_time)
    return LineProgress(*columns, console=console, get_time=get_time, interval=progress_interval() if interval is None else interval)


class LineProgress(Progress):
    """rich's Progress with the live display off: tasks are tracked as usual, and each finished step
    may print one line, `distill: 120/480, 25%, 0:41 elapsed, ETA 2:03, loss 0.41` (the task's
    `status` field last). At most one line per task every `interval` seconds, but always the first
    finished step and the last (the step that reaches the total, or the state a task stopped at when
    the block ends normally). Plain text written to the console's file: no ANSI codes, no markup."""

    def __init__(self, *columns, interval: float = PROGRESS_INTERVAL_S, **kwargs):
        kwargs.pop("disable", None)
        kwargs.pop("transient", None)
        super().__init__(*columns, disable=True, **kwargs)  # disable: no Live, no blank lines at the end
        self.interval = interval
        self._shown: dict = {}  # task id -> (time of its last line, (completed, total) it showed)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._maybe_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._maybe_line(task_id)

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if exc_type is None:  # an interrupted or failed block prints no progress after its error
            for task_id in list(self._tasks):
                self._maybe_line(task_id, force=True)
        super().__exit__(exc_type, exc_val, exc_tb)

    def _maybe_line(self, task_id, force: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or not task.visible or task.completed <= 0:
                return
            now, shown = self.get_time(), self._shown.get(task_id)
            figures = (task.completed, task.total)
            if shown is not None and shown[1] == figures:
                return  # nothing finished since its last line
            done = task.total is not None and task.completed >= task.total
            if not (force or done or shown is None or now - shown[0] >= self.interval):
                return
            self._shown[task_id] = (now, figures)
            line = progress_line(task.description, task.completed, task.total, task.elapsed or 0.0, task.fields.get("status", ""))
        stream = self.console.file
        stream.write(line + "\n")
        stream.flush()


def progress_line(description: str, completed: float, total: float | None, elapsed: float, status: str = "") -> str:
    """`distill: 120/480, 25%, 0:41 elapsed, ETA 2:03, loss 0.41` (no total: `120 done, ...`; at the
    total no ETA). The ETA assumes the remaining steps take the mean time of those done."""
    parts = [f"{_count(completed)}/{_count(total)}" if total is not None else f"{_count(completed)} done"]
    if total:
        parts.append(f"{min(100.0, 100.0 * completed / total):.0f}%")
    parts.append(f"{clock(elapsed)} elapsed")
    if total is not None and 0 < completed < total:
        parts.append(f"ETA {clock(elapsed / completed * (total - completed))}")
    status = " ".join(str(status).split())
    return f"{description}: {', '.join(parts + ([status] if status else []))}"


def _count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def clock(seconds: float) -> str:
    """0:41, 12:03, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
