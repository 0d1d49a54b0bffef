"""The one way shrink opens an ONNX file with onnxruntime (CPU), and feeds it tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.errors import BadInputError


def session(path: str | Path, threads: int | None = 1):
    """An onnxruntime CPU session. threads: intra-op threads (1 for stable timing and parity checks;
    None: onnxruntime's default, all cores, for evaluation throughput). A file onnxruntime cannot load
    is bad input, one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BadInputError(f"cannot load {path} with onnxruntime: {str(exc).splitlines()[0][:200]}") from None


def graph_feed(sess, batch: dict) -> dict:
    """The batch's tensors as int64 arrays, for the inputs the graph declares only (a batch may hold
    more: labels, or an attention_mask a graph with no attention left does not read)."""
    declared = {i.name for i in sess.get_inputs()}
    return {k: v.cpu().numpy().astype(np.int64) for k, v in batch.items() if k in declared}


def checkpoint_dir(path: Path) -> Path | None:
    """The checkpoint an exported file belongs to: its directory (model.onnx beside config.json) or,
    for onnx/model.onnx (where sentence-transformers looks), the one above; None for a lone file."""
    for directory in (path.parent, path.parent.parent):
        if (directory / "config.json").is_file():
            return directory
        if directory.name != "onnx":
            break
    return None
