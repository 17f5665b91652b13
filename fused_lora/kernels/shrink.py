"""Forward shrink: xa = s·drop(x)·Aᵀ, the [M, r] product, in fp32.

    x [M, K] (any strides), A [r, K], xa [M, r] fp32 (row stride padded to 16 bytes for TMA)
    xa = s · (x ⊙ mask)·Aᵀ / (1 - p)        mask from (seed, m, k), see dropout.py; p = 0 draws nothing

One pass over x: each program owns BLOCK_M rows and a 1/SPLIT_K share of the K blocks (strided), so
drop(x) exists only in registers. SPLIT_K > 1 keeps the GPU full when M is small: programs add their
partial products atomically into an xa this call allocated zeroed. The scale s is folded in here, so xa
feeds the fused GEMM's epilogue (y += xa·Bᵀ) and, kept for backward, dB = dYᵀ·xa, with no further
scaling; the backward never reads x or draws the mask for dB.

Precision: 16-bit x with adapters of its dtype multiply natively; fp32 adapters are split into two
TF32 terms (x is exact in TF32), so xa has fp32 accuracy (see precision.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import ShrinkConfig, admitted, deterministic_entry, device_arch, keep_shrink, shrink_table
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .dropout import drop_threshold, keep_mask
from .precision import BF16X3, bf16_parts, dot_bf16_parts, load_bf16_parts, lora_dot, native_16bit
from .utils import bucket, check_interpretable, launch, rank_pad, row_padded


# fmt: off
@triton.jit(do_not_specialize=["M", "threshold"])
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    # sizes
    M, K, R,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    # BF16X3 (LORA_MODE 3): a_ptr holds A's three bf16 parts (precision.bf16_parts), this far apart
    stride_ap,
    # dropout: round(p·2^16); the output scale s/(1-p) (s without dropout)
    threshold, out_scale,
    # meta-parameters
    R_PAD: tl.constexpr, DROPOUT: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # fmt: on
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k0 = pid_k * BLOCK_K
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # 64-bit: x may be huge or transposed
    at_ptrs = a_ptr + (k0 + offs_k[:, None]) * stride_ak + offs_r[None, :] * stride_ar  # Aᵀ [BLOCK_K, R_PAD]
    row_ok = offs_m[:, None] < M
    rank_ok = offs_r[None, :] < R
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # K blocks pid_k, pid_k + SPLIT_K, ...: a bound that does not depend on pid_k (the last round may be
    # fully masked for some programs), so the loop count is uniform.
    for i in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        kb = i * SPLIT_K + pid_k
        k_left = K - kb * BLOCK_K
        cols = (kb * BLOCK_K + offs_k[None, :]).to(tl.int64)
        x = tl.load(x_rows + cols * stride_xk, mask=row_ok & (offs_k[None, :] < k_left), other=0.0)
        at_ok = (offs_k[:, None] < k_left) & rank_ok
        if DROPOUT:  # a product, as torch's dropout: NaN or inf at a dropped position stays NaN
            x = x * keep_mask(seed, offs_m, kb * BLOCK_K, threshold, BLOCK_M, BLOCK_K).to(x.dtype)
        if LORA_MODE == 3:  # BF16X3, A split on the host: three bf16 loads, no split in the loop
            at_hi, at_mid, at_lo = load_bf16_parts(at_ptrs, stride_ap, at_ok)
            acc = dot_bf16_parts(x, at_hi, at_mid, at_lo, acc)
        else:
            acc = lora_dot(x, tl.load(at_ptrs, mask=at_ok, other=0.0), acc, LORA_MODE, LORA_DTYPE)
        at_ptrs += SPLIT_K * BLOCK_K * stride_ak
    acc = acc * out_scale

    out_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=row_ok & rank_ok)
    else:
        tl.atomic_add(out_ptrs, acc, mask=row_ok & rank_ok, sem="relaxed")


def shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """xa = scale·drop(x)·Aᵀ as fp32 [M, r], for x [M, K] and lora_A [r, K] (any strides).

    dropout_p > 0 needs `seed` (int64 [1] on x's device); the mask is the one :func:`dropout_mask` gives.
    The result's row stride is padded to 16 bytes (a TMA operand of the fused GEMM).
    """
    M, K = x.shape
    R = lora_A.shape[0]
    check_interpretable(x, lora_A)
    dropout = dropout_p > 0.0
    mode, mode_dtype = native_16bit(x.dtype, lora_A.dtype)
    a = bf16_parts(lora_A) if mode == int(BF16X3) else lora_A  # split once per call, not per tile
    variant = dict(R_PAD=rank_pad(R), DROPOUT=dropout, LORA_MODE=mode, LORA_DTYPE=mode_dtype)

    def run(c: ShrinkConfig) -> torch.Tensor:
        xa = row_padded(M, R, x.device)
        if M == 0:
            return xa
        if c.SPLIT_K > 1:  # partial products are added atomically: this call's own zeroed buffer
            xa.zero_()
        # fmt: off
        launch(
            _shrink_kernel, (triton.cdiv(M, c.BLOCK_M), c.SPLIT_K),
            x, a, xa, seed if dropout else xa,
            M, K, R,
            x.stride(0), x.stride(1), a.stride(-2), a.stride(-1), xa.stride(0), xa.stride(1),
            a.stride(0) if a.dim() == 3 else 0,
            drop_threshold(dropout_p), float(scale) / (1.0 - dropout_p),
            **variant, **config_kwargs(c),
        )
        # fmt: on
        return xa

    e, arch = x.element_size(), device_arch(x)
    if deterministic:  # no K split: no atomics, a fixed summation order
        return run(deterministic_entry("shrink", e, rank_pad(R), arch))
    configs = {config_name(c): c for c in admitted(shrink_table(), keep_shrink, e, rank_pad(R), arch)}
    key = (str(x.dtype), str(lora_A.dtype), bucket(M), K, rank_pad(R), dropout)
    chosen = tuning.table("shrink").pick(key, list(configs), lambda n: (lambda: run(configs[n])), x.device)
    return run(configs[chosen])
