"""Helpers shared by every kernel: program ordering, dtype mapping, fp32 dot precision, launch counting.

Nothing here knows about modules or autograd; launchers in the sibling files call these.
"""

from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

# How many times each kernel was launched in this process, by kernel name. Tests read it to prove that
# the Triton kernels (not the reference) produced a result; benchmarks ignore it.
LAUNCHES: collections.Counter[str] = collections.Counter()

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch ``kernel[grid](*args, **kwargs)`` on the device of its first tensor argument (Triton would
    use the current device) and count it in :data:`LAUNCHES`."""
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "kernel")
    LAUNCHES[name] += 1
    first = next(a for a in args if isinstance(a, torch.Tensor))
    if first.device.type == "cuda":
        with torch.cuda.device(first.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


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


def fp32_dot_precision(activation_dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 operands (the adapters' products when A and B are fp32, or everything
    when the activations are fp32).

    With 16-bit activations the result is rounded to 16 bits anyway, so "tf32" (operands rounded to a
    10-bit mantissa, 8x finer than bf16's rounding of the output) costs nothing in accuracy; bf16/fp16
    operands are exact in tf32. With fp32 activations we follow torch's own setting for fp32 matmuls:
    "tf32" when it allows TF32 (``torch.backends.cuda.matmul.allow_tf32``), otherwise "tf32x3" (three
    TF32 products, fp32-level accuracy at tensor-core speed) rather than the slow "ieee" FMA path.
    """
    if activation_dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"


def lora_compute_dtype(x_dtype: torch.dtype, *adapter_dtypes: torch.dtype):
    """The dtype the low-rank products run in: fp32 when any adapter is fp32 (PEFT's default keeps
    adapters in fp32 under 16-bit training), otherwise the activations' dtype."""
    if torch.float32 in adapter_dtypes:
        return tl.float32
    return TORCH_TO_TL[x_dtype]


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
