"""Backward for the adapters: one pass over dY gives g = dY·B and dB, then one pass over x gives dA.

    dY [M, N], B [N, r], xa [M, r] fp32 (saved by the forward), x [M, K]
    g  = dY·B                                  [M, r] fp32, for dX's epilogue
    dB = s · dYᵀ·xa                            [N, r] fp32
    dA = s/(1-p) · gᵀ·(x ⊙ mask)               [r, K] fp32, the mask regenerated from the seed

Each program owns a band of BLOCK_M rows and R_BLOCK rank columns (all of them unless r > 64; the
rank columns are independent in all three products, so large ranks split across programs at the cost
of re-reading the band). It streams its dY band along N once: every tile feeds both g (reduced over N
inside the program) and a partial dB (reduced over M across programs). With g of its band complete,
it streams its x band along K once and adds its partial dA. The cross-program sums go
through fp32 atomics into zeroed buffers (tiles visited in a program-rotated order so programs do not
queue on the same addresses), or, in deterministic mode, into one slice per program that the host sums
in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import deterministic_config, device_arch, grad_configs, grad_r_block, prune_grad
from .dropout import drop_threshold, keep_mask
from .utils import bucket, fp32_dot_precision, launch, lora_compute_dtype, rank_pad

_KEY = [
    "M_BUCKET",
    "N",
    "K",
    "R_BLOCK",
    "STORE_G",
    "COMPUTE_DB",
    "COMPUTE_DA",
    "DROPOUT",
    "LORA_DTYPE",
    "FP32_PRECISION",
]


# fmt: off
@triton.autotune(
    configs=grad_configs(),
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_grad},
    reset_to_zero=["db_ptr", "da_ptr"],
)
@triton.jit(do_not_specialize=["M", "M_BUCKET", "threshold"])
def _lora_grad_kernel(
    # pointers
    dy_ptr, b_ptr, xa_ptr, x_ptr, g_ptr, db_ptr, da_ptr, seed_ptr,
    # sizes
    M, N, K, R, M_BUCKET,
    # strides (db/da carry a leading per-band stride, 0 unless deterministic)
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar, stride_xm, stride_xk,
    stride_gm, stride_gr, stride_dbp, stride_dbn, stride_dbr, stride_dap, stride_dar, stride_dak,
    # scalars: s, s/(1-p), floor(p·2^31)
    scale_db, scale_da, threshold,
    # meta-parameters
    R_BLOCK: tl.constexpr, STORE_G: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DA: tl.constexpr,
    DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, LORA_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # fmt: on
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * R_BLOCK + tl.arange(0, R_BLOCK)
    offs_t = tl.arange(0, BLOCK_N)
    row_ok = offs_m < M
    rank_ok = offs_r < R
    rows64 = offs_m.to(tl.int64)
    if DETERMINISTIC:  # this program's own slice of the partial-sum buffers
        db_ptr += pid.to(tl.int64) * stride_dbp
        da_ptr += pid.to(tl.int64) * stride_dap

    # Pass 1 over the dY band: g += dY·B and, per tile, partial dB = s·dYᵀ·xa.
    if COMPUTE_DB:
        xa = tl.load(
            xa_ptr + rows64[:, None] * stride_xam + offs_r[None, :] * stride_xar,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        xa = (xa * scale_db).to(LORA_DTYPE)
    g = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    num_n = tl.cdiv(N, BLOCK_N)
    for i in range(0, num_n):
        nb = (i + pid) % num_n
        offs_n = nb * BLOCK_N + offs_t
        col_ok = offs_n < N
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(LORA_DTYPE)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )
        g = tl.dot(dy, b.to(LORA_DTYPE), g, input_precision=FP32_PRECISION)
        if COMPUTE_DB:
            part = tl.dot(tl.trans(dy), xa, input_precision=FP32_PRECISION)
            db_ptrs = db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
            db_mask = col_ok[:, None] & rank_ok[None, :]
            if DETERMINISTIC:
                tl.store(db_ptrs, part, mask=db_mask)
            else:
                tl.atomic_add(db_ptrs, part, mask=db_mask, sem="relaxed")
    if STORE_G:
        tl.store(
            g_ptr + rows64[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            g,
            mask=row_ok[:, None] & rank_ok[None, :],
        )

    # Pass 2 over the x band: partial dA = s/(1-p) · gᵀ·drop(x).
    if COMPUTE_DA:
        gt = tl.trans(g * scale_da).to(LORA_DTYPE)
        if DROPOUT:
            seed = tl.load(seed_ptr)
        num_k = tl.cdiv(K, BLOCK_N)
        for i in range(0, num_k):
            kb = (i + pid) % num_k
            offs_k = kb * BLOCK_N + offs_t
            col_ok = offs_k < K
            x = tl.load(
                x_ptr + rows64[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if DROPOUT:
                x = tl.where(keep_mask(seed, offs_m, kb * BLOCK_N, threshold, BLOCK_M, BLOCK_N), x, 0.0)
            part = tl.dot(gt, x.to(LORA_DTYPE), input_precision=FP32_PRECISION)
            da_ptrs = da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak
            da_mask = rank_ok[:, None] & col_ok[None, :]
            if DETERMINISTIC:
                tl.store(da_ptrs, part, mask=da_mask)
            else:
                tl.atomic_add(da_ptrs, part, mask=da_mask, sem="relaxed")


def lora_grad(
    dy: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    x: torch.Tensor,
    *,
    scaling: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
    need_g: bool = True,
    need_dA: bool = True,
    need_dB: bool = True,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(g [M, r], dA [r, K], dB [N, r]), all fp32, each None when not asked for.

    dy [M, N], lora_B [N, r], xa [M, r] fp32 from the forward, x [M, K]; any strides.
    """
    M, N = dy.shape
    K = x.shape[1]
    R = lora_B.shape[1]
    dev = dy.device
    if M == 0:
        zeros = lambda *s: torch.zeros(s, dtype=torch.float32, device=dev)
        return (zeros(0, R) if need_g else None, zeros(R, K) if need_dA else None, zeros(N, R) if need_dB else None)

    r_block = grad_r_block(rank_pad(R), dy.element_size())
    if deterministic:
        # A fixed configuration: the partial buffers are sized by the band count.
        cfg = deterministic_config("grad", dy.element_size(), r_block, device_arch(dy))
        bands = triton.cdiv(M, cfg["BLOCK_M"])
        db = torch.empty((bands, N, R) if need_dB else (1, 1, 1), dtype=torch.float32, device=dev)
        da = torch.empty((bands, R, K) if need_dA else (1, 1, 1), dtype=torch.float32, device=dev)
        kernel, grid = _lora_grad_kernel.fn, (bands, triton.cdiv(R, r_block))
    else:
        cfg = {}
        # One zeroed buffer (one memset) holds both atomic accumulators.
        db_shape, da_shape = (1, N, R) if need_dB else (1, 1, 1), (1, R, K) if need_dA else (1, 1, 1)
        n_db = db_shape[1] * db_shape[2]
        acc = torch.zeros(n_db + da_shape[1] * da_shape[2], dtype=torch.float32, device=dev)
        db, da = acc[:n_db].view(db_shape), acc[n_db:].view(da_shape)
        kernel = _lora_grad_kernel
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, r_block))
    g = torch.empty((M, R), dtype=torch.float32, device=dev) if need_g else xa
    dropout = dropout_p > 0.0
    # fmt: off
    launch(
        kernel, grid,
        dy, lora_B, xa, x, g, db, da, seed if dropout else xa,
        M, N, K, R, bucket(M),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
        x.stride(0), x.stride(1), g.stride(0), g.stride(1),
        db.stride(0) if deterministic else 0, db.stride(1), db.stride(2),
        da.stride(0) if deterministic else 0, da.stride(1), da.stride(2),
        float(scaling), float(scaling) / (1.0 - dropout_p), drop_threshold(dropout_p),
        R_BLOCK=r_block, STORE_G=need_g, COMPUTE_DB=need_dB, COMPUTE_DA=need_dA, DROPOUT=dropout,
        DETERMINISTIC=deterministic, LORA_DTYPE=lora_compute_dtype(dy.dtype, lora_B.dtype),
        FP32_PRECISION=fp32_dot_precision(dy.dtype), **cfg,
    )
    # fmt: on
    reduce = (lambda t: t.sum(0)) if deterministic else (lambda t: t[0])
    return (g if need_g else None, reduce(da) if need_dA else None, reduce(db) if need_dB else None)
