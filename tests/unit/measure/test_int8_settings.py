"""int8 quantization settings follow the CPU's instruction set."""

from __future__ import annotations

import pytest

from shrink.measure.export import int8_settings


@pytest.mark.parametrize(
    "flags, reduce_range",
    [
        ({"avx2"}, True),  # U8S8 through VPMADDUBSW can saturate: 7-bit weights
        ({"avx2", "avx512f"}, True),
        ({"avx2", "avx512f", "avx512_vnni"}, False),  # VNNI accumulates in int32
        ({"avx2", "avx_vnni"}, False),
        ({"avx2", "amx_int8"}, False),
        (set(), False),  # no x86 int8 extensions (e.g. ARM): onnxruntime's defaults
    ],
)
def test_reduce_range_only_where_u8s8_saturates(flags, reduce_range):
    settings = int8_settings(flags)
    assert settings["reduce_range"] is reduce_range
    assert settings["per_channel"] is True and settings["weight_type"] == "QInt8"
    assert settings["why"]
