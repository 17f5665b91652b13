"""pytest-benchmark suite set-up: without a CUDA GPU the kernels run through Triton's interpreter (a
smoke run, labelled as such, never a speed claim)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
