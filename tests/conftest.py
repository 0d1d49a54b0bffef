"""Tiny random models for every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import ARCHITECTURES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param
