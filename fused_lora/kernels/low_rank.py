"""The hybrid implementation's small kernel: the low-rank term alone, written as an [M, N] tensor for
cuBLAS to finish.

    out [M, N] = mask ⊙ (L [M, r] · R [r, N]) + bias [N]          (then out.addmm_(P, Q) in cuBLAS)

Forward:  L = xa, R = Bᵀ, bias, no mask      -> C;  y  = addmm(C, x, Wᵀ)
Backward: L = g,  R = A,  mask of x, no bias  -> T;  dX = addmm(T, dY, W)

DoRA's forward (a column scale c = m/n, no bias: fused_lora/dora_function.py) runs it the other way
round, after cuBLAS: y = (Z [M, N] + L·R) ⊙ c with Z = x·Wᵀ from cuBLAS, read as the tile's start
(`base`), since a per-column scale cannot ride on addmm.

It is the fused GEMM's epilogue (:mod:`kernels.epilogue`) with an empty main loop (K = 0): the same
rank walk, the same precision modes, the same dropout mask bit for bit. Memory-bound: it writes M·N
elements that cuBLAS reads back — one [M, N] write and read traded for cuBLAS's main loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import R_CHUNK, GemmConfig, admitted, device_arch, gemm_table, keep_gemm
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .dropout import mask_bits as _bits
from .epilogue import epilogue_operands, finish_tile
from .lora_gemm import tma_operand
from .precision import lora_mode
from .utils import bucket, check_interpretable, launch, rank_pad, tile_coords, tma_compatible


# fmt: off
@triton.jit(do_not_specialize=["M", "bits_words"])
def _low_rank_kernel(
    # pointers
    l_ptr, r_ptr, bias_ptr, scale_ptr, base_ptr, out_ptr, bits_ptr,
    # sizes
    M, N, R,
    # strides
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, stride_basem,
    # dropout: x's packed keep bits' words per row (fused_lora/kernels/dropout.py); groups (MergedLinear):
    # columns per group, rank-column bounds per group
    bits_words, group_n, groups_ptr,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, HAS_GROUPS: tl.constexpr, COL_SCALE: tl.constexpr,
    HAS_BASE: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    TMA: tl.constexpr, R_NR: tl.constexpr, R_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    # fmt: on
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    l_src, r_src, o_dst = epilogue_operands(
        l_ptr, r_ptr, out_ptr, M, N, R, stride_lm, stride_rr, stride_rn, stride_om,
        BLOCK_M, BLOCK_N, SUBTILES, R_CHUNK, TMA, R_NR, DROPOUT,
    )  # fmt: skip
    if HAS_BASE:  # the tile starts from cuBLAS's x·Wᵀ (unit column stride)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ptrs = base_ptr + rows[:, None].to(tl.int64) * stride_basem + cols[None, :]
        acc = tl.load(ptrs, mask=(rows[:, None] < M) & (cols[None, :] < N), other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    finish_tile(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words,
                groups_ptr, group_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
                stride_bias, BLOCK_M, BLOCK_N, SUBTILES, R_CHUNK, 0, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT,
                HAS_BIAS, HAS_GROUPS, COL_SCALE, out_ptr.dtype.element_ty)  # fmt: skip


def low_rank(
    l: torch.Tensor,
    r: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    keep_bits: torch.Tensor | None = None,
    lora_dtype: torch.dtype | None = None,
    groups: tuple[int, torch.Tensor] | None = None,
    x_dtype: torch.dtype | None = None,
    base: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """mask⊙(l·r) + bias as a new [M, N] tensor in `out_dtype`, for l [M, r] fp32 (scaled already) and
    r [r, N] (any strides); the mask is x's for an x of [M, N] under `seed` when dropout_p > 0; `groups` as
    for :func:`kernels.lora_gemm.lora_gemm`. `x_dtype` (default `out_dtype`): the activations' dtype, which
    picks the product's precision mode — an fp32 `out_dtype` for 16-bit activations keeps the term unrounded
    for an fp32-output addmm, in the mode the fused GEMM uses for those activations. `keep_bits`: the
    mask packed (else drawn from `seed` first), as for :func:`kernels.lora_gemm.lora_gemm`.
    `base` [M, N] (unit column stride, any float dtype): the term is added to it (DoRA's hybrid: cuBLAS's
    x·Wᵀ); `col_scale` fp32 [N] (contiguous) multiplies the sum before the bias. The output is always a
    new tensor: the tuner runs a candidate several times on the same inputs."""
    M, R = l.shape
    N = r.shape[1]
    check_interpretable(r)
    out = torch.empty((M, N), dtype=out_dtype, device=l.device)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0
    bits = _bits(keep_bits, seed, M, N, dropout_p, l.device) if dropout else None
    lora_dtype = lora_dtype or r.dtype
    arch = device_arch(l)
    tma = arch >= 90 and tma_compatible(out, l)
    r_nr = False
    if tma:
        r, r_nr = tma_operand(r)
    mode, mode_dtype = lora_mode(x_dtype or out_dtype, lora_dtype, kept=False)
    variant = dict(
        HAS_BIAS=bias is not None, DROPOUT=dropout, HAS_GROUPS=groups is not None, COL_SCALE=col_scale is not None,
        HAS_BASE=base is not None, LORA_MODE=mode, LORA_DTYPE=mode_dtype, TMA=tma, R_NR=r_nr, R_CHUNK=R_CHUNK,
    )  # fmt: skip
    args = (
        l, r, bias if bias is not None else out, col_scale if col_scale is not None else out,
        base if base is not None else out, out, bits if dropout else out,
        M, N, R,
        l.stride(0), l.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        bias.stride(0) if bias is not None else 0, base.stride(0) if base is not None else 0,
        bits.shape[1] if dropout else 0, groups[0] if groups else 1,
        groups[1] if groups else out,
    )  # fmt: skip

    def run(c: GemmConfig) -> torch.Tensor:
        grid = (triton.cdiv(M, c.BLOCK_M) * triton.cdiv(N, c.BLOCK_N),)
        launch(_low_rank_kernel, grid, *args, **variant, **config_kwargs(c))
        return out

    e = torch.empty((), dtype=out_dtype).element_size()
    configs = {config_name(c): c for c in admitted(gemm_table(low_rank=True), keep_gemm, e, dropout, arch, tma)}
    key = (str(out_dtype), str(x_dtype or out_dtype), str(lora_dtype), bucket(M), N, rank_pad(R), dropout)
    key += (bias is not None, tma, bool(groups)) + (("base", str(base.dtype)) if base is not None else ())
    key += ("col_scale",) if col_scale is not None else ()
    chosen = tuning.table("low_rank").pick(key, list(configs), lambda n: (lambda: run(configs[n])), l.device)
    return run(configs[chosen])
