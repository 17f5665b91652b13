"""Test set-up. Without a CUDA GPU, the Triton kernels run through Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is imported, hence here). With a GPU, the same parity
tests run the compiled kernels on CUDA tensors, and the tests marked `gpu` run too."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fused_lora  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Every test starts from seed 0 and the kernels' backend, and leaves the backend as it found it."""
    torch.manual_seed(0)
    with fused_lora.use_backend("triton"):
        yield


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (bf16 parity, compiled kernels, CUDA graphs)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
