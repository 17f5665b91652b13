"""How the low-rank products multiply: one place that decides the operand precision, and the jit helper
every kernel calls for it.

Three modes, chosen on the host per product (:func:`lora_mode`) and passed as a constexpr:

    NATIVE   both operands in one 16-bit dtype (bf16 adapters on bf16 activations): one MMA, fp32
             accumulation; fp32 intermediates (xa, g) are rounded to that dtype first, as PEFT does.
    TF32     operands as fp32 rounded to nearest TF32 (10-bit mantissa, relative error <= 2^-11 each),
             one MMA. For products whose result is rounded to 16 bits anyway (y, dX; dA/dB of 16-bit
             adapters): 4x finer than bf16's own rounding, never an overflow (fp16 adapters keep fp32
             range), and no fp32 value is handed to the tensor cores unrounded (the hardware would
             truncate: a biased error twice as large).
    TF32X3   fp32 operands split as v = hi + lo, hi = rna_tf32(v), lo = rna_tf32(v - hi), and
             a·b ~ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi: fp32-level accuracy (relative error ~2^-21 per
             product) on tensor cores. A 16-bit operand is exact in TF32 (lo = 0), so its terms are
             skipped: two MMAs for the mixed products (bf16 x with fp32 adapters), three for fp32·fp32.
             Used where the result is fp32 and kept: xa, g, and the fp32 adapters' dA and dB — PEFT
             computes these in fp32, so must we.

Because the rounding is explicit (integer ops on the fp32 bits), the interpreter — whose tl.dot is exact
fp32 — computes the same operands as the GPU, and the parity tests see the real error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NATIVE: tl.constexpr = tl.constexpr(0)
TF32: tl.constexpr = tl.constexpr(1)
TF32X3: tl.constexpr = tl.constexpr(2)

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def round_tf32(v):
    """fp32 -> fp32 rounded to nearest TF32 (low 13 mantissa bits cleared, ties away from zero), what
    ``cvt.rna.tf32.f32`` computes, by integer ops on the bits so that the interpreter runs the same code.
    A finite value that rounds past the largest TF32 value becomes inf, inf stays inf, and a NaN stays a
    NaN: adding half an ulp to the bits of a NaN whose payload sits in the low mantissa bits would give
    inf, or ±0 for 0x7FFFFFFF — the canonical NaN NVIDIA GPUs produce — so NaNs bypass the rounding."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(v == v, rounded, v)


@triton.jit
def lora_dot(a, b, acc, MODE: tl.constexpr, DTYPE: tl.constexpr):
    """acc + a·b for a [m, k] and b [k, n] (fp32 or 16-bit each), fp32 accumulation, in `MODE`.

    DTYPE is the 16-bit dtype of the NATIVE mode (ignored otherwise)."""
    if MODE == 0:  # NATIVE
        return tl.dot(a.to(DTYPE), b.to(DTYPE), acc)
    # A 16-bit operand is exact in TF32: only fp32 operands are rounded (and split, below).
    a32 = a.to(tl.float32)
    b32 = b.to(tl.float32)
    if a.dtype == tl.float32:
        a_hi = round_tf32(a32)
    else:
        a_hi = a32
    if b.dtype == tl.float32:
        b_hi = round_tf32(b32)
    else:
        b_hi = b32
    acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    if MODE == 2:  # TF32X3: add the residual terms of the operands that are not exact in TF32
        if a.dtype == tl.float32:
            acc = tl.dot(round_tf32(a32 - a_hi), b_hi, acc, input_precision="tf32")
        if b.dtype == tl.float32:
            acc = tl.dot(a_hi, round_tf32(b32 - b_hi), acc, input_precision="tf32")
    return acc


def fp32_precise() -> bool:
    """With fp32 activations, follow torch's own setting for fp32 matmuls: TF32 allowed -> one rounded
    TF32 product, otherwise fp32-level (TF32X3)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # a torch without the fp32_precision API
        return not matmul.allow_tf32
    # Read the new setting: once it has been set, reading the legacy allow_tf32 raises in torch. It also
    # reflects the legacy flag (allow_tf32 = True reads back "tf32"); "none" inherits the global one.
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision != "tf32"


def main_precision(x_dtype: torch.dtype) -> str:
    """input_precision of the base GEMM's own tl.dot (only matters for fp32 activations)."""
    return "tf32x3" if x_dtype == torch.float32 and fp32_precise() else "tf32"


def lora_mode(x_dtype: torch.dtype, adapter_dtype: torch.dtype, kept: bool) -> tuple[int, object]:
    """(MODE, DTYPE) for a low-rank product with activations `x_dtype` and adapters `adapter_dtype`.

    `kept`: the result is kept in fp32 (xa, g, fp32 adapters' dA/dB) rather than rounded to 16 bits.
    """
    if x_dtype == torch.float32:
        return (int(TF32X3) if fp32_precise() else int(TF32)), tl.float32
    if adapter_dtype == torch.float32:
        return (int(TF32X3) if kept else int(TF32)), tl.float32
    if adapter_dtype == torch.bfloat16:  # bf16 has fp32's range: casting an fp32 intermediate is safe
        return int(NATIVE), tl.bfloat16
    # fp16 adapters: an fp32 intermediate (s·xa, s·g) may exceed 65504; keep it in fp32 (rounded TF32)
    return int(TF32), tl.float32


def native_16bit(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> tuple[int, object]:
    """(MODE, DTYPE) for a product of two tensors read from memory in x's and the adapters' dtypes
    (x·Aᵀ, dY·B): exact 16-bit operands multiply natively; an fp32 side needs TF32X3 (or TF32 for fp32
    activations that allow it)."""
    if x_dtype == adapter_dtype and x_dtype != torch.float32:
        return int(NATIVE), _TL[x_dtype]
    return lora_mode(x_dtype, adapter_dtype, kept=True)
