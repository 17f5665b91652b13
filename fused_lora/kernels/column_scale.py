"""DoRA's column scale as two memory-bound passes (fp32 arithmetic, 16-bit tensors in and out).

    forward   y [M, N] = z ⊙ c[None, :] + bias           one read of z, one write of y
    backward  dz = dY ⊙ c,  dc = Σ_m dY ⊙ z,  dbias = Σ_m dY   one read of dY and z, one write of dz

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
