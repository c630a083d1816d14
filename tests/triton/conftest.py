"""Kernel tests run the rendered Triton kernels under the interpreter when no GPU is present.
The variable must be set before any rendered module is imported (triton reads it when a
kernel is decorated)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

