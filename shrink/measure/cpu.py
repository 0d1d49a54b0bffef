"""What the CPU can do for int8: its model name and the vector extensions onnxruntime's int8 kernels
use. int8 speed (and, without VNNI, int8 precision) depends on them by an order of magnitude, so
benchmark reports name them and the int8 export picks its quantization settings from them."""

from __future__ import annotations

import platform

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> str | None:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return None


def cpu_flags() -> set[str]:
    """The int8-relevant flags of this CPU (empty off Linux, or on a CPU with none of them)."""
    info = _cpuinfo() or ""
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return {flag for flag in flags if flag in INT8_FLAGS}


def cpu_description() -> str:
    """CPU model and its int8-relevant vector extensions, e.g. "AMD EPYC 7B13 (avx2)"."""
    info = _cpuinfo()
    if info is None:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = cpu_flags()
    return f"{model} ({', '.join(f for f in INT8_FLAGS if f in flags) or 'no AVX2'})"


def quantization_name(flags: set[str] | None = None) -> str:
    """The name sentence-transformers gives an int8 export for this CPU (arm64, avx2, avx512,
    avx512_vnni): its ONNX backend looks for onnx/model_qint8_<name>.onnx."""
    flags = cpu_flags() if flags is None else flags
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    return "avx512" if "avx512f" in flags else "avx2"
