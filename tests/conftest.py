"""Test setup: without a CUDA device, the Triton kernels run in Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when the
kernels are defined), hence here, before any test module imports kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kernels.memory  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN, so an element left unwritten fails the test."""
    kernels.memory.POISON = True
    yield
    kernels.memory.POISON = False


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
