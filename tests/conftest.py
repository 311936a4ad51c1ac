"""Fixtures shared by the test modules: the tiny LLaVA-1.5 (SDPA) and its padded two-prompt batch.

A module that needs another model or batch defines its own `model` / `batch`, which take precedence.
"""
from __future__ import annotations

import pytest

from tiny import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava("sdpa")


@pytest.fixture(scope="module")
def batch(model):
    return llava_inputs(model, [(5, 7), (2, 3)])


def pytest_configure(config):
    """Under pytest-xdist each worker runs on one core: torch's own threads would oversubscribe them."""
    import os

    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
