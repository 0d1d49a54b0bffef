"""Progress wherever stderr goes: rich bars in a terminal, plain throttled lines elsewhere (CI logs,
`2> file`), nothing with --quiet; every caller of shrink.console.progress gets it unchanged."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.progress import Progress

from shrink import console
from shrink.console import LineProgress, clock, progress, progress_interval, progress_line

from helpers import SENTENCES, tiny_model, tiny_tokenizer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def piped() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def run(steps: int, *, interval: float, total: int | None = None, seconds_per_step: float = 1.0, status=lambda i: f"loss {1 / (i + 1):.2f}"):
    stream, now = piped(), Clock()
    with progress(console=stream, interval=interval, get_time=now) as bar:
        task = bar.add_task("distill", total=steps if total is None else total, status="")
        for i in range(steps):
            now.now += seconds_per_step
            bar.update(task, advance=1, status=status(i))
    return stream.file.getvalue().splitlines()


def test_without_a_terminal_lines_carry_counts_percent_eta_and_status():
    lines = run(100, interval=10)
    assert lines[0] == "distill: 1/100, 1%, 0:01 elapsed, ETA 1:39, loss 1.00"
    assert lines[-1] == "distill: 100/100, 100%, 1:40 elapsed, loss 0.01"  # the last always, no ETA at the total
    assert "distill: 21/100, 21%, 0:21 elapsed, ETA 1:19, loss 0.05" in lines
    assert not any("\x1b" in line for line in lines)


def test_at_most_one_line_per_interval_first_and_last_always():
    lines = run(100, interval=10)
    counts = [int(re.match(r"distill: (\d+)/100", line).group(1)) for line in lines]
    assert counts == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    assert len(run(100, interval=1000)) == 2  # first and last only
    assert len(run(7, interval=0)) == 7  # interval 0: every finished step


def test_a_task_that_stops_early_prints_where_it_stopped_unless_the_block_failed():
    assert run(40, total=100, interval=1000)[-1].startswith("distill: 40/100, 40%, 0:40 elapsed, ETA 1:00")
    stream, now = piped(), Clock()
    with pytest.raises(KeyboardInterrupt), progress(console=stream, interval=1000, get_time=now) as bar:
        task = bar.add_task("search", total=100, status="")
        for _ in range(40):
            now.now += 1
            bar.advance(task)
        raise KeyboardInterrupt
    assert stream.file.getvalue().splitlines() == ["search: 1/100, 1%, 0:01 elapsed, ETA 1:39"]


def test_status_only_updates_hidden_tasks_and_no_total():
    stream = piped()
    with progress(console=stream, interval=0) as bar:
        quiet_task = bar.add_task("evaluate", total=3, status="", visible=False)
        bar.update(quiet_task, advance=3)
        task = bar.add_task("bench", total=None, status="")
        bar.update(task, status="batch 1, seq 128")  # nothing finished: no line
        bar.advance(task)
    assert stream.file.getvalue().splitlines() == ["bench: 1 done, 0:00 elapsed, batch 1, seq 128"]


def test_quiet_prints_nothing(monkeypatch):
    monkeypatch.setitem(console.state, "quiet", True)
    stream = piped()
    with progress(console=stream, interval=0) as bar:
        task = bar.add_task("distill", total=3, status="")
        for _ in range(3):
            bar.advance(task)
    assert stream.file.getvalue() == ""
    assert not isinstance(bar, LineProgress)


def test_a_terminal_gets_the_rich_bar():
    stream = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress(console=stream, interval=0) as bar:
        task = bar.add_task("distill", total=3, status="loss 0.5")
        for _ in range(3):
            bar.advance(task)
    assert type(bar) is Progress
    text = stream.file.getvalue()
    assert "\x1b" in text and "distill" in text and "3/3" in text
    assert "elapsed" not in text  # not the plain lines


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("SHRINK_PROGRESS_INTERVAL", raising=False)
    assert progress_interval() == 10
    for raw, expected in (("0", 0), ("2.5", 2.5), ("soon", 10), ("-1", 10), ("nan", 10)):
        monkeypatch.setenv("SHRINK_PROGRESS_INTERVAL", raw)
        assert progress_interval() == expected
    monkeypatch.setenv("SHRINK_PROGRESS_INTERVAL", "0")
    stream = piped()
    with progress(console=stream) as bar:
        task = bar.add_task("x", total=2, status="")
        bar.advance(task)
        bar.advance(task)
    assert len(stream.file.getvalue().splitlines()) == 2


def test_formatting():
    assert [clock(s) for s in (0, 41, 723, 3723)] == ["0:00", "0:41", "12:03", "1:02:03"]
    assert progress_line("l0 gates", 2.5, 10, 5.0, "  target\n0.5 ") == "l0 gates: 2.5/10, 25%, 0:05 elapsed, ETA 0:15, target 0.5"


def test_existing_callers_get_lines_on_a_piped_stderr(monkeypatch, capsys):
    """shrink.measure.evaluate calls progress() as it always did; under pytest stderr is no terminal."""
    from shrink.data.examples import Examples, make_batches
    from shrink.measure.evaluate import evaluate

    monkeypatch.setenv("SHRINK_PROGRESS_INTERVAL", "0")
    model = tiny_model("bert")
    batches = make_batches(tiny_tokenizer(), Examples(SENTENCES[:12]), batch_size=4)
    evaluate(model, batches, teacher=model)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate:")]
    assert [line.split(",")[0] for line in lines] == ["evaluate: 1/3", "evaluate: 2/3", "evaluate: 3/3"]
    assert "ETA" in lines[0] and "100%" in lines[-1]
