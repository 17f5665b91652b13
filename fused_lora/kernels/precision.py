"""How the low-rank products multiply: one place that decides the operand precision, and the jit helper
every kernel calls for it.

Four modes, chosen on the host per product (:func:`lora_mode`) and passed as a constexpr:

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
             computes these in fp32, so must we — for fp16 and fp32 activations.
    BF16X3   the same products for bf16 activations with fp32 adapters: the one fp32 operand is split
             into three bf16 parts, v = hi + mid + lo (each the residual rounded to nearest bf16, 24
             significant bits in all, relative error <= 2^-25), and a·b = a·hi + a·mid + a·lo: three native
             bf16 MMAs with fp32 accumulation, each product exact in fp32. The big operand (dY or x, read
             from memory in bf16) goes to the tensor cores as it is: no conversion to fp32, no rounding,
             no split — TF32X3 converted every element of it and ran two TF32 MMAs (at half bf16's
             rate). Only the small adapter-side tile (B, xa, g: r columns) is split. Not for fp16
             activations: their MMA partner must be fp16, and fp16 parts of an fp32 value underflow or
             overflow where bf16's (fp32's exponent range) do not; and never for two fp32 operands.

Because the rounding is explicit (integer ops on the fp32 bits), the interpreter — whose tl.dot is exact
fp32 — computes the same operands as the GPU, and the parity tests see the real error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import launch

NATIVE: tl.constexpr = tl.constexpr(0)
TF32: tl.constexpr = tl.constexpr(1)
TF32X3: tl.constexpr = tl.constexpr(2)
BF16X3: tl.constexpr = tl.constexpr(3)

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
def round_bf16(v):
    """fp32 -> the nearest bf16 value (ties away from zero), as fp32 with the low 16 bits cleared, by
    integer ops on the bits (the interpreter's own fp32 -> bf16 cast truncates; this runs the same on
    both). The result converts to bf16 exactly. NaN and inf pass through, as in :func:`round_tf32`."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x8000) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v == v, rounded, v)


@triton.jit
def split_bf16(v):
    """fp32 v -> (hi, mid, lo) in bf16 with hi + mid + lo = v to 24 significant bits (|error| <= 2^-25
    |v| for normal parts; residuals computed exactly in fp32). hi = bf16(v), mid = bf16(v - hi),
    lo = bf16(v - hi - mid), each rounded to nearest by :func:`round_bf16`."""
    v = v.to(tl.float32)
    hi = round_bf16(v)
    r = v - hi
    mid = round_bf16(r)
    lo = round_bf16(r - mid)
    return hi.to(tl.bfloat16), mid.to(tl.bfloat16), lo.to(tl.bfloat16)


@triton.jit
def lora_dot(a, b, acc, MODE: tl.constexpr, DTYPE: tl.constexpr):
    """acc + a·b for a [m, k] and b [k, n] (fp32 or 16-bit each), fp32 accumulation, in `MODE`.

    DTYPE is the 16-bit dtype of the NATIVE mode (ignored otherwise)."""
    if MODE == 0:  # NATIVE
        return tl.dot(a.to(DTYPE), b.to(DTYPE), acc)
    if MODE == 3:  # BF16X3: one fp32 operand in three bf16 parts, the other bf16 as it is
        tl.static_assert(
            (a.dtype == tl.float32) != (b.dtype == tl.float32), "BF16X3 multiplies one fp32 operand by bf16"
        )
        if a.dtype == tl.float32:
            a_hi, a_mid, a_lo = split_bf16(a)
            b16 = b.to(tl.bfloat16)
            acc = tl.dot(a_hi, b16, acc)
            acc = tl.dot(a_mid, b16, acc)
            return tl.dot(a_lo, b16, acc)
        b_hi, b_mid, b_lo = split_bf16(b)
        a16 = a.to(tl.bfloat16)
        acc = tl.dot(a16, b_hi, acc)
        acc = tl.dot(a16, b_mid, acc)
        return tl.dot(a16, b_lo, acc)
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


@triton.jit
def load_bf16_parts(ptrs, stride_part, mask):
    """The three bf16 parts (hi, mid, lo) of an fp32 tile that :func:`bf16_parts` split on the host:
    `ptrs` address the hi part; mid and lo lie `stride_part` and 2·`stride_part` elements further."""
    hi = tl.load(ptrs, mask=mask, other=0.0)
    mid = tl.load(ptrs + stride_part, mask=mask, other=0.0)
    lo = tl.load(ptrs + 2 * stride_part, mask=mask, other=0.0)
    return hi, mid, lo


@triton.jit
def dot_bf16_parts(a, hi, mid, lo, acc):
    """acc + a·(hi + mid + lo): BF16X3 with the fp32 side split beforehand (a [m, k] bf16, parts [k, n])."""
    a16 = a.to(tl.bfloat16)
    acc = tl.dot(a16, hi, acc)
    acc = tl.dot(a16, mid, acc)
    return tl.dot(a16, lo, acc)


@triton.jit
def _bf16_parts_kernel(src_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    hi, mid, lo = split_bf16(tl.load(src_ptr + offs, mask=ok, other=0.0))
    tl.store(out_ptr + offs, hi, mask=ok)
    tl.store(out_ptr + numel + offs, mid, mask=ok)
    tl.store(out_ptr + 2 * numel + offs, lo, mask=ok)


def bf16_parts(t: torch.Tensor) -> torch.Tensor:
    """fp32 t (any shape and strides) -> bf16 [3, *t.shape], contiguous: hi, mid, lo with hi + mid + lo = t
    to 24 significant bits (:func:`split_bf16`, the same rounding as inside a kernel), in one launch.

    BF16X3 products whose fp32 operand is read from memory (A in the shrink, B in the grad pass) take it
    split once per call, not per tile: each tile then costs three bf16 loads (from L2: A and B are small)
    and no split instructions in the loop. 1.5x the fp32 tensor's bytes, for the call only."""
    if t.dtype != torch.float32:
        raise TypeError(f"bf16_parts: t must be float32, got {t.dtype}")
    src = t.contiguous()
    out = torch.empty((3, *t.shape), dtype=torch.bfloat16, device=t.device)
    if src.numel():
        block = 1024
        launch(_bf16_parts_kernel, (triton.cdiv(src.numel(), block),), src, out, src.numel(), BLOCK=block)
    return out


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


def lora_mode(
    x_dtype: torch.dtype, adapter_dtype: torch.dtype, kept: bool, bf16_parts: bool = True
) -> tuple[int, object]:
    """(MODE, DTYPE) for a low-rank product with activations `x_dtype` and adapters `adapter_dtype`.

    `kept`: the result is kept in fp32 (xa, g, fp32 adapters' dA/dB) rather than rounded to 16 bits.
    `bf16_parts`: BF16X3 allowed (bf16 activations, fp32 adapters, kept); a kernel whose fp32 tile is too
    wide for three bf16 copies in registers passes False and gets TF32X3 (the grad pass at rank blocks
    of 64: BF16X3 spilled 20-412 B there on sm_80; the embedding backward: 32 B on sm_90a).
    """
    if x_dtype == torch.float32:
        return (int(TF32X3) if fp32_precise() else int(TF32)), tl.float32
    if adapter_dtype == torch.float32:
        if not kept:
            return int(TF32), tl.float32
        return (int(BF16X3) if x_dtype == torch.bfloat16 and bf16_parts else int(TF32X3)), tl.float32
    if adapter_dtype == torch.bfloat16:  # bf16 has fp32's range: casting an fp32 intermediate is safe
        return int(NATIVE), tl.bfloat16
    # fp16 adapters: an fp32 intermediate (s·xa, s·g) may exceed 65504; keep it in fp32 (rounded TF32)
    return int(TF32), tl.float32


def native_16bit(x_dtype: torch.dtype, adapter_dtype: torch.dtype, bf16_parts: bool = True) -> tuple[int, object]:
    """(MODE, DTYPE) for a product of two tensors read from memory in x's and the adapters' dtypes
    (x·Aᵀ, dY·B): exact 16-bit operands multiply natively; an fp32 side needs BF16X3 (bf16 activations),
    TF32X3 (fp16, or where `bf16_parts` is False: see :func:`lora_mode`), or TF32 for fp32 activations
    that allow it."""
    if x_dtype == adapter_dtype and x_dtype != torch.float32:
        return int(NATIVE), _TL[x_dtype]
    return lora_mode(x_dtype, adapter_dtype, kept=True, bf16_parts=bf16_parts)
