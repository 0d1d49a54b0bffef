"""Ctrl-C is safe (issue 15): SIGINT delivered to real `shrink prune` and `shrink export`
processes at several moments exits 130 with one line, and leaves nothing behind: no output, no
temporary directory, no parent directory made for the output."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import FAST, shrink_process, tiny_config, tiny_tokenizer

pytestmark = [pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"), pytest.mark.slow]  # real processes, ~4 s each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT with 160 positions (the report's latency run uses 128 tokens) and some text."""
    import transformers as T

    root = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    model = T.BertModel(tiny_config("bert", max_position_embeddings=160)).eval()
    model.config.architectures = ["BertModel"]
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.txt").write_text("\n".join(f"the {w} sat on the {v}." for w in ("cat", "dog", "owl", "fox") for v in ("mat", "rug", "hat")))
    return root


def loading_torch(process, _stderr, _work):
    """The command has started importing torch (inside the command's error handling)."""
    try:
        return "torch" in Path(f"/proc/{process.pid}/maps").read_text()
    except OSError:
        return False


def note_seen(text):
    return lambda _process, stderr, _work: any(text in line for line in stderr)


def appeared(pattern):
    return lambda _process, _stderr, work: any(work.glob(pattern))


def interrupt_at(args, work: Path, moment, timeout: float = 120):
    """Start `shrink ARGS` in `work`, send SIGINT once `moment` holds, return (code, stderr)."""
    process = shrink_process(*args, cwd=work)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    started = time.monotonic()
    while not moment(process, stderr, work):
        assert process.poll() is None, f"finished before the moment (exit {process.returncode}): {''.join(stderr)[-1500:]}"
        assert time.monotonic() - started < timeout, "the moment never came"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=timeout)
    reader.join(timeout=10)
    return code, "".join(stderr)


def assert_clean_interrupt(code, stderr, work: Path, before: set):
    assert code == 130, (code, stderr[-2000:])
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert {p.name for p in work.iterdir()} == before, "something was left behind"


PRUNE_MOMENTS = {
    "starting": loading_torch,
    "searching": note_seen("heads.a_star"),
    "writing": appeared("new/.out.tmp-*"),
}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps")
@pytest.mark.parametrize("moment", sorted(PRUNE_MOMENTS))
def test_ctrl_c_during_prune(setup, tmp_path, moment):
    before = set()
    args = ["prune", setup / "model", "--recipe", "heads-a-star", "--data", setup / "data.txt", "-o", "new/out", *FAST]
    code, stderr = interrupt_at(args, tmp_path, PRUNE_MOMENTS[moment])
    assert_clean_interrupt(code, stderr, tmp_path, before)  # "new/" (made for the output) is gone too


EXPORT_MOMENTS = {
    "starting": loading_torch,
    "exporting": appeared(".m.onnx.tmp-*"),
    "checking": appeared(".m.onnx.tmp-*/fp32.onnx"),
}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps")
@pytest.mark.parametrize("moment", sorted(EXPORT_MOMENTS))
def test_ctrl_c_during_export(setup, tmp_path, moment):
    (tmp_path / "mine.txt").write_text("keep")
    code, stderr = interrupt_at(["export", setup / "model", "-o", "m.onnx", "--int8"], tmp_path, EXPORT_MOMENTS[moment])
    assert_clean_interrupt(code, stderr, tmp_path, {"mine.txt"})
