"""Fixtures shared by the test modules: the tiny LLaVA-1.5 (SDPA) and its padded two-prompt batch, and
FlashAttention's CPU stand-in kernels.

A module that needs another model or batch defines its own `model` / `batch`, which take precedence.
"""
from __future__ import annotations

import pytest

from flash_stand_in import flash_kernels as _flash_kernels
from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava("sdpa")


@pytest.fixture(scope="module")
def batch(model):
    return llava_inputs(model, [(5, 7), (2, 3)])


@pytest.fixture(scope="module")
def flash_kernels():
    """transformers' FlashAttention path served by pure-PyTorch stand-in kernels (tests/flash_stand_in.py),
    for the module's tests; transformers is restored after them."""
    with _flash_kernels():
        yield


def pytest_configure(config):
    """Under pytest-xdist each worker runs on one core: torch's own threads would oversubscribe them."""
    import os

    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
