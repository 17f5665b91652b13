"""Helpers shared by every kernel: program ordering, launch counting, the TMA rules and allocator.

Nothing here knows about modules or autograd; launchers in the sibling files call these.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from ..backend import bf16_dot_wrong

# How many times each kernel was launched in this process, by kernel name. Tests read it to prove that
# the Triton kernels (not the reference) produced a result; benchmarks ignore it.
LAUNCHES: collections.Counter[str] = collections.Counter()
_INTERPRETER_LOCK = threading.Lock()


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_interpretable(*tensors) -> None:
    """Under the interpreter, refuse bf16 operands of matrix products: Triton's interpreter multiplies
    them wrongly (values ~1e10, triton-lang/triton#11584), and a wrong answer must never come back."""
    if bf16_dot_wrong() and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in tensors):
        raise TypeError(
            "bf16 tensors under TRITON_INTERPRET=1: Triton's interpreter computes bf16 matrix products "
            "wrongly; use fp16/fp32 here, the 'reference' backend, or a GPU"
        )


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on the device of its first tensor argument (Triton would
    use the current device), with a scratch allocator for device-side TMA descriptors, and count it in
    :data:`LAUNCHES`."""
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    LAUNCHES[name] += 1
    first = next(a for a in args if isinstance(a, torch.Tensor))
    with _scratch_allocator(first.device):
        if first.device.type == "cuda":
            with torch.cuda.device(first.device):
                kernel[grid](*args, **kwargs)
        else:  # Triton's interpreter patches triton.language globally while it runs: one launch at a time
            with _INTERPRETER_LOCK:
                kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def _scratch_allocator(device: torch.device):
    """Kernels that build TMA descriptors on the device (``tl.make_tensor_descriptor``) ask Triton for a
    little global scratch memory at launch. Triton's allocator lives in a ContextVar that is unset (an
    error) in every new thread; provide one from torch's caching allocator (CUDA-graph safe) for this
    launch only, leaving one the caller set in place."""
    var = getattr(_allocation, "_allocator", None)
    if var is None or var.get() is not getattr(_allocation, "_NULL_ALLOCATOR", None):
        yield
        return
    token = var.set(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    try:
        yield
    finally:
        var.reset(token)


def num_programs(device: torch.device) -> int:
    """Programs of a persistent grid: one per SM (a few under the interpreter, so that each program
    walks several tiles and the persistent loop is exercised)."""
    if device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """True when TMA can address every 2-D tensor given: last stride 1, the other stride and the base
    address multiples of 16 bytes (the hardware's rule; Triton's descriptors require it), and rows that
    do not overlap (an expanded view's row stride of 0, or rows closer than their length, go through
    pointers: nothing promises that a descriptor over overlapping rows is accepted)."""
    for t in tensors:
        e = t.element_size()
        if t.stride(1) != 1 or (t.stride(0) * e) % 16 or t.data_ptr() % 16:
            return False
        if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
            return False
    return True


def row_padded(rows: int, cols: int, device, dtype=torch.float32) -> torch.Tensor:
    """An empty [rows, cols] tensor whose row stride is padded to 16 bytes, so TMA can address it."""
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    stride = -(-cols // per16) * per16 if cols else per16
    return torch.empty((rows, stride), dtype=dtype, device=device)[:, :cols]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(n: int, lo: int = 16, hi: int = 1 << 16) -> int:
    """Autotune key for a size that changes from call to call (tokens): the next power of two, clamped.

    A new sequence length falls into a bucket that is already tuned, so it neither re-tunes nor
    recompiles (the kernels also mark M as not specialised)."""
    return max(lo, min(hi, next_pow2(n)))


def rank_pad(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, next_pow2(r))


@triton.jit
def tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-grouped") program order: GROUP_M row-blocks walk the columns together, so the
    operand tiles they share stay in L2. Returns (pid_m, pid_n)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
