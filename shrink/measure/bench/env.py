"""The machine a benchmark ran on: library versions, the CPU and the vector extensions int8 kernels
depend on, and the process's peak memory. Every report carries these, since absolute times (and int8
speedups) belong to one machine."""

from __future__ import annotations

import os
import platform
import sys

import onnxruntime
import torch

from shrink.measure.cpu import cpu_description


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_description(),
    }


def process_peak_rss_mb() -> float | None:
    """Peak resident memory of this whole process (all models together), not per model."""
    try:
        import resource  # not on Windows

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024) / 1e6  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None
