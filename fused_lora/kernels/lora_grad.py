"""Backward for the adapters: one pass over dY gives g = dY·B and dB, then one pass over x gives dA.

    dY [M, N], B [N, r], xa [M, r] fp32 (saved by the forward: s·drop(x)·Aᵀ, scaled), x [M, K]
    g  = s/(1-p) · dY·B                        [M, r] fp32 (row stride padded), for dX's epilogue
    dB = dYᵀ·xa                                [N, r] fp32
    dA = gᵀ·(x ⊙ mask)                         [r, K] fp32, the mask regenerated from the seed

Each program owns a band of BLOCK_M rows and R_BLOCK rank columns (all of them unless r > 64; the
rank columns are independent in all three products, so large ranks split across programs at the cost
of re-reading the band). It streams its dY band along N once: every tile feeds both g (reduced over N
inside the program) and a partial dB (reduced over M across programs). With g of its band complete,
it streams its x band along K once and adds its partial dA. The cross-program sums go
through fp32 atomics into zeroed buffers (tiles visited in a program-rotated order so programs do not
queue on the same addresses), or, in deterministic mode, into one slice per program that the host sums
in a fixed order. The accumulators are allocated zeroed by the call that launches the kernel.

**Split** (``splits`` S > 1, when bands × rank blocks give fewer than two programs per SM — at the
reference shape, M = 8192 and BLOCK_M = 128, 64 bands for 132 SMs: :func:`grad_splits`): two
launches of the same body. PHASE 1, grid (bands, rank blocks, S): program (band, ·, j) streams the j-th
of S chunks of its dY band along N, stores its partial g (scaled) in its chunk's slice of [S, M, r] fp32
(summed by the host in a fixed order: deterministic; atomics on g made ptxas spill) and adds its partial
dB (atomics; in deterministic mode its N columns of the band's slice: disjoint, no more memory). PHASE 2, grid
(bands, rank blocks, S): program (band, ·, j) loads the complete g of its band and streams the j-th chunk
of its x band along K for its partial dA (likewise). The cost: S·M·r fp32 partial g written and read
once (S = 3 at M = 8192, r = 16: 1.6 MB, against 134 MB of dY and x), the sum, and a second launch; the
gain: S times the programs (bytes in flight).

**Keep bits** (``keep_bits_out``, STORE_BITS): with dropout the x pass, which regenerates the mask for
dA, also stores it packed (int32 [M, ⌈K/32⌉], fused_lora/kernels/dropout.py) for dX's epilogue to read:
each Philox call's 8 draws become one byte where the words are, one byte store per 8 elements (rank block
0 writes; with tiles narrower than 32 columns, or no dA, a small kernel draws them instead).

Precision: dY·B multiplies natively when B has dY's 16-bit dtype, else at fp32 accuracy for g: BF16X3
for bf16 dY (B in three bf16 parts against dY as it is; TF32X3 at rank blocks above
configs.BF16X3_MAX_R_BLOCK, where the parts spilled), TF32X3 for fp16 dY; dB and dA likewise for fp32
adapters (PEFT computes them in fp32), rounded TF32 for fp16 adapters (no fp16 overflow of g or xa) and
native for bf16 ones (precision.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import BF16X3_MAX_R_BLOCK, GradConfig, admitted, deterministic_entry, device_arch, grad_r_block, grad_table, keep_grad
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .dropout import check_keep_bits, drop_threshold, keep_bits, keep_from_words, philox_words, store_keep_bytes
from .precision import BF16X3, bf16_parts, dot_bf16_parts, load_bf16_parts, lora_dot, lora_mode, native_16bit
from .utils import bucket, check_interpretable, launch, num_programs, rank_pad, row_padded


# fmt: off
@triton.jit(do_not_specialize=["M", "threshold"])
def _lora_grad_kernel(
    # pointers
    dy_ptr, b_ptr, xa_ptr, x_ptr, g_ptr, db_ptr, da_ptr, seed_ptr, bits_ptr,
    # sizes
    M, N, K, R,
    # strides (db/da carry a leading per-band stride, 0 unless deterministic)
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar, stride_xm, stride_xk,
    stride_gm, stride_gr, stride_dbp, stride_dbn, stride_dbr, stride_dap, stride_dar, stride_dak,
    # BF16X3 (G_MODE 3): b_ptr holds B's three bf16 parts (precision.bf16_parts), this far apart
    stride_bp,
    # scalars: s/(1-p), round(p·2^16)
    scale_g, threshold,
    # meta-parameters
    # split (PHASE 1 / 2): tiles per chunk along N and along K, and g's per-split stride (deterministic)
    n_chunk, k_chunk, stride_gs,
    # STORE_BITS: words per row of the packed keep bits (fused_lora/kernels/dropout.py)
    bits_words,
    # COL_SCALE (DoRA): the column scale c [N] fp32, the saved output y and dz = dY ⊙ c [M, N] (unit column
    # strides), Σ_m dY·y per band [bands, N] fp32
    c_ptr, y_ptr, dz_ptr, ds_ptr, stride_ym, stride_dzm,
    # meta-parameters
    R_BLOCK: tl.constexpr, STORE_G: tl.constexpr, COMPUTE_DB: tl.constexpr, COMPUTE_DA: tl.constexpr,
    DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, G_MODE: tl.constexpr, G_DTYPE: tl.constexpr,
    D_MODE: tl.constexpr, D_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PHASE: tl.constexpr = 0,  # 0: both passes; 1: the dY pass over one N chunk; 2: the x pass over one K chunk
    STORE_BITS: tl.constexpr = False,  # with DROPOUT: the x pass also stores the mask, packed (dX reads it)
    COL_SCALE: tl.constexpr = False,  # DoRA: the dY pass also writes dz = dY ⊙ c and Σ_m dY·y (rank block 0)
    STORE_DZ: tl.constexpr = False,  # with COL_SCALE: dz is needed (dX, a trainable W)
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
    num_n = tl.cdiv(N, BLOCK_N)
    num_k = tl.cdiv(K, BLOCK_N)
    n_lo, n_len = 0, num_n
    k_lo, k_len = 0, num_k
    if PHASE == 1:
        n_lo = tl.program_id(2) * n_chunk
        n_len = tl.minimum(n_chunk, num_n - n_lo)
        g_ptr += tl.program_id(2).to(tl.int64) * stride_gs  # this N chunk's slice of partial g
    if PHASE == 2:
        k_lo = tl.program_id(2) * k_chunk
        k_len = tl.minimum(k_chunk, num_k - k_lo)

    # Pass 1 over the dY band (one N chunk in PHASE 1): g += dY·B and, per tile, partial dB = dYᵀ·xa.
    if PHASE != 2:
        if COMPUTE_DB:
            xa = tl.load(
                xa_ptr + rows64[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                mask=row_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )
        g = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
        for i in range(0, n_len):
            nb = n_lo + (i + pid) % n_len
            offs_n = nb * BLOCK_N + offs_t
            col_ok = offs_n < N
            dy = tl.load(
                dy_ptr + rows64[:, None] * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            b_ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
            b_ok = col_ok[:, None] & rank_ok[None, :]
            if G_MODE == 3:  # BF16X3, B split on the host: three bf16 loads, no split in the loop
                b_hi, b_mid, b_lo = load_bf16_parts(b_ptrs, stride_bp, b_ok)
                g = dot_bf16_parts(dy, b_hi, b_mid, b_lo, g)
            else:
                g = lora_dot(dy, tl.load(b_ptrs, mask=b_ok, other=0.0), g, G_MODE, G_DTYPE)
            if COL_SCALE:  # b is c ⊙ B already (g = dz·B); here dz for dX and dm's column sums, one writer
                first = tl.program_id(1) == 0
                dyf = dy.to(tl.float32)
                if STORE_DZ:
                    cv = tl.load(c_ptr + offs_n, mask=col_ok, other=0.0)
                    tl.store(dz_ptr + rows64[:, None] * stride_dzm + offs_n[None, :], (dyf * cv[None, :]).to(dy.dtype),
                             mask=row_ok[:, None] & col_ok[None, :] & first)  # fmt: skip
                yv = tl.load(y_ptr + rows64[:, None] * stride_ym + offs_n[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
                ds_row = ds_ptr + pid.to(tl.int64) * N
                tl.store(ds_row + offs_n, tl.sum(dyf * yv.to(tl.float32), axis=0), mask=col_ok & first)
            if COMPUTE_DB:
                part = lora_dot(tl.trans(dy), xa, tl.zeros((BLOCK_N, R_BLOCK), dtype=tl.float32), D_MODE, D_DTYPE)
                db_ptrs = db_ptr + offs_n[:, None] * stride_dbn + offs_r[None, :] * stride_dbr
                db_mask = col_ok[:, None] & rank_ok[None, :]
                if DETERMINISTIC:
                    tl.store(db_ptrs, part, mask=db_mask)
                else:
                    tl.atomic_add(db_ptrs, part, mask=db_mask, sem="relaxed")
        g = g * scale_g
        g_ptrs = g_ptr + rows64[:, None] * stride_gm + offs_r[None, :] * stride_gr
        if STORE_G or PHASE == 1:  # PHASE 1: a partial g, its chunk's own slice (summed by the host)
            tl.store(g_ptrs, g, mask=row_ok[:, None] & rank_ok[None, :])
    else:  # PHASE 2: the band's g, complete (and scaled) in memory
        g = tl.load(
            g_ptr + rows64[:, None] * stride_gm + offs_r[None, :] * stride_gr,
            mask=row_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )

    # Pass 2 over the x band (one K chunk in PHASE 2): partial dA = gᵀ·(x ⊙ mask).
    if COMPUTE_DA and PHASE != 1:
        gt = tl.trans(g)
        if DROPOUT:
            seed = tl.load(seed_ptr)
        for i in range(0, k_len):
            kb = k_lo + (i + pid) % k_len
            offs_k = kb * BLOCK_N + offs_t
            col_ok = offs_k < K
            x = tl.load(
                x_ptr + rows64[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if DROPOUT:  # a product, as torch's dropout: NaN or inf at a dropped position stays NaN
                w0, w1, w2, w3 = philox_words(seed, offs_m, kb * BLOCK_N, BLOCK_M, BLOCK_N)
                x = x * keep_from_words(w0, w1, w2, w3, threshold, BLOCK_M, BLOCK_N).to(x.dtype)
                if STORE_BITS:  # packed where Philox's words are; rank block 0 writes (the others: the same band)
                    store_keep_bytes(bits_ptr, w0, w1, w2, w3, threshold, offs_m, kb * BLOCK_N, M, bits_words,
                                     tl.program_id(1) == 0, BLOCK_N)  # fmt: skip
            part = lora_dot(gt, x, tl.zeros((R_BLOCK, BLOCK_N), dtype=tl.float32), D_MODE, D_DTYPE)
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
    keep_bits_out: torch.Tensor | None = None,
    dora: tuple | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(g [M, r], dA [r, K], dB [N, r]), all fp32, each None when not asked for.

    dy [M, N], lora_B [N, r], xa [M, r] fp32 from the forward (scaled by s), x [M, K]; any strides.
    g comes back scaled by s/(1-p), ready for dX's epilogue, its row stride padded (a TMA operand).
    `keep_bits_out` (int32 [M, ⌈K/32⌉], contiguous; with dropout): filled with the mask, packed
    (fused_lora/kernels/dropout.py) — by the dA pass as it goes, or by its own small kernel when dA is not
    asked for or the configuration's tiles are narrower than 32 columns.
    `dora` = (c [N] fp32 contiguous, y [M, N], dz [M, N] or None, sums [N] fp32): DoRA's backward
    (fused_lora/dora_function.py) — lora_B is then c ⊙ B; the dY pass also fills dz = dY ⊙ c (when given)
    and sums = Σ_m dY·y, per band, added in a fixed order (y and dz with unit column strides).
    """
    M, N = dy.shape
    K = x.shape[1]
    R = lora_B.shape[1]
    check_interpretable(dy, lora_B, x)
    dev = dy.device
    if M == 0:
        if dora is not None:
            dora[3].zero_()
        zeros = lambda *s: torch.zeros(s, dtype=torch.float32, device=dev)
        return (zeros(0, R) if need_g else None, zeros(R, K) if need_dA else None, zeros(N, R) if need_dB else None)

    e, arch = dy.element_size(), device_arch(dy)
    r_block = grad_r_block(rank_pad(R), e)
    dropout = dropout_p > 0.0
    bits = check_keep_bits(keep_bits_out, M, K, dev) if dropout else None
    split_ok = r_block <= BF16X3_MAX_R_BLOCK
    g_mode, g_dtype = native_16bit(dy.dtype, lora_B.dtype, bf16_parts=split_ok)
    kept = lora_B.dtype == torch.float32
    d_mode, d_dtype = lora_mode(dy.dtype, lora_B.dtype, kept=kept, bf16_parts=split_ok)
    variant = dict(
        R_BLOCK=r_block, STORE_G=need_g, COMPUTE_DB=need_dB, COMPUTE_DA=need_dA, DROPOUT=dropout,
        DETERMINISTIC=deterministic, G_MODE=g_mode, G_DTYPE=g_dtype, D_MODE=d_mode, D_DTYPE=d_dtype,
        COL_SCALE=dora is not None, STORE_DZ=dora is not None and dora[2] is not None,
    )  # fmt: skip
    if dora is not None:
        col, y, dz, sums = dora
        dz = y if dz is None else dz
    b = bf16_parts(lora_B) if g_mode == int(BF16X3) else lora_B  # split once per call, not per tile

    def run(c: GradConfig, splits: int = 1):
        bands, rblocks = triton.cdiv(M, c.BLOCK_M), triton.cdiv(R, r_block)
        store_bits = bits is not None and need_dA and c.BLOCK_N % 32 == 0
        if deterministic:  # one partial-sum slice per row band, summed below in a fixed order
            db = torch.empty((bands, N, R) if need_dB else (1, 1, 1), dtype=torch.float32, device=dev)
            da = torch.empty((bands, R, K) if need_dA else (1, 1, 1), dtype=torch.float32, device=dev)
        else:  # atomics into zeroed buffers owned by this call (separate: returned tensors never alias)
            db = torch.zeros((1, N, R) if need_dB else (1, 1, 1), dtype=torch.float32, device=dev)
            da = torch.zeros((1, R, K) if need_dA else (1, 1, 1), dtype=torch.float32, device=dev)

        ds = torch.empty((bands, N) if dora is not None else (1, 1), dtype=torch.float32, device=dev)

        def go(grid, g, phase, n_chunk=0, k_chunk=0, stride_gs=0, **meta):
            # fmt: off
            launch(
                _lora_grad_kernel, grid,
                dy, b, xa, x, g, db, da, seed if dropout else xa, bits if store_bits else xa,
                M, N, K, R,
                dy.stride(0), dy.stride(1), b.stride(-2), b.stride(-1), xa.stride(0), xa.stride(1),
                x.stride(0), x.stride(1), g.stride(-2), g.stride(-1),
                db.stride(0) if deterministic else 0, db.stride(1), db.stride(2),
                da.stride(0) if deterministic else 0, da.stride(1), da.stride(2),
                b.stride(0) if b.dim() == 3 else 0,
                float(scaling) / (1.0 - dropout_p), drop_threshold(dropout_p), n_chunk, k_chunk, stride_gs,
                bits.shape[1] if store_bits else 0,
                *((col, y, dz, ds, y.stride(0), dz.stride(0)) if dora is not None else (xa, xa, xa, ds, 0, 0)),
                **{**variant, "STORE_BITS": store_bits, **meta}, PHASE=phase, **config_kwargs(c),
            )
            # fmt: on

        if splits == 1:
            g = row_padded(M, R, dev) if need_g else xa
            go((bands, rblocks), g, 0)
        else:  # two launches: the dY pass in N chunks (partial g), then the x pass in K chunks
            num_n, num_k = triton.cdiv(N, c.BLOCK_N), triton.cdiv(K, c.BLOCK_N)
            n_chunk, k_chunk = triton.cdiv(num_n, splits), triton.cdiv(num_k, splits)
            n_splits, k_splits = triton.cdiv(num_n, n_chunk), triton.cdiv(num_k, k_chunk)
            # one slice of partial g per N chunk, summed in a fixed order (atomics on g spilled: 168 B at
            # 128x64 w8 on sm_80); then g row-padded, a TMA operand for dX
            parts = torch.empty((n_splits, M, R), dtype=torch.float32, device=dev)
            once = dict(COMPUTE_DA=False, DROPOUT=False, STORE_BITS=False)  # the dY pass reads neither x nor the mask
            go((bands, rblocks, n_splits), parts, 1, n_chunk, stride_gs=parts.stride(0), **once)
            g = row_padded(M, R, dev) if need_g or need_dA else xa  # dB alone: no g to form
            if need_g or need_dA:
                torch.sum(parts, 0, out=g) if g.is_contiguous() else g.copy_(parts.sum(0))
            if need_dA:
                go((bands, rblocks, k_splits), g, 2, 0, k_chunk, STORE_G=False, COMPUTE_DB=False)
        if bits is not None and not store_bits:  # no dA pass, or tiles too narrow to pack: the small kernel
            keep_bits(seed, M, K, dropout_p, out=bits)
        if dora is not None:
            torch.sum(ds, 0, out=sums)  # the bands' column sums, in a fixed order
        reduce = (lambda t: t.sum(0)) if deterministic else (lambda t: t[0])
        return (g if need_g else None, reduce(da) if need_dA else None, reduce(db) if need_dB else None)

    def runner(name: str):
        base, _, split = name.partition(" split")
        return lambda: run(configs[base], int(split) if split else 1)

    forced = tuning.forced("grad")  # a split the heuristic would not pick, asked for by name (tests)
    if deterministic:  # the fixed entry and the shape's split: no choice depends on timing
        c = deterministic_entry("grad", e, r_block, arch, dora=dora is not None)
        splits = grad_splits(triton.cdiv(M, c.BLOCK_M) * triton.cdiv(R, r_block), N, K, c.BLOCK_N, dev)
        if forced is not None and forced.partition(" split")[0] == config_name(c) and " split" in forced:
            splits = int(forced.partition(" split")[2])
        return run(c, splits)
    configs = {config_name(c): c for c in admitted(grad_table(), keep_grad, e, r_block, arch, dora is not None)}
    names = []
    for n, c in configs.items():
        splits = grad_splits(triton.cdiv(M, c.BLOCK_M) * triton.cdiv(R, r_block), N, K, c.BLOCK_N, dev)
        names += [f"{n} split{splits}", n] if splits > 1 else [n]
    if forced is not None and forced not in names and forced.partition(" split")[0] in configs:
        names.append(forced)
    key = (str(dy.dtype), str(lora_B.dtype), bucket(M), N, K, r_block, need_g, need_dA, need_dB, dropout)
    key += (bits is not None,) + (("dora", dora[2] is not None) if dora is not None else ())
    chosen = tuning.table("grad").pick(key, names, runner, dev)
    return runner(chosen)()


# A split grad pass streams at least this many tiles per program along N and along K.
MIN_SPLIT_TILES = 4


def grad_splits(programs: int, N: int, K: int, block_n: int, device: torch.device) -> int:
    """How many chunks of N (and of K) the grad pass splits each band into: 1 (one launch) when the
    `programs` (bands × rank blocks) already give every SM two, else enough for two per SM, each chunk
    at least MIN_SPLIT_TILES tiles. Off the GPU, 1 (tests ask for splits by name). A model of what fills
    the GPU — the tuner also times the unsplit launch and keeps whichever is faster."""
    if device.type != "cuda":
        return 1
    want = 2 * num_programs(device)
    if programs >= want:
        return 1
    tiles = min(triton.cdiv(N, block_n), triton.cdiv(K, block_n)) // MIN_SPLIT_TILES
    return max(1, min(triton.cdiv(want, programs), tiles, 16))
