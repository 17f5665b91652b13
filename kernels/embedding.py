"""LoRA embedding: the gather and the low-rank term in one kernel, and its backward.

    idx [T] (int32/int64), W [V, D], A [r, V], B [D, r], s = scaling, y [T, D] in W's dtype
    y[t]  = W[idx_t] + s·(A[:, idx_t]ᵀ·Bᵀ)                        one kernel, y written once
    g[t]  = dY[t]·B                                               [T, r] fp32, never stored (but below)
    dB    = s·Σ_t dY[t]ᵀ·A[:, idx_t]ᵀ                             [D, r] fp32
    dA[:, v] = s·Σ_{t: idx_t = v} g[t] / (count(v) if scale_grad_by_freq)   for v ≠ padding_idx

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

from .configs import (
    device_arch,
    embedding_configs,
    embedding_deterministic_config,
    embedding_r_block,
    embedding_r_chunk,
    prune_embedding_bwd,
    prune_embedding_fwd,
)
from .utils import bucket, fp32_dot_precision, launch, lora_compute_dtype, rank_pad


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
@triton.autotune(
    configs=embedding_configs("fwd"),
    key=["T_BUCKET", "D", "R_PAD", "LORA_DTYPE", "FP32_PRECISION"],
    prune_configs_by={"early_config_prune": prune_embedding_fwd},
)
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _lora_embedding_fwd_kernel(
    # pointers
    idx_ptr, w_ptr, a_ptr, b_ptr, y_ptr,
    # sizes
    T, V, D, R, T_BUCKET,
    # strides
    stride_wv, stride_wd, stride_ar, stride_av, stride_bd, stride_br, stride_yt, stride_yd,
    # s
    scale,
    # meta-parameters
    R_PAD: tl.constexpr, R_CHUNK: tl.constexpr, LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
        at = _gather_at(a_ptr, idx, ok, offs_c, R, stride_ar, stride_av).to(LORA_DTYPE)
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
            low = tl.dot(at, bt.to(LORA_DTYPE), low, input_precision=FP32_PRECISION)
        else:
            for c in range(0, R_PAD // R_CHUNK):
                offs_r = c * R_CHUNK + offs_c
                at_c = _gather_at(a_ptr, idx, ok, offs_r, R, stride_ar, stride_av).to(LORA_DTYPE)
                bt = tl.load(
                    b_ptr + offs_d[None, :] * stride_bd + offs_r[:, None] * stride_br,
                    mask=(offs_r[:, None] < R) & d_ok[None, :],
                    other=0.0,
                )
                low = tl.dot(at_c, bt.to(LORA_DTYPE), low, input_precision=FP32_PRECISION)
        w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=ok[:, None] & d_ok[None, :], other=0.0)
        y = w.to(tl.float32) + scale * low
        tl.store(y_rows + offs_d[None, :] * stride_yd, y.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


# fmt: off
@triton.autotune(
    configs=embedding_configs("bwd"),
    key=["T_BUCKET", "D", "R_BLOCK", "COMPUTE_DA", "COMPUTE_DB", "SCALE_FREQ", "LORA_DTYPE", "FP32_PRECISION"],
    prune_configs_by={"early_config_prune": prune_embedding_bwd},
    reset_to_zero=["db_ptr", "da_ptr"],
)
@triton.jit(do_not_specialize=["T", "T_BUCKET", "padding_idx"])
def _lora_embedding_bwd_kernel(
    # pointers
    dy_ptr, idx_ptr, a_ptr, b_ptr, cnt_ptr, db_ptr, da_ptr, g_ptr,
    # sizes; padding_idx is -1 when there is none
    T, V, D, R, T_BUCKET, padding_idx,
    # strides (db carries a leading per-band stride, 0 unless deterministic)
    stride_dyt, stride_dyd, stride_ar, stride_av, stride_bd, stride_br,
    stride_dbp, stride_dbd, stride_dbr, stride_dar, stride_dav, stride_gt, stride_gr,
    # s
    scale,
    # meta-parameters
    R_BLOCK: tl.constexpr, COMPUTE_DA: tl.constexpr, COMPUTE_DB: tl.constexpr, SCALE_FREQ: tl.constexpr,
    DETERMINISTIC: tl.constexpr, LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
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
        at = (_gather_at(a_ptr, idx, ok, offs_r, R, stride_ar, stride_av) * scale).to(LORA_DTYPE)

    # One pass over the dY band: g += dY·B (for dA) and partial dB = s·dYᵀ·A[:, idx]ᵀ per tile, tiles
    # visited in a program-rotated order so that programs do not queue on the same dB addresses.
    g = tl.zeros((BLOCK_T, R_BLOCK), dtype=tl.float32)
    num_d = tl.cdiv(D, BLOCK_D)
    for i in range(0, num_d):
        offs_d = ((i + pid) % num_d) * BLOCK_D + offs_bd
        d_ok = offs_d < D
        dy = tl.load(dy_rows + offs_d[None, :] * stride_dyd, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        dy = dy.to(LORA_DTYPE)
        if COMPUTE_DA:
            b = tl.load(
                b_ptr + offs_d[:, None] * stride_bd + offs_r[None, :] * stride_br,
                mask=d_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            g = tl.dot(dy, b.to(LORA_DTYPE), g, input_precision=FP32_PRECISION)
        if COMPUTE_DB:
            part = tl.dot(tl.trans(dy), at, input_precision=FP32_PRECISION)
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
    y = torch.empty((T, D), dtype=weight.dtype, device=weight.device)
    if T == 0 or D == 0:
        return y
    r_pad = rank_pad(R)
    r_chunk = embedding_r_chunk(r_pad, weight.element_size())
    if deterministic:
        cfg = embedding_deterministic_config("fwd", weight.element_size(), r_pad, device_arch(weight))
        kernel = _lora_embedding_fwd_kernel.fn
    else:
        cfg, kernel = {}, _lora_embedding_fwd_kernel
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), meta["SPLIT_D"])
    # fmt: off
    launch(
        kernel, grid,
        idx, weight, lora_A, lora_B, y,
        T, V, D, R, bucket(T),
        weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1),
        float(scale),
        R_PAD=r_pad, R_CHUNK=r_chunk, LORA_DTYPE=lora_compute_dtype(weight.dtype, lora_A.dtype),
        FP32_PRECISION=fp32_dot_precision(weight.dtype), **cfg,
    )
    # fmt: on
    return y


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
    dA = torch.zeros((R, V), dtype=torch.float32, device=dev) if need_dA else None
    if T == 0 or not (need_dA or need_dB):
        return dA, torch.zeros((D, R), dtype=torch.float32, device=dev) if need_dB else None
    r_block = embedding_r_block(rank_pad(R), dy.element_size())
    dummy = torch.empty((1, 1, 1), dtype=torch.float32, device=dev)
    if deterministic:
        cfg = embedding_deterministic_config("bwd", dy.element_size(), r_block, device_arch(dy))
        bands = triton.cdiv(T, cfg["BLOCK_T"])
        db = torch.empty((bands, D, R), dtype=torch.float32, device=dev) if need_dB else dummy
        g = torch.empty((T, R), dtype=torch.float32, device=dev) if need_dA else dummy[0]
        kernel, grid, da = _lora_embedding_bwd_kernel.fn, (bands, triton.cdiv(R, r_block)), dummy[0]
    else:
        cfg, kernel, g = {}, _lora_embedding_bwd_kernel, dummy[0]
        db = torch.zeros((1, D, R), dtype=torch.float32, device=dev) if need_dB else dummy
        da = dA if need_dA else dummy[0]
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(R, r_block))
    # fmt: off
    launch(
        kernel, grid,
        dy, idx, lora_A, lora_B, counts if counts is not None else idx, db, da, g,
        T, V, D, R, bucket(T), -1 if padding_idx is None else int(padding_idx),
        dy.stride(0), dy.stride(1), lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        db.stride(0) if deterministic else 0, db.stride(1), db.stride(2), da.stride(0), da.stride(1),
        g.stride(0), g.stride(1),
        float(scale),
        R_BLOCK=r_block, COMPUTE_DA=need_dA, COMPUTE_DB=need_dB, SCALE_FREQ=counts is not None,
        DETERMINISTIC=deterministic, LORA_DTYPE=lora_compute_dtype(dy.dtype, lora_B.dtype),
        FP32_PRECISION=fp32_dot_precision(dy.dtype), **cfg,
    )
    # fmt: on
    if deterministic and need_dA:
        sorted_idx, perm = torch.sort(idx.long(), stable=True)
        block_t = cfg["BLOCK_T"]
        # fmt: off
        launch(
            _embedding_da_segments_kernel, (T, triton.cdiv(R, r_block)),
            sorted_idx, perm, g, dA,
            T, R, g.stride(0), g.stride(1), dA.stride(0), dA.stride(1),
            R_BLOCK=r_block, BLOCK_T=block_t,
        )
        # fmt: on
    dB = None
    if need_dB:
        dB = db.sum(0) if deterministic else db[0]
    return dA, dB
