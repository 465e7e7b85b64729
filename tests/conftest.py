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
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
