"""The one way shrink opens an ONNX file with onnxruntime (CPU)."""

from __future__ import annotations

from pathlib import Path

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
