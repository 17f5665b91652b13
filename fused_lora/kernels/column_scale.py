"""DoRA's column scale as two memory-bound passes (fp32 arithmetic, 16-bit tensors in and out).

    forward   y [M, N] = z ⊙ c[None, :] + bias           one read of z, one write of y
    backward  dz = dY ⊙ c,  dc = Σ_m dY ⊙ z,  dbias = Σ_m dY   one read of dY and z, one write of dz

When the scale rides in the GEMM's epilogue (fused_lora/dora_function.py: no bias, y = z ⊙ c saved
instead of z) the backward pass runs on y: Σ_m dY ⊙ y = c ⊙ dc, divided by c per column afterwards.
Where c_j = 0 that column of y is zero and says nothing about z (nor where |c_j| is so small that y
underflows, or c_j is not finite: :func:`lossy_columns`): :func:`dead_column_sums` recomputes
Σ_m dY_mj·z_mj there from x, W, xa and B (z = x·Wᵀ + xa·Bᵀ, fp32 accumulation). It is always launched
(no value is read back to the host), and a program whose block of columns has none flagged returns
after reading those BLOCK_N flags: the work is x·W_jᵀ for the flagged columns' blocks only.

c [N] and bias [N] are fp32 or z's dtype; the products and sums are fp32 and each output is rounded
once. The column sums are written per row band ([cdiv(M, BLOCK_M), N] fp32 partials) and summed by the
caller in a fixed order, so the result does not depend on scheduling. torch's own ops for the same
math would promote to an fp32 [M, N] temporary with fp32 adapters (≈ 12 bytes per element forward, ≈ 34
backward, against 4 and 6 here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch

BLOCK_M, BLOCK_N, NUM_WARPS = (16, 32, 4) if interpreting() else (64, 128, 4)


@triton.jit
def _scale_fwd_kernel(z_ptr, c_ptr, b_ptr, y_ptr, M, N, stride_zm, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zm + cols[None, :], mask=ok, other=0.0)
    c = tl.load(c_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = z.to(tl.float32) * c[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_bwd_kernel(dy_ptr, z_ptr, c_ptr, dz_ptr, dc_ptr, db_ptr, M, N, stride_dym, stride_zm, stride_dzm,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    r64 = rows[:, None].to(tl.int64)
    dy = tl.load(dy_ptr + r64 * stride_dym + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r64 * stride_zm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(dz_ptr + r64 * stride_dzm + cols[None, :], (dy * c[None, :]).to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(dc_ptr + pid_m * N + cols, tl.sum(dy * z, axis=0), mask=cols < N)
    tl.store(db_ptr + pid_m * N + cols, tl.sum(dy, axis=0), mask=cols < N)


def scale_fwd(z: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = z ⊙ c + bias for z [M, N] (unit column stride), c [N], bias [N] or None; y in z's dtype."""
    M, N = z.shape
    y = torch.empty_like(z, memory_format=torch.contiguous_format)
    if M and N and z.device.type != "meta":  # meta: shapes only (the benchmark's memory count)
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        launch(_scale_fwd_kernel, grid, z, c, bias if bias is not None else c, y, M, N, z.stride(0), y.stride(0),
               HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)  # fmt: skip
    return y


def scale_bwd(dy: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz [M, N] in z's dtype, dc [N] fp32, dbias [N] fp32) for y = z ⊙ c + bias."""
    M, N = z.shape
    dz = torch.empty_like(z, memory_format=torch.contiguous_format)
    bands = triton.cdiv(M, BLOCK_M)
    parts = torch.zeros((2, max(bands, 1), N), dtype=torch.float32, device=z.device)
    if M and N and z.device.type != "meta":
        grid = (bands, triton.cdiv(N, BLOCK_N))
        launch(_scale_bwd_kernel, grid, dy, z, c, dz, parts[0], parts[1], M, N, dy.stride(0), z.stride(0),
               dz.stride(0), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)  # fmt: skip
    sums = parts.sum(1)
    return dz, sums[0], sums[1]


@triton.jit
def _dead_columns_kernel(x_ptr, w_ptr, xa_ptr, b_ptr, dy_ptr, flag_ptr, out_ptr, M, N, K, R, rows_per,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_bn, stride_br, stride_dym,
                         stride_dyn,
                         MAIN_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, R_CHUNK: tl.constexpr):  # fmt: skip
    """out[split, j] = Σ_{m in this split's rows} dY_mj · (x_m·W_jᵀ + xa_m·B_jᵀ) for the columns j of this
    program's block whose flag is set (0 elsewhere); nothing but the flags is read when the block has none."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dead = tl.load(flag_ptr + cols, mask=cols < N, other=0) != 0
    if tl.max(dead.to(tl.int32), axis=0) > 0:
        part = tl.zeros((BLOCK_N,), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_CHUNK)
        c64 = cols.to(tl.int64)
        for m0 in range(split * rows_per, tl.minimum(split * rows_per + rows_per, M), BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            r64 = rows.to(tl.int64)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                xt = tl.load(x_ptr + r64[:, None] * stride_xm + kk[None, :] * stride_xk,
                             mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)  # fmt: skip
                wt = tl.load(w_ptr + c64[None, :] * stride_wn + kk[:, None] * stride_wk,
                             mask=dead[None, :] & (kk[:, None] < K), other=0.0)  # fmt: skip
                acc = tl.dot(xt, wt, acc, input_precision=MAIN_PRECISION)
            for r0 in range(0, R, R_CHUNK):
                rr = r0 + offs_r
                lt = tl.load(xa_ptr + r64[:, None] * stride_xam + rr[None, :],
                             mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
                bt = tl.load(b_ptr + c64[None, :] * stride_bn + rr[:, None] * stride_br,
                             mask=dead[None, :] & (rr[:, None] < R), other=0.0).to(tl.float32)  # fmt: skip
                acc = tl.dot(lt, bt, acc, input_precision="ieee")
            dy = tl.load(dy_ptr + r64[:, None] * stride_dym + c64[None, :] * stride_dyn,
                         mask=(rows[:, None] < M) & dead[None, :], other=0.0).to(tl.float32)  # fmt: skip
            part += tl.sum(dy * acc, axis=0)
        tl.store(out_ptr + split * N + cols, part, mask=cols < N)


# The smallest |c| from which y = z ⊙ c, rounded to y's dtype, still carries z: fp16's normal range ends at
# 2⁻¹⁴, so with |c| ≥ 2⁻⁶ only |z| < 2⁻⁸ can fall into its subnormals (absolute error ≤ 2⁻²⁵ / |c| ≤ 2⁻¹⁹
# on such a z); bf16 and fp32 keep fp32's exponent range.
C_MIN = {torch.float16: 2.0**-6, torch.bfloat16: 2.0**-64, torch.float32: 2.0**-64}


def lossy_columns(c: torch.Tensor, y_dtype: torch.dtype) -> torch.Tensor:
    """bool [N]: the columns where y = z ⊙ c in `y_dtype` may not give z back (|c| below C_MIN, zero
    included, or c not finite): their Σ dY·z is recomputed from x (:func:`dead_column_sums`)."""
    return ~(c.abs() >= C_MIN[y_dtype]) | c.isinf()


DEAD_BLOCK_M, DEAD_BLOCK_N, DEAD_BLOCK_K = (16, 16, 16) if interpreting() else (64, 32, 32)
DEAD_STAGES = 2
DEAD_SPLITS = 8  # row splits: 8 · ⌈N / 32⌉ programs, each returning at once where none of its columns is flagged


def dead_column_sums(dy: torch.Tensor, flags: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, xa: torch.Tensor,
                     lora_B: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """fp32 [N]: Σ_m dY_mj · z_mj with z = x·Wᵀ + xa·Bᵀ for the columns whose flag is set (`flags` [N],
    bool, contiguous: :func:`lossy_columns`), 0 elsewhere.

    dy [M, N], x [M, K], weight [N, K] and lora_B [N, r] any strides, xa [M, r] fp32 (unit last stride).
    The partial sums per row split are added in a fixed order."""
    from .precision import main_precision

    M, N = dy.shape
    K, R = x.shape[1], xa.shape[1]
    splits = max(1, min(DEAD_SPLITS, triton.cdiv(M, DEAD_BLOCK_M)))
    parts = torch.zeros((splits, N), dtype=torch.float32, device=dy.device)
    if M and N and dy.device.type != "meta":
        rows_per = triton.cdiv(triton.cdiv(M, splits), DEAD_BLOCK_M) * DEAD_BLOCK_M
        grid = (triton.cdiv(N, DEAD_BLOCK_N), splits)
        launch(_dead_columns_kernel, grid, x, weight, xa, lora_B, dy, flags.view(torch.int8), parts, M, N, K, R,
               rows_per, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), lora_B.stride(0),
               lora_B.stride(1), dy.stride(0), dy.stride(1),
               MAIN_PRECISION=main_precision(x.dtype), BLOCK_M=DEAD_BLOCK_M, BLOCK_N=DEAD_BLOCK_N,
               BLOCK_K=DEAD_BLOCK_K, R_CHUNK=16, num_warps=4, num_stages=DEAD_STAGES)  # fmt: skip
    return parts.sum(0)
