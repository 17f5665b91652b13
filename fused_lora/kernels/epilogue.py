"""The fused GEMM's epilogue, shared by the fused GEMM (``lora_gemm``) and the hybrid's low-rank term
(``low_rank``): everything that happens to an output tile after its main loop.

    tile [BLOCK_M, W] += mask ⊙ (L [BLOCK_M, r] · R [r, W])  +  bias [W],   then one store

L (xa or g, fp32, already scaled) and R (Bᵀ or A) are read through TMA descriptors on the Hopper path
(loaded from shared memory by the tensor cores: pointer loads of these small tiles inside the persistent
loop made ptxas serialise every wgmma, warning C7515) or through masked pointer loads on the Ampere
path. The rank is walked in R_CHUNK slices.

Without dropout the low-rank product accumulates straight into the [BLOCK_M, BLOCK_N] accumulator. With
dropout it must be masked before it is added, so it needs a tile of its own: the tile is split into
SUBTILES column slices (128x256 in four 128x64 slices) and each slice gets its product, its mask and its
store in turn — the main loop starts at once and the extra registers are a slice's, not a tile's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dropout import load_keep_bits
from .precision import lora_dot


@triton.jit
def r_tile(r_src, c, off_n, R_NR: tl.constexpr):
    """R[c : c + R_CHUNK, off_n : ...] through its TMA descriptor (stored as [N, R] when R_NR)."""
    if R_NR:
        rt = r_src.load([off_n, c]).T
    else:
        rt = r_src.load([c, off_n])
    return rt


# fmt: off
@triton.jit
def add_low_rank(acc, l_src, r_src, off_m, off_n, M, N, r_lo, r_hi, stride_lm, stride_lr, stride_rr, stride_rn,
                 WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, R_CHUNK: tl.constexpr, R_SLICES: tl.constexpr,
                 TMA: tl.constexpr, R_NR: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr):
    # fmt: on
    """acc [BLOCK_M, WIDTH] + L[off_m : off_m + BLOCK_M, r_lo:r_hi] · R[r_lo:r_hi, off_n : off_n + WIDTH].

    TMA: l_src / r_src are descriptors (R as [N, R] when R_NR, else [R, N]); otherwise pointers. A TMA
    slice may read rank columns past r_hi (up to the next R_CHUNK boundary): they hold L's zero padding
    or the rank columns of another group, where this tile's rows of R are zero.

    R_SLICES > 0 (TMA, ungrouped: r_lo = 0): the walk is R_SLICES slices unrolled at compile time, reading
    zeros past R; no loop is left in the epilogue, so the persistent loop around it can be flattened
    into one pipeline with the K loop (Triton fuses a nest only when the outer loop holds one loop)."""
    if TMA and R_SLICES > 0:
        for i in tl.static_range(R_SLICES):
            acc = lora_dot(l_src.load([off_m, i * R_CHUNK]), r_tile(r_src, i * R_CHUNK, off_n, R_NR), acc, LORA_MODE,
                           LORA_DTYPE)  # fmt: skip
    elif TMA:
        for c in range(r_lo, r_hi, R_CHUNK):
            acc = lora_dot(l_src.load([off_m, c]), r_tile(r_src, c, off_n, R_NR), acc, LORA_MODE, LORA_DTYPE)
    else:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, WIDTH)
        offs_c = r_lo + tl.arange(0, R_CHUNK)
        l_ptrs = l_src + offs_m[:, None].to(tl.int64) * stride_lm + offs_c[None, :] * stride_lr
        r_ptrs = r_src + offs_c[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn
        offs_c = tl.arange(0, R_CHUNK)
        for c in range(r_lo, r_hi, R_CHUNK):
            r_left = r_hi - c
            lt = tl.load(l_ptrs, mask=(offs_m[:, None] < M) & (offs_c[None, :] < r_left), other=0.0)
            rt = tl.load(r_ptrs, mask=(offs_c[:, None] < r_left) & (offs_n[None, :] < N), other=0.0)
            acc = lora_dot(lt, rt, acc, LORA_MODE, LORA_DTYPE)
            l_ptrs += R_CHUNK * stride_lr
            r_ptrs += R_CHUNK * stride_rr
    return acc


# fmt: off
@triton.jit
def finish_slice(acc, lt, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R, stride_lm,
              stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, WIDTH: tl.constexpr, BLOCK_M:
              tl.constexpr, R_CHUNK: tl.constexpr, R_SLICES: tl.constexpr, TMA: tl.constexpr, R_NR: tl.constexpr,
              LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
              COL_SCALE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # fmt: on
    """One output slice [BLOCK_M, WIDTH] at (off_m, off_n): with DROPOUT add the masked low-rank
    product (the mask of element (m, n) is x's mask at (m, k = n): this is dX), add the bias, store.
    With one unrolled rank slice (TMA, R_SLICES = 1) `lt` is the tile's L, loaded once for all slices.
    The mask is read from x's packed keep bits (`bits_ptr`, `bits_words` per row: fused_lora/kernels/dropout.py),
    1 bit per element, stored by the dA pass that regenerated it (Philox here cost 35 % of the main loop's
    instructions at 128x256; the bits 14 %). COL_SCALE (DoRA's m/n): the slice times `scale_ptr`'s [N] fp32
    column scale, before the bias."""
    if DROPOUT and TMA and R_SLICES == 1:
        low = lora_dot(lt, r_tile(r_src, 0, off_n, R_NR), tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32), LORA_MODE,
                       LORA_DTYPE)  # fmt: skip
        keep = load_keep_bits(bits_ptr, off_m + tl.arange(0, BLOCK_M), off_n, M, bits_words, BLOCK_M, WIDTH)
        acc = acc + low * keep.to(tl.float32)
    elif DROPOUT:
        low = tl.zeros((BLOCK_M, WIDTH), dtype=tl.float32)
        low = add_low_rank(low, l_src, r_src, off_m, off_n, M, N, 0, R, stride_lm, stride_lr, stride_rr, stride_rn,
                           WIDTH, BLOCK_M, R_CHUNK, R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE)
        keep = load_keep_bits(bits_ptr, off_m + tl.arange(0, BLOCK_M), off_n, M, bits_words, BLOCK_M, WIDTH)
        acc = acc + low * keep.to(tl.float32)  # a product, as torch's dropout backward: NaN stays NaN
    offs_n = off_n + tl.arange(0, WIDTH)
    if COL_SCALE:
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = acc.to(OUT_DTYPE)
    if TMA:
        o_dst.store([off_m, off_n], out)
    else:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        ptrs = o_dst + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on
        tl.store(ptrs, out, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# fmt: off
@triton.jit
def epilogue_operands(l_ptr, r_ptr, out_ptr, M, N, R, stride_lm, stride_rr, stride_rn, stride_om,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILES: tl.constexpr, R_CHUNK: tl.constexpr,
                      TMA: tl.constexpr, R_NR: tl.constexpr, DROPOUT: tl.constexpr):
    # fmt: on
    """(L, R, out) as the epilogue reads and writes them: TMA descriptors (made once per program; R as
    its [N, r] transpose when R_NR, R's slices one epilogue slice wide with dropout) or the pointers."""
    if TMA:
        W: tl.constexpr = BLOCK_N // SUBTILES
        RW: tl.constexpr = W if DROPOUT else BLOCK_N  # columns of R one epilogue product reads
        l_src = tl.make_tensor_descriptor(l_ptr, [M, R], [stride_lm, 1], [BLOCK_M, R_CHUNK])
        if R_NR:
            r_src = tl.make_tensor_descriptor(r_ptr, [N, R], [stride_rn, 1], [RW, R_CHUNK])
        else:
            r_src = tl.make_tensor_descriptor(r_ptr, [R, N], [stride_rr, 1], [R_CHUNK, RW])
        o_dst = tl.make_tensor_descriptor(out_ptr, [M, N], [stride_om, 1], [BLOCK_M, W])
        return l_src, r_src, o_dst
    else:
        return l_ptr, r_ptr, out_ptr


@triton.jit
def halves(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """[ROWS, COLS] -> its left and right [ROWS, COLS // 2] halves (registers only)."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, COLS // 2)), (0, 2, 1)))


# fmt: off
@triton.jit
def finish_tile(acc, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, groups_ptr,
                group_n, M, N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBTILES: tl.constexpr, R_CHUNK: tl.constexpr,
                R_SLICES: tl.constexpr, TMA: tl.constexpr, R_NR: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
                DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUPS: tl.constexpr, COL_SCALE: tl.constexpr,
                OUT_DTYPE: tl.constexpr):
    # fmt: on
    """The whole epilogue of one [BLOCK_M, BLOCK_N] tile: the low-rank term (in the accumulator without
    dropout; per slice with it), the column scale (COL_SCALE: DoRA), bias, and the store in SUBTILES
    slices (1, 2 or 4).

    HAS_GROUPS (MergedLinear, fused q/k/v): output columns come in groups of `group_n`; group q uses rank
    columns groups[q] .. groups[q + 1] of L (none for a disabled group) and R is zero outside them, so the
    tile walks only the R_CHUNK slices of rank columns that hold the groups its columns touch (a tile may
    straddle two groups): with three groups of r = 16, a tile inside one group does a third of the work."""
    if not DROPOUT:
        r_lo = 0
        r_hi = R
        if HAS_GROUPS:  # from the first group's first rank column, down to a slice start (TMA alignment)
            r_lo = tl.load(groups_ptr + off_n // group_n) // R_CHUNK * R_CHUNK
            r_hi = tl.load(groups_ptr + (tl.minimum(off_n + BLOCK_N, N) - 1) // group_n + 1)
        acc = add_low_rank(acc, l_src, r_src, off_m, off_n, M, N, r_lo, r_hi, stride_lm, stride_lr, stride_rr,
                           stride_rn, BLOCK_N, BLOCK_M, R_CHUNK, R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE)
    W: tl.constexpr = BLOCK_N // SUBTILES
    if DROPOUT and TMA and R_SLICES == 1:  # every slice's low-rank product uses the same L tile
        lt = l_src.load([off_m, 0])
    else:
        lt = 0
    if SUBTILES == 1:
        finish_slice(acc, lt, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M, R_CHUNK,
                     R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
    elif SUBTILES == 2:
        a0, a1 = halves(acc, BLOCK_M, BLOCK_N)
        finish_slice(a0, lt, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M, R_CHUNK,
                     R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
        finish_slice(a1, lt, off_m, off_n + W, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M, R_CHUNK,
                     R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
    else:
        tl.static_assert(SUBTILES == 4, "SUBTILES must be 1, 2 or 4")
        a0, a1 = halves(acc, BLOCK_M, BLOCK_N)
        a00, a01 = halves(a0, BLOCK_M, BLOCK_N // 2)
        a10, a11 = halves(a1, BLOCK_M, BLOCK_N // 2)
        finish_slice(a00, lt, off_m, off_n, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M, R_CHUNK,
                     R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
        finish_slice(a01, lt, off_m, off_n + W, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M, N, R,
                     stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M, R_CHUNK,
                     R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
        finish_slice(a10, lt, off_m, off_n + 2 * W, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M,
                     N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M,
                     R_CHUNK, R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
        finish_slice(a11, lt, off_m, off_n + 3 * W, o_dst, l_src, r_src, bias_ptr, scale_ptr, bits_ptr, bits_words, M,
                     N, R, stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on, stride_bias, W, BLOCK_M,
                     R_CHUNK, R_SLICES, TMA, R_NR, LORA_MODE, LORA_DTYPE, DROPOUT, HAS_BIAS, COL_SCALE, OUT_DTYPE)
