"""Test set-up: without a GPU, Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before hrmkernels'
Triton module is imported, which is why this happens at the top of conftest.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# backend="cpu" (the C++ kernels) joins the backend grids wherever a C++ compiler is: load the
# installed extension, or build it just-in-time (once per machine, cached), before the test
# modules ask available_backends() for their grids. None, or why it is not there.
from hrmkernels.kernels import native  # noqa: E402  (after TRITON_INTERPRET)

CPU_KERNELS_WHY = native.unavailable_reason("cpu")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
