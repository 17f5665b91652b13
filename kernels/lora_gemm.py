"""The fused GEMM: a base matrix product with the low-rank term (and bias) added in its epilogue.

    out [M, N] = P [M, K] · Q [K, N]  +  scale · mask ⊙ (L [M, r] · R [r, N])  +  bias [N]

Forward (y):   P = x,  Q = Wᵀ,  L = xa = drop(x)·Aᵀ,  R = Bᵀ,  scale = s,        no mask,  bias
Backward (dX): P = dY, Q = W,   L = g = dY·B,          R = A,   scale = s/(1-p),  mask of x, no bias

Every operand is addressed through its strides, so Wᵀ, Bᵀ and non-contiguous activations are views,
never copies. Each program computes one [BLOCK_M, BLOCK_N] tile in one fp32 accumulator: the K loop
accumulates P·Q (tensor cores) and scale·L·R is added to the same accumulator (walking the rank in
R_CHUNK slices) — after the loop for y, before it for dX with dropout, where the term is first masked
by the regenerated mask of x (element (m, n) of dX is element (m, k=n) of x) so that the masked term
never needs a second tile-sized buffer. Then bias, then one store: the low-rank term never exists as an
[M, N] tensor and the output is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import GEMM_R_CHUNK, deterministic_config, device_arch, gemm_configs, prune_gemm
from .dropout import drop_threshold, keep_mask
from .utils import bucket, fp32_dot_precision, launch, lora_compute_dtype, tile_coords


# fmt: off
@triton.jit
def _add_low_rank(acc, l_rows, r_cols, row_ok, col_ok, R, stride_lr, stride_rr, scale,
                  R_CHUNK: tl.constexpr, LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr):
    # fmt: on
    """acc + scale · L[rows, :R] · R[:R, cols], given the pointers to L's rows ([BLOCK_M, 1]) and R's
    columns ([1, BLOCK_N]). The rank is walked in R_CHUNK slices (scale folded into L in fp32, then L
    cast to LORA_DTYPE); not pipelined: a rank up to 16 is one slice."""
    offs_c = tl.arange(0, R_CHUNK)
    l_ptrs = l_rows + offs_c[None, :] * stride_lr
    r_ptrs = r_cols + offs_c[:, None] * stride_rr
    for rb in tl.range(0, tl.cdiv(R, R_CHUNK), num_stages=1):
        r_left = R - rb * R_CHUNK
        lt = tl.load(l_ptrs, mask=row_ok[:, None] & (offs_c[None, :] < r_left), other=0.0)
        rt = tl.load(r_ptrs, mask=(offs_c[:, None] < r_left) & col_ok[None, :], other=0.0)
        lt = (lt.to(tl.float32) * scale).to(LORA_DTYPE)
        acc = tl.dot(lt, rt.to(LORA_DTYPE), acc, input_precision=FP32_PRECISION)
        l_ptrs += R_CHUNK * stride_lr
        r_ptrs += R_CHUNK * stride_rr
    return acc


# fmt: off
@triton.autotune(
    configs=gemm_configs(),
    key=["M_BUCKET", "N", "K", "R_CHUNK", "HAS_BIAS", "DROPOUT", "LORA_DTYPE", "FP32_PRECISION"],
    prune_configs_by={"early_config_prune": prune_gemm},
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "threshold"])
def _lora_gemm_kernel(
    # pointers
    p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, out_ptr, seed_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on, stride_bias,
    # scalars: low-rank scale, floor(p·2^31)
    scale, threshold,
    # meta-parameters
    R_CHUNK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # fmt: on
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    rows, cols = offs_m.to(tl.int64), offs_n.to(tl.int64)  # 64-bit offsets: operands may be huge
    l_rows = l_ptr + rows[:, None] * stride_lm
    r_cols = r_ptr + cols[None, :] * stride_rn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        # dX: start from the masked low-rank term, so it never needs a second [BLOCK_M, BLOCK_N] buffer.
        acc = _add_low_rank(acc, l_rows, r_cols, row_ok, col_ok, R, stride_lr, stride_rr, scale,
                            R_CHUNK, LORA_DTYPE, FP32_PRECISION)
        keep = keep_mask(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, threshold, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc, 0.0)

    # Main loop: acc += P·Q over K, fp32 accumulation.
    p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + cols[None, :] * stride_qn
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        p = tl.load(p_ptrs, mask=row_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        q = tl.load(q_ptrs, mask=(offs_k[:, None] < k_left) & col_ok[None, :], other=0.0)
        acc = tl.dot(p, q, acc, input_precision=FP32_PRECISION)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk

    if not DROPOUT:
        # y: the low-rank term goes in the epilogue. (Chaining the prologue's and the main loop's MMAs
        # into one accumulator made ptxas serialize every wgmma on sm_90a.)
        acc = _add_low_rank(acc, l_rows, r_cols, row_ok, col_ok, R, stride_lr, stride_rr, scale,
                            R_CHUNK, LORA_DTYPE, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def lora_gemm(
    p: torch.Tensor,
    q: torch.Tensor,
    l: torch.Tensor,
    r: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """out [M, N] = p·q + scale·mask⊙(l·r) + bias, in one kernel.

    p [M, K] and q [K, N] share a dtype (fp32/fp16/bf16) and set the output's; l [M, r] is fp32;
    r [r, N] is fp32 or p's dtype; bias [N] is optional. dropout_p > 0 applies the mask of an x of shape
    [M, N] under `seed` to the low-rank term (the dX case). Any strides. `deterministic` runs one fixed
    configuration instead of the autotuned one (the same summation order in every run).
    """
    M, K = p.shape
    N = q.shape[1]
    R = l.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=p.dtype, device=p.device)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0
    kernel, cfg = _lora_gemm_kernel, {}
    if deterministic:
        kernel = _lora_gemm_kernel.fn
        cfg = deterministic_config("gemm", p.element_size(), R, device_arch(p), dropout)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    # fmt: off
    launch(
        kernel, grid,
        p, q, l, r, bias if bias is not None else out, out, seed if dropout else out,
        M, N, K, R, bucket(M),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), l.stride(0), l.stride(1), r.stride(0), r.stride(1),
        out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        float(scale), drop_threshold(dropout_p),
        R_CHUNK=GEMM_R_CHUNK, HAS_BIAS=bias is not None, DROPOUT=dropout,
        LORA_DTYPE=lora_compute_dtype(p.dtype, r.dtype), FP32_PRECISION=fp32_dot_precision(p.dtype), **cfg,
    )
    # fmt: on
    return out
