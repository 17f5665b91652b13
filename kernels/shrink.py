"""Forward shrink: xa = drop(x)·Aᵀ, the [M, r] product, in fp32.

    x [M, K] (any strides), A [r, K], xa [M, r] fp32
    xa = (x ⊙ mask)·Aᵀ / (1 - p)        mask from (seed, m, k), see dropout.py; p = 0 draws nothing

One pass over x: each program owns BLOCK_M rows and a 1/SPLIT_K share of the K blocks (strided), so
drop(x) exists only in registers. SPLIT_K > 1 keeps the GPU full when M is small (programs add their
partial products atomically into a zeroed xa; the configuration's pre-hook zeroes it). xa feeds the
fused GEMM's epilogue (y += s·xa·Bᵀ) and is kept for backward (dB = s·dYᵀ·xa), so the backward never
reads x or draws the mask for it again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import deterministic_config, device_arch, prune_shrink, shrink_configs
from .dropout import drop_threshold, keep_mask
from .utils import bucket, fp32_dot_precision, launch, lora_compute_dtype, rank_pad


# fmt: off
@triton.autotune(
    configs=shrink_configs(),
    key=["M_BUCKET", "K", "R_PAD", "DROPOUT", "LORA_DTYPE", "FP32_PRECISION"],
    prune_configs_by={"early_config_prune": prune_shrink},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "threshold"])
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, xa_ptr, seed_ptr,
    # sizes
    M, K, R, M_BUCKET,
    # strides
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    # dropout: floor(p·2^31) and 1/(1-p)
    threshold, keep_scale,
    # meta-parameters
    R_PAD: tl.constexpr, DROPOUT: tl.constexpr, LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
        at = tl.load(at_ptrs, mask=(offs_k[:, None] < k_left) & rank_ok, other=0.0)
        if DROPOUT:
            x = tl.where(keep_mask(seed, offs_m, kb * BLOCK_K, threshold, BLOCK_M, BLOCK_K), x, 0.0)
        acc = tl.dot(x.to(LORA_DTYPE), at.to(LORA_DTYPE), acc, input_precision=FP32_PRECISION)
        at_ptrs += SPLIT_K * BLOCK_K * stride_ak
    if DROPOUT:
        acc = acc * keep_scale

    out_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=row_ok & rank_ok)
    else:
        tl.atomic_add(out_ptrs, acc, mask=row_ok & rank_ok, sem="relaxed")


def shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """xa = drop(x)·Aᵀ as fp32 [M, r], for x [M, K] and lora_A [r, K] (any strides).

    dropout_p > 0 needs `seed` (int64 [1] on x's device); the mask is the one :func:`dropout_mask` gives.
    """
    M, K = x.shape
    R = lora_A.shape[0]
    xa = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return xa
    dropout = dropout_p > 0.0
    if deterministic:
        # no K split: no atomics, a fixed summation order
        cfg = deterministic_config("shrink", x.element_size(), rank_pad(R), device_arch(x))
        kernel = _shrink_kernel.fn
    else:
        cfg, kernel = {}, _shrink_kernel
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), meta["SPLIT_K"])
    # fmt: off
    launch(
        kernel, grid,
        x, lora_A, xa, seed if dropout else xa,
        M, K, R, bucket(M),
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0), xa.stride(1),
        drop_threshold(dropout_p), 1.0 / (1.0 - dropout_p),
        R_PAD=rank_pad(R), DROPOUT=dropout, LORA_DTYPE=lora_compute_dtype(x.dtype, lora_A.dtype),
        FP32_PRECISION=fp32_dot_precision(x.dtype), **cfg,
    )
    # fmt: on
    return xa
