"""LoRA embedding: the gather and the low-rank term in one kernel, and its backward.

    idx [T] (int32/int64), W [V, D], A [r, V], B [D, r], s = scaling, y [T, D] in W's dtype
    y[t]  = W[idx_t] + s·(A[:, idx_t]ᵀ·Bᵀ)                        one kernel, y written once
    g[t]  = dY[t]·B                                               [T, r] fp32, never stored (but below)
    dB    = s·Σ_t dY[t]ᵀ·A[:, idx_t]ᵀ                             [D, r] fp32
    dA[:, v] = s·Σ_{t: idx_t = v} g[t] / (count(v) if scale_grad_by_freq)   for v ≠ padding_idx

Precision (precision.py): the forward's A·B product multiplies 16-bit adapters natively and fp32 ones as
one TF32 product (the sum is rounded to the table's 16 bits; fp32 tables: TF32x3); the backward's two
products read dY and the adapters from memory: native for equal 16-bit dtypes, TF32x3 with an fp32 side.

Forward: each program owns BLOCK_T tokens, gathers their A columns once (rank ≤ R_CHUNK) and streams
their W rows along D (SPLIT_D programs share a band's D tiles), adding s·A[:, idx]ᵀ·Bᵀ per tile in
fp32 and rounding once. Nothing of size [T, D] exists but y. Out-of-range indices are masked (rows of
zeros); the host refuses them before launching, so that only matters under CUDA graph capture.

Backward: each program owns BLOCK_T tokens and R_BLOCK rank columns; one pass over its dY band gives g
(reduced over D inside the program) and partial dB tiles (reduced over tokens across programs). Then
s·g is scattered into A's columns. The cross-program sums use fp32 atomics into zeroed buffers; in
deterministic mode (``torch.use_deterministic_algorithms``) dB goes to one slice per band, summed on the
host in a fixed order, and s·g is stored per token; a second kernel then sums each index's tokens in
token order (indices stably sorted on the host), one program per run of equal indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import admitted, device_arch, embedding_r_block, embedding_r_chunk, embedding_table, keep_embedding
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .precision import lora_dot, lora_mode, native_16bit
from .utils import bucket, check_interpretable, launch, rank_pad


@triton.jit
def _token_rows(idx_ptr, offs_t, T, V):
    """(row index as int64, in range) for tokens offs_t; out-of-range rows read row 0, masked."""
    t_ok = offs_t < T
    idx = tl.load(idx_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)
    ok = t_ok & (idx >= 0) & (idx < V)
    return tl.where(ok, idx, 0), ok


@triton.jit
def _gather_at(a_ptr, idx, ok, offs_r, R, stride_ar, stride_av):
    """A[offs_r, idx]ᵀ: [BLOCK_T, len(offs_r)], zero for masked tokens and padded rank columns."""
    ptrs = a_ptr + offs_r[None, :] * stride_ar + idx[:, None] * stride_av
    return tl.load(ptrs, mask=ok[:, None] & (offs_r[None, :] < R), other=0.0)


# fmt: off
@triton.jit(do_not_specialize=["T"])
def _lora_embedding_fwd_kernel(
    # pointers
    idx_ptr, w_ptr, a_ptr, b_ptr, y_ptr,
    # sizes
    T, V, D, R,
    # strides
    stride_wv, stride_wd, stride_ar, stride_av, stride_bd, stride_br, stride_yt, stride_yd,
    # s
    scale,
    # meta-parameters
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
):
    # fmt: on
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    idx, ok = _token_rows(idx_ptr, offs_t, T, V)
    offs_c = tl.arange(0, R_CHUNK)
    offs_bd = tl.arange(0, BLOCK_D)
    if R_PAD == R_CHUNK:  # one rank slice: gather the tokens' A columns once
        at = _gather_at(a_ptr, idx, ok, offs_c, R, stride_ar, stride_av)
    w_rows = w_ptr + idx[:, None] * stride_wv
    y_rows = y_ptr + offs_t[:, None].to(tl.int64) * stride_yt
    t_ok = offs_t < T

    for i in range(0, tl.cdiv(D, BLOCK_D * SPLIT_D)):
        offs_d = (i * SPLIT_D + pid_d) * BLOCK_D + offs_bd
        d_ok = offs_d < D
        low = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        if R_PAD == R_CHUNK:
            bt = tl.load(
                b_ptr + offs_d[None, :] * stride_bd + offs_c[:, None] * stride_br,
                mask=(offs_c[:, None] < R) & d_ok[None, :],
                other=0.0,
            )
            low = lora_dot(at, bt, low, LORA_MODE, LORA_DTYPE)
        else:
            for c in range(0, R_PAD // R_CHUNK):
                offs_r = c * R_CHUNK + offs_c
                at_c = _gather_at(a_ptr, idx, ok, offs_r, R, stride_ar, stride_av)
                bt = tl.load(
                    b_ptr + offs_d[None, :] * stride_bd + offs_r[:, None] * stride_br,
                    mask=(offs_r[:, None] < R) & d_ok[None, :],
                    other=0.0,
                )
                low = lora_dot(at_c, bt, low, LORA_MODE, LORA_DTYPE)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        y = w.to(tl.float32) + scale * low
        tl.store(y_rows + offs_d[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


# fmt: off
@triton.jit(do_not_specialize=["T", "padding_idx"])
def _lora_embedding_bwd_kernel(
    # pointers
    dy_ptr, idx_ptr, a_ptr, b_ptr, cnt_ptr, db_ptr, da_ptr, g_ptr,
    # sizes; padding_idx is -1 when there is none
    T, V, D, R, padding_idx,
    # strides (db carries a leading per-band stride, 0 unless deterministic)
    stride_dyt, stride_dyd, stride_ar, stride_av, stride_bd, stride_br,
    stride_dbp, stride_dbd, stride_dbr, stride_dar, stride_dav, stride_gt, stride_gr,
    # s
    scale,
    # meta-parameters
    R_BLOCK: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, SCALE_FREQ: tl.constexpr,
    DETERMINISTIC: tl.constexpr, LORA_MODE: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # fmt: on
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < T
    idx, ok = _token_rows(idx_ptr, offs_t, T, V)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    r_ok = offs_r < R
    offs_bd = tl.arange(0, BLOCK_D)
    dy_rows = dy_ptr + offs_t[:, None].to(tl.int64) * stride_dyt
    if DETERMINISTIC:  # this band's own slice of the dB partial sums
        db_ptr += pid.to(tl.int64) * stride_dbp
    if COMPUTE_DB:
        at = _gather_at(a_ptr, idx, ok, offs_r, R, stride_ar, stride_av)

    # One pass over the dY band: g += dY·B (for dA) and partial dB = s·dYᵀ·A[:, idx]ᵀ per tile, tiles
    # visited in a program-rotated order so that programs do not queue on the same dB addresses.
    g = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    num_d = tl.cdiv(D, BLOCK_D)
    for i in range(0, num_d):
        offs_d = ((i + pid) % num_d) * BLOCK_D + offs_bd
        d_ok = offs_d < D
        dy = tl.load(dy_rows + offs_d[None, :] * stride_dyd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        if COMPUTE_DA:
            b = tl.load(
                b_ptr + offs_d[:, None] * stride_bd + offs_r[None, :] * stride_br,
                mask=d_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            g = lora_dot(dy, b, g, LORA_MODE, LORA_DTYPE)
        if COMPUTE_DB:
            part = lora_dot(tl.trans(dy), at, tl.zeros((BLOCK_D, R_BLOCK), dtype=tl.float32), LORA_MODE, LORA_DTYPE)
            part = part * scale
            db_ptrs = db_ptr + offs_d[:, None] * stride_dbd + offs_r[None, :] * stride_dbr
            if DETERMINISTIC:
                tl.store(db_ptrs, part, mask=d_ok[:, None] & r_ok[None, :])
            else:
                tl.atomic_add(db_ptrs, part, mask=d_ok[:, None] & r_ok[None, :], sem="relaxed")

    # s·g scattered into A's columns: padding_idx (and masked tokens) get nothing.
    if COMPUTE_DA:
        keep = ok & (idx != padding_idx)
        g = g * scale
        if SCALE_FREQ:
            cnt = tl.load(cnt_ptr + idx, mask=keep, other=1)
            g = g / cnt.to(tl.float32)[:, None]
        g = tl.where(keep[:, None], g, 0.0)
        if DETERMINISTIC:
            g_ptrs = g_ptr + offs_t[:, None].to(tl.int64) * stride_gt + offs_r[None, :] * stride_gr
            tl.store(g_ptrs, g, mask=t_ok[:, None] & r_ok[None, :])
        else:
            da_ptrs = da_ptr + offs_r[None, :] * stride_dar + idx[:, None] * stride_dav
            tl.atomic_add(da_ptrs, g, mask=keep[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["T"])
def _embedding_da_segments_kernel(
    sorted_ptr, perm_ptr, g_ptr, da_ptr,  # pointers: sorted indices, their token positions, s·g [T, r]
    T, R,  # sizes
    stride_gt, stride_gr, stride_dar, stride_dav,  # strides
    R_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr,  # meta-parameters
):
    """Deterministic dA: the program at the first position of each run of equal sorted indices sums
    that run's rows of s·g, BLOCK_T positions at a time, in token order; the others do nothing."""
    p = tl.program_id(0)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    r_ok = offs_r < R
    v = tl.load(sorted_ptr + p)
    prev = tl.load(sorted_ptr + p - 1, mask=p > 0, other=-1)
    head = (p == 0) | (prev != v)
    acc = tl.zeros((R_BLOCK,), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_T)
    q = p
    go = head
    while go:
        pos = q + offs
        same = tl.load(sorted_ptr + pos, mask=pos < T, other=-1) == v
        rows = tl.load(perm_ptr + pos, mask=same, other=0).to(tl.int64)
        g_ptrs = g_ptr + rows[:, None] * stride_gt + offs_r[None, :] * stride_gr
        part = tl.load(g_ptrs, mask=same[:, None] & r_ok[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
        q += BLOCK_T
        last = tl.load(sorted_ptr + q - 1, mask=q <= T, other=-1)
        go = (q < T) & (last == v)
    if head:
        tl.store(da_ptr + offs_r * stride_dar + v * stride_dav, acc, mask=r_ok)


def _forward_mode(table: torch.dtype, adapters: torch.dtype) -> tuple[int, object]:
    """A·B of two adapter tiles, added in fp32 and rounded to the table's dtype: equal 16-bit dtypes
    multiply natively, fp32 adapters as the GEMM epilogue does (TF32; fp32 tables: TF32x3)."""
    return native_16bit(table, adapters) if table == adapters else lora_mode(table, adapters, kept=False)


def lora_embedding_forward(
    idx: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    deterministic: bool = False,
) -> torch.Tensor:
    """y [T, D] = W[idx] + s·A[:, idx]ᵀ·Bᵀ in W's dtype, for idx [T] int32/int64 (contiguous), W [V, D],
    A [r, V], B [D, r] (any strides). Indices outside [0, V) give rows of zeros (check them first)."""
    (T,), (V, D), R = idx.shape, weight.shape, lora_A.shape[0]
    check_interpretable(weight, lora_A)
    y = torch.empty((T, D), dtype=weight.dtype, device=weight.device)
    if T == 0 or D == 0:
        return y
    e, r_pad = weight.element_size(), rank_pad(R)
    mode, mode_dtype = _forward_mode(weight.dtype, lora_A.dtype)
    variant = dict(R_PAD=r_pad, R_CHUNK=embedding_r_chunk(r_pad, e), LORA_MODE=mode, LORA_DTYPE=mode_dtype)

    def run(c) -> torch.Tensor:
        # fmt: off
        launch(
            _lora_embedding_fwd_kernel, (triton.cdiv(T, c.BLOCK_T), c.SPLIT_D),
            idx, weight, lora_A, lora_B, y,
            T, V, D, R,
            weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0),
            lora_B.stride(1), y.stride(0), y.stride(1),
            float(scale),
            **variant, **config_kwargs(c),
        )
        # fmt: on
        return y

    table = admitted(embedding_table("fwd"), keep_embedding, e, r_pad, device_arch(weight))
    if deterministic:  # a fixed configuration: the tile shapes never depend on what was timed
        return run(table[0])
    configs = {config_name(c): c for c in table}
    key = (str(weight.dtype), str(lora_A.dtype), bucket(T), D, r_pad)
    chosen = tuning.table("embedding_fwd").pick(key, list(configs), lambda n: (lambda: run(configs[n])), y.device)
    return run(configs[chosen])


def lora_embedding_backward(
    dy: torch.Tensor,
    idx: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    *,
    padding_idx: int | None = None,
    counts: torch.Tensor | None = None,
    need_dA: bool = True,
    need_dB: bool = True,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dA [r, V], dB [D, r]), fp32, each None when not asked for.

    dy [T, D] (any strides), idx [T] int32/int64 (contiguous, in range), A [r, V], B [D, r]. `counts`
    (int64 [V], how often each index occurs in idx) turns on scale_grad_by_freq for dA."""
    (T, D), (R, V) = dy.shape, lora_A.shape
    dev = dy.device
    check_interpretable(dy, lora_B)
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)
    if T == 0 or not (need_dA or need_dB):
        return (zeros(R, V) if need_dA else None), (zeros(D, R) if need_dB else None)
    e = dy.element_size()
    r_block = embedding_r_block(rank_pad(R), e)
    mode, mode_dtype = native_16bit(dy.dtype, lora_B.dtype, bf16_parts=False)  # BF16X3 spilled (sm_90a)
    dummy = torch.empty((1, 1, 1), dtype=torch.float32, device=dev)
    flags = dict(COMPUTE_DA=need_dA, COMPUTE_DB=need_dB, SCALE_FREQ=counts is not None, DETERMINISTIC=deterministic)

    def run(c) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Every call owns its buffers: atomics add into this call's zeroed dA/dB (timing runs included).
        bands = triton.cdiv(T, c.BLOCK_T)
        dA = zeros(R, V) if need_dA else None
        db = dummy
        if need_dB:
            db = torch.empty((bands, D, R), dtype=torch.float32, device=dev) if deterministic else zeros(1, D, R)
        g = torch.empty((T, R), dtype=torch.float32, device=dev) if deterministic and need_dA else dummy[0]
        da = dA if need_dA and not deterministic else dummy[0]
        # fmt: off
        launch(
            _lora_embedding_bwd_kernel, (bands, triton.cdiv(R, r_block)),
            dy, idx, lora_A, lora_B, counts if counts is not None else idx, db, da, g,
            T, V, D, R, -1 if padding_idx is None else int(padding_idx),
            dy.stride(0), dy.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            db.stride(0) if deterministic else 0, db.stride(1), db.stride(2), da.stride(0), da.stride(1),
            g.stride(0), g.stride(1),
            float(scale),
            R_BLOCK=r_block, LORA_MODE=mode, LORA_DTYPE=mode_dtype, **flags, **config_kwargs(c),
        )
        if deterministic and need_dA:  # each index's tokens summed in token order, no atomics
            sorted_idx, perm = torch.sort(idx.long(), stable=True)
            launch(
                _embedding_da_segments_kernel, (T, triton.cdiv(R, r_block)),
                sorted_idx, perm, g, dA,
                T, R, g.stride(0), g.stride(1), dA.stride(0), dA.stride(1),
                R_BLOCK=r_block, BLOCK_T=c.BLOCK_T,
            )
        # fmt: on
        if not need_dB:
            return dA, None
        return dA, (db.sum(0) if deterministic else db[0])

    table = admitted(embedding_table("bwd"), keep_embedding, e, r_block, device_arch(dy))
    if deterministic:
        return run(table[0])
    configs = {config_name(c): c for c in table}
    key = (str(dy.dtype), str(lora_B.dtype), bucket(T), D, r_block, need_dA, need_dB, counts is not None)
    chosen = tuning.table("embedding_bwd").pick(key, list(configs), lambda n: (lambda: run(configs[n])), dev)
    return run(configs[chosen])
