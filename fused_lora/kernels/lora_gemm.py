"""The fused GEMM: a base matrix product with the low-rank term (and bias) added in its epilogue.

    out [M, N] = (P [M, K] · Q [K, N]  +  mask ⊙ (L [M, r] · R [r, N])) ⊙ c [N]  +  bias [N]

Forward (y):   P = x,  Q = Wᵀ,  L = s·drop(x)·Aᵀ (xa, fp32),    R = Bᵀ,  no mask,    bias
Backward (dX): P = dY, Q = W,   L = s/(1-p)·dY·B (g, fp32),     R = A,   mask of x,  no bias
c, an optional fp32 column scale, is DoRA's m/n (fused_lora/dora_function.py); without it c = 1.

Persistent: about one program per SM walks the output tiles in grouped order (GROUP_M row-blocks share
their column tiles while those are in L2), so descriptors are made once per program. On the Hopper path
with an unrolled rank walk (R_SLICES > 0: r <= 16, ungrouped; :func:`kernels.configs.rank_slices`) the
tile walk holds one loop, and ``tl.range(..., flatten=True)`` fuses it with the K loop: one software
pipeline whose mbarriers are set up once per program, the next tile's first operand loads issued before
this tile's epilogue (the TTGIR shows it; compile_check's "loops" column says "one"). Otherwise (larger
ranks, grouped adapters, the pointer path) the K loop stays nested in the tile loop and the pipeline is
filled and drained per tile. One kernel body, two ways to load tiles:

- Hopper (TMA=True): P, Q, L, R and the output go through device-side TMA descriptors
  (``tl.make_tensor_descriptor``; out-of-range rows and columns read as zero, stores are clipped), the
  main loop is Triton's pipelined wgmma loop. Needs 16-byte aligned bases and strides and unit last
  strides (:func:`kernels.utils.tma_compatible`); a view that is not falls back to the pointer path.
- Ampere and anything unaligned (TMA=False): masked pointer loads (cp.async, mma.sync on sm_80), any
  strides, 64-bit offsets.

The epilogue (:mod:`kernels.epilogue`) adds the low-rank term in the accumulator (y) or, masked, per
column slice (dX), adds the bias and stores: the low-rank term never exists as an [M, N] tensor and the
output is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import R_CHUNK, GemmConfig, admitted, deterministic_entry, device_arch, gemm_table, keep_gemm, rank_slices
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .dropout import mask_bits as _bits
from .epilogue import epilogue_operands, finish_tile
from .precision import lora_mode, main_precision
from .utils import (
    bucket,
    check_interpretable,
    launch,
    num_programs,
    rank_pad,
    row_padded,
    tile_coords,
    tma_compatible,
)

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# fmt: off
@triton.jit(do_not_specialize=["M", "bits_words"])
def _lora_gemm_kernel(
    # pointers
    p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, scale_ptr, out_ptr, bits_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_pm, stride_pk, stride_qk, stride_qn, stride_lm, stride_lr, stride_rr, stride_rn,
    stride_om, stride_on, stride_bias,
    # dropout: x's packed keep bits' words per row (fused_lora/kernels/dropout.py); groups (MergedLinear):
    # columns per group, rank-column bounds per group
    bits_words, group_n, groups_ptr,
    # meta-parameters: variant
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, HAS_GROUPS: tl.constexpr, COL_SCALE: tl.constexpr,
    LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    MAIN_PRECISION: tl.constexpr, TMA: tl.constexpr, Q_NK: tl.constexpr, R_NR: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, R_CHUNK: tl.constexpr, R_SLICES: tl.constexpr,
    # meta-parameters: configuration
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUBTILES: tl.constexpr,
):
    # fmt: on
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if TMA:  # Q_NK: Q is the transpose of an [N, K] row-major tensor (Wᵀ)
        p_src = tl.make_tensor_descriptor(p_ptr, [M, K], [stride_pm, 1], [BLOCK_M, BLOCK_K])
        if Q_NK:
            q_src = tl.make_tensor_descriptor(q_ptr, [N, K], [stride_qn, 1], [BLOCK_N, BLOCK_K])
        else:
            q_src = tl.make_tensor_descriptor(q_ptr, [K, N], [stride_qk, 1], [BLOCK_K, BLOCK_N])
    l_src, r_src, o_dst = epilogue_operands(
        l_ptr, r_ptr, out_ptr, M, N, R, stride_lm, stride_rr, stride_rn, stride_om,
        BLOCK_M, BLOCK_N, SUBTILES, R_CHUNK, TMA, R_NR, DROPOUT,
    )  # fmt: skip

    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=TMA):
        pid_m, pid_n = tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if TMA:
            for ki in range(k_tiles):
                a = p_src.load([off_m, ki * BLOCK_K])
                if Q_NK:
                    b = q_src.load([off_n, ki * BLOCK_K]).T
                else:
                    b = q_src.load([ki * BLOCK_K, off_n])
                acc = tl.dot(a, b, acc, input_precision=MAIN_PRECISION)
        else:
            rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            cols = (off_n + tl.arange(0, BLOCK_N)).to(tl.int64)
            offs_k = tl.arange(0, BLOCK_K)
            p_ptrs = p_ptr + rows[:, None] * stride_pm + offs_k[None, :] * stride_pk
            q_ptrs = q_ptr + offs_k[:, None] * stride_qk + cols[None, :] * stride_qn
            for ki in range(k_tiles):
                k_left = K - ki * BLOCK_K
                a = tl.load(p_ptrs, mask=(rows[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
                b = tl.load(q_ptrs, mask=(offs_k[:, None] < k_left) & (cols[None, :] < N), other=0.0)
                acc = tl.dot(a, b, acc, input_precision=MAIN_PRECISION)
                p_ptrs += BLOCK_K * stride_pk
                q_ptrs += BLOCK_K * stride_qk
        finish_tile(acc, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, groups_ptr,
                    group_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias,
                    BLOCK_M, BLOCK_N, SUBTILES, R_CHUNK, R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS,
                    HAS_GROUPS, COL_SCALE, out_ptr.dtype.element_ty)  # fmt: skip


def tma_path(p: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> bool:
    """Can the Hopper path address the big operands? P [M, K] and out row-major, Q either way round,
    all 16-byte aligned; and the device is a Hopper (or the interpreter)."""
    if device_arch(p) < 90 or not tma_compatible(p, out):
        return False
    return tma_compatible(q) or tma_compatible(q.t())


def tma_operand(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(r, transposed) for a low-rank operand R [r, N]: as it is when TMA can address it row-major or
    transposed; otherwise a row-padded copy of its transpose (adapter-sized: N·r elements)."""
    if tma_compatible(t):
        return t, False
    if tma_compatible(t.t()):
        return t, True
    padded = row_padded(t.shape[1], t.shape[0], t.device, t.dtype)
    padded.copy_(t.t())
    return padded.t(), True


def lora_gemm(
    p: torch.Tensor,
    q: torch.Tensor,
    l: torch.Tensor,
    r: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    keep_bits: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    deterministic: bool = False,
    lora_dtype: torch.dtype | None = None,
    groups: tuple[int, torch.Tensor] | None = None,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [M, N] = (p·q + mask⊙(l·r)) ⊙ col_scale + bias, in one persistent kernel.

    p [M, K] and q [K, N] share a dtype (fp32/fp16/bf16) and set the output's; l [M, r] is fp32 (scaled
    already); r [r, N] is fp32 or p's dtype; bias [N] optional. dropout_p > 0 applies the mask of an x
    of shape [M, N] under `seed` to the low-rank term (the dX case). Any strides. `deterministic` runs
    one fixed configuration (the same summation order in every run); otherwise the configuration is
    timed on first use of the problem (:mod:`kernels.tuning`). `lora_dtype`: the adapters' dtype when r
    was cast or copied from them (default r's). `groups` = (group_n, bounds) for grouped adapters
    (MergedLinear): output column n belongs to group q = n // group_n, whose rank columns are
    bounds[q] .. bounds[q + 1] (int32 [groups + 1] on the device); r must be zero outside them (the
    kernel skips the rank slices a tile's groups do not use, which is only right when it is).
    The epilogue reads the mask packed, 1 bit per element (fused_lora/kernels/dropout.py): `keep_bits`
    (int32 [M, ⌈N/32⌉], the dA pass stores it in training), or drawn from `seed` by a small kernel first.
    `col_scale`: fp32 [N] (contiguous) multiplying each output column before the bias (DoRA's m/n).
    """
    M, K = p.shape
    N = q.shape[1]
    R = l.shape[1]
    check_interpretable(p, q, r)
    if out is None:
        out = torch.empty((M, N), dtype=p.dtype, device=p.device)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0.0
    bits = _bits(keep_bits, seed, M, N, dropout_p, p.device) if dropout else None
    lora_dtype = lora_dtype or r.dtype
    tma = tuning.table("gemm_path").pick((), ["tma", "pointer"] if tma_path(p, q, out) else ["pointer"], None,
                                         p.device) == "tma"  # fmt: skip
    q_nk = tma and not tma_compatible(q)
    if tma:
        r, r_nr = tma_operand(r)
        if not tma_compatible(l):  # l is ours (row-padded), but a caller may hand in any view
            l = l.contiguous() if R % 4 == 0 else _padded_copy(l)
    else:
        r_nr = False
    arch, e = device_arch(p), p.element_size()
    mode, mode_dtype = lora_mode(p.dtype, lora_dtype, kept=False)
    variant = dict(
        HAS_BIAS=bias is not None, DROPOUT=dropout, HAS_GROUPS=groups is not None, COL_SCALE=col_scale is not None,
        LORA_MODE=mode, LORA_DTYPE=mode_dtype,
        MAIN_PRECISION=main_precision(p.dtype), TMA=tma, Q_NK=q_nk, R_NR=r_nr,
        NUM_PROGRAMS=num_programs(p.device), R_CHUNK=R_CHUNK,
        R_SLICES=rank_slices(rank_pad(R), tma, groups is not None, mode, dropout),
    )  # fmt: skip
    pipelined = variant["R_SLICES"] > 0  # one loop across tiles (Hopper): its own shared-memory budget
    args = (
        p, q, l, r, bias if bias is not None else out, col_scale if col_scale is not None else out, out,
        bits if dropout else out,
        M, N, K, R,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), l.stride(0), l.stride(1), r.stride(0), r.stride(1),
        out.stride(0), out.stride(1), bias.stride(0) if bias is not None else 0,
        bits.shape[1] if dropout else 0, groups[0] if groups else 1,
        groups[1] if groups else out,
    )  # fmt: skip

    def run(c: GemmConfig) -> torch.Tensor:
        tiles = triton.cdiv(M, c.BLOCK_M) * triton.cdiv(N, c.BLOCK_N)
        programs = variant["NUM_PROGRAMS"] * c.programs_per_sm  # the persistent grid follows the config
        launch(_lora_gemm_kernel, (min(programs, tiles),), *args, **{**variant, "NUM_PROGRAMS": programs},
               **config_kwargs(c))  # fmt: skip
        return out

    if deterministic:
        return run(deterministic_entry("gemm", e, R, arch, dropout, tma, pipelined))
    configs = {config_name(c): c for c in admitted(gemm_table(), keep_gemm, e, dropout, arch, tma, 4, pipelined)}
    key = (str(p.dtype), str(lora_dtype), bucket(M), N, K, rank_pad(R), dropout, bias is not None, tma, q_nk)
    key += (groups is not None,) + (("col_scale",) if col_scale is not None else ())
    chosen = tuning.table("gemm").pick(key, list(configs), lambda n: (lambda: run(configs[n])), p.device)
    return run(configs[chosen])


def _padded_copy(t: torch.Tensor) -> torch.Tensor:
    padded = row_padded(t.shape[0], t.shape[1], t.device, t.dtype)
    padded.copy_(t)
    return padded
