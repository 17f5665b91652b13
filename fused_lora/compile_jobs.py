"""What ``compile_check`` compiles: every shipped configuration of every kernel, each in the heaviest
variant the configuration filters (``kernels.configs.keep_*``) let it run, with the strides of
contiguous tensors at a realistic size (the unit strides become constants, as in a real launch)."""

from __future__ import annotations

from .compile_check import ARCHS, Job

RANK_BUCKETS = (16, 32, 64, 128, 256)
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# (label, activations, adapters, dX with dropout?) — the fp32-adapter variants are the heaviest.
GEMM_VARIANTS = (
    ("y+bias, bf16 x/W, fp32 A/B", "bf16", "fp32", False),
    ("y+bias, bf16 x/W/A/B", "bf16", "bf16", False),
    ("dX+dropout, bf16, fp32 A/B", "bf16", "fp32", True),
    ("y+bias, fp32 (tf32x3)", "fp32", "fp32", False),
    ("dX+dropout, fp32 (tf32x3)", "fp32", "fp32", True),
)


def _precision(dt: str) -> str:
    return "tf32" if dt != "fp32" else "tf32x3"


def _cfg_name(c) -> str:
    tiles = [v for k, v in c._asdict().items() if k.isupper()]
    return "x".join(map(str, tiles)) + f" w{c.num_warps} s{c.num_stages}"


def _admitted(keep, *args) -> tuple[int, ...]:
    return tuple(arch for arch in ARCHS if keep(*args, arch))


def _job(kernel: str, module: str, c, variant: str, args: dict, meta: dict, archs, mma: bool) -> Job:
    return Job(kernel, module, _cfg_name(c), variant, args, meta, c.num_warps, c.num_stages, mma, archs)


# fmt: off
def _gemm_args(dt: str, lora_dt: str, sizes: dict, backward: bool) -> dict:
    M, N, K, r = sizes["M"], sizes["N"], sizes["K"], 64
    if backward:  # dX [M, K] = dY [M, N] · W [N, K] + g [M, r] · A [r, K]
        strides = dict(stride_pm=N, stride_pk=1, stride_qk=K, stride_qn=1, stride_lm=r, stride_lr=1,
                       stride_rr=K, stride_rn=1, stride_om=K, stride_on=1)
        n_out, k_red = K, N
    else:  # y [M, N] = x [M, K] · Wᵀ + xa [M, r] · Bᵀ
        strides = dict(stride_pm=K, stride_pk=1, stride_qk=1, stride_qn=K, stride_lm=r, stride_lr=1,
                       stride_rr=1, stride_rn=r, stride_om=N, stride_on=1)
        n_out, k_red = N, K
    return dict(p_ptr="*" + dt, q_ptr="*" + dt, l_ptr="*fp32", r_ptr="*" + lora_dt, bias_ptr="*" + dt,
                out_ptr="*" + dt, seed_ptr="*i64", M=M, N=n_out, K=k_red, R=r, M_BUCKET=M, stride_bias=1,
                scale="fp32", threshold="i32", **strides)


def _shrink_args(dt: str, sizes: dict, r: int) -> dict:
    M, K = sizes["M"], sizes["K"]
    return dict(x_ptr="*" + dt, a_ptr="*fp32", xa_ptr="*fp32", seed_ptr="*i64", M=M, K=K, R=r, M_BUCKET=M,
                stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_om=r, stride_or=1,
                threshold="i32", keep_scale="fp32")


def _grad_args(dt: str, sizes: dict, r: int) -> dict:
    M, N, K = sizes["M"], sizes["N"], sizes["K"]
    return dict(dy_ptr="*" + dt, b_ptr="*fp32", xa_ptr="*fp32", x_ptr="*" + dt, g_ptr="*fp32", db_ptr="*fp32",
                da_ptr="*fp32", seed_ptr="*i64", M=M, N=N, K=K, R=r, M_BUCKET=M,
                stride_dym=N, stride_dyn=1, stride_bn=r, stride_br=1, stride_xam=r, stride_xar=1,
                stride_xm=K, stride_xk=1, stride_gm=r, stride_gr=1, stride_dbp=0, stride_dbn=r, stride_dbr=1,
                stride_dap=0, stride_dar=K, stride_dak=1, scale_db="fp32", scale_da="fp32", threshold="i32")
# fmt: on


def gemm_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels.configs import GEMM, GEMM_R_CHUNK, keep_gemm

    jobs = []
    for c in GEMM:
        for label, dt, lora_dt, backward in GEMM_VARIANTS:
            archs = _admitted(keep_gemm, c, BYTES[dt], backward)
            if archs:
                meta = dict(R_CHUNK=GEMM_R_CHUNK, HAS_BIAS=not backward, DROPOUT=backward,
                            LORA_DTYPE="tl." + lora_dt, FP32_PRECISION=_precision(dt), BLOCK_M=c.BLOCK_M,
                            BLOCK_N=c.BLOCK_N, BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M)  # fmt: skip
                args = _gemm_args(dt, lora_dt, sizes, backward)
                jobs.append(_job("_lora_gemm_kernel", "lora_gemm", c, label, args, meta, archs, mma=True))
    return jobs


def _stream_variants(c, keep, cap=lambda dt: 256) -> list[tuple[str, int, tuple[int, ...]]]:
    """(activation dtype, largest rank bucket admitted, archs) for bf16 and fp32 activations."""
    out = []
    for dt in ("bf16", "fp32"):
        fits = [(r, _admitted(keep, c, BYTES[dt], r)) for r in RANK_BUCKETS if r <= cap(dt)]
        fits = [(r, archs) for r, archs in fits if archs]
        if fits:
            out.append((dt, *fits[-1]))
    return out


def shrink_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels.configs import SHRINK, keep_shrink

    jobs = []
    for c in SHRINK:
        for dt, r, archs in _stream_variants(c, keep_shrink):
            meta = dict(R_PAD=r, DROPOUT=True, LORA_DTYPE="tl.fp32", FP32_PRECISION=_precision(dt),
                        BLOCK_M=c.BLOCK_M, BLOCK_K=c.BLOCK_K, SPLIT_K=c.SPLIT_K)  # fmt: skip
            variant = f"dropout {dt}, fp32 A, r<={r}"
            args = _shrink_args(dt, sizes, r)
            jobs.append(_job("_shrink_kernel", "shrink", c, variant, args, meta, archs, mma=False))
    return jobs


def grad_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels.configs import GRAD, grad_r_block, keep_grad

    jobs = []
    for c in GRAD:
        for dt, r, archs in _stream_variants(c, keep_grad, cap=lambda dt: grad_r_block(256, BYTES[dt])):
            meta = dict(R_BLOCK=r, STORE_G=True, COMPUTE_DB=True, COMPUTE_DA=True, DROPOUT=True,
                        DETERMINISTIC=False, LORA_DTYPE="tl.fp32", FP32_PRECISION=_precision(dt),
                        BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N)  # fmt: skip
            variant = f"dropout {dt}, fp32 A/B, r<={r}"
            args = _grad_args(dt, sizes, r)
            jobs.append(_job("_lora_grad_kernel", "lora_grad", c, variant, args, meta, archs, mma=False))
    return jobs


def mask_jobs(sizes: dict) -> list[Job]:
    args = dict(seed_ptr="*i64", out_ptr="*i8", M=sizes["M"], K=sizes["K"], stride_om=sizes["K"], threshold="i32")
    return [
        Job(
            "_dropout_mask_kernel",
            "dropout",
            "32x128 w4",
            "p>0",
            args,
            dict(BLOCK_M=32, BLOCK_K=128),
            4,
            1,
            mma_expected=False,
            archs=ARCHS,
        )
    ]


def all_jobs(sizes: dict) -> list[Job]:
    return gemm_jobs(sizes) + shrink_jobs(sizes) + grad_jobs(sizes) + mask_jobs(sizes)


# ======================================================================================================
# Embedding (issue 9: fused_lora.Embedding). Appended block: kernels/embedding.py at a Llama-3-size
# table (128256 x 4096), 8192 tokens; every shipped configuration in each variant it can meet.
# ======================================================================================================

EMBEDDING_SIZES = {"T": 8192, "V": 128256, "D": 4096}
# (label, table dtype, adapter dtype, R_PAD) — 256 runs the forward's rank-slice loop.
EMBEDDING_FWD_VARIANTS = (
    ("bf16 W, fp32 A/B, r<=64", "bf16", "fp32", 64),
    ("bf16 W, fp32 A/B, r=256 (4 slices)", "bf16", "fp32", 256),
    ("bf16 W/A/B, r<=64", "bf16", "bf16", 64),
    ("fp32 (tf32x3), r<=16", "fp32", "fp32", 16),
    ("fp32 (tf32x3), r=256 (16 slices)", "fp32", "fp32", 256),
)
# (label, table dtype, deterministic, scale_grad_by_freq)
EMBEDDING_BWD_VARIANTS = (
    ("bf16 dY, fp32 A/B, atomics", "bf16", False, False),
    ("bf16 dY, fp32 A/B, deterministic", "bf16", True, False),
    ("fp32 (tf32x3), atomics, scale_grad_by_freq", "fp32", False, True),
)


def _embedding_fwd_args(dt: str, lora_dt: str, r: int) -> dict:
    T, V, D = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"], EMBEDDING_SIZES["D"]
    return dict(idx_ptr="*i64", w_ptr="*" + dt, a_ptr="*" + lora_dt, b_ptr="*" + lora_dt, y_ptr="*" + dt,
                T=T, V=V, D=D, R=r, T_BUCKET=T, stride_wv=D, stride_wd=1, stride_ar=V, stride_av=1,
                stride_bd=r, stride_br=1, stride_yt=D, stride_yd=1, scale="fp32")  # fmt: skip


def _embedding_bwd_args(dt: str, r: int) -> dict:
    T, V, D = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"], EMBEDDING_SIZES["D"]
    return dict(dy_ptr="*" + dt, idx_ptr="*i64", a_ptr="*fp32", b_ptr="*fp32", cnt_ptr="*i64", db_ptr="*fp32",
                da_ptr="*fp32", g_ptr="*fp32", T=T, V=V, D=D, R=r, T_BUCKET=T, padding_idx="i32",
                stride_dyt=D, stride_dyd=1, stride_ar=V, stride_av=1, stride_bd=r, stride_br=1,
                stride_dbp=D * r, stride_dbd=r, stride_dbr=1, stride_dar=V, stride_dav=1, stride_gt=r, stride_gr=1,
                scale="fp32")  # fmt: skip


def embedding_jobs(sizes: dict | None = None) -> list[Job]:
    from fused_lora.kernels.configs import (
        EMBEDDING_BWD,
        EMBEDDING_FWD,
        EMBEDDING_R_BLOCK,
        EMBEDDING_R_CHUNK,
        keep_embedding,
    )

    jobs = []
    for c in EMBEDDING_FWD:
        for label, dt, lora_dt, r_pad in EMBEDDING_FWD_VARIANTS:
            r_chunk = min(r_pad, EMBEDDING_R_CHUNK[BYTES[dt]])
            archs = _admitted(keep_embedding, c, BYTES[dt], r_pad)
            if archs:
                meta = dict(R_PAD=r_pad, R_CHUNK=r_chunk, LORA_DTYPE="tl." + lora_dt, FP32_PRECISION=_precision(dt),
                            BLOCK_T=c.BLOCK_T, BLOCK_D=c.BLOCK_D, SPLIT_D=c.SPLIT_D)  # fmt: skip
                args = _embedding_fwd_args(dt, lora_dt, r_pad)
                jobs.append(_job("_lora_embedding_fwd_kernel", "embedding", c, label, args, meta, archs, mma=False))
    for c in EMBEDDING_BWD:
        for label, dt, det, freq in EMBEDDING_BWD_VARIANTS:
            r_block = EMBEDDING_R_BLOCK[BYTES[dt]]
            archs = _admitted(keep_embedding, c, BYTES[dt], r_block)
            if archs:
                meta = dict(R_BLOCK=r_block, COMPUTE_DA=True, COMPUTE_DB=True, SCALE_FREQ=freq, DETERMINISTIC=det,
                            LORA_DTYPE="tl.fp32", FP32_PRECISION=_precision(dt), BLOCK_T=c.BLOCK_T,
                            BLOCK_D=c.BLOCK_D)  # fmt: skip
                args = _embedding_bwd_args(dt, r_block)
                label = f"{label}, r<={r_block}"
                jobs.append(_job("_lora_embedding_bwd_kernel", "embedding", c, label, args, meta, archs, mma=False))
    block_ts = sorted({c.BLOCK_T for c in EMBEDDING_BWD})
    for r_block in sorted(set(EMBEDDING_R_BLOCK.values())):
        for block_t in block_ts:
            T, V = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"]
            args = dict(sorted_ptr="*i64", perm_ptr="*i64", g_ptr="*fp32", da_ptr="*fp32", T=T, R=r_block,
                        stride_gt=r_block, stride_gr=1, stride_dar=V, stride_dav=1)  # fmt: skip
            meta = dict(R_BLOCK=r_block, BLOCK_T=block_t)
            variant = f"deterministic dA, r<={r_block}"
            jobs.append(Job("_embedding_da_segments_kernel", "embedding", f"{block_t} w4", variant, args, meta, 4, 1,
                            mma_expected=False, archs=ARCHS))  # fmt: skip
    return jobs


_all_jobs_before_embedding = all_jobs


def all_jobs(sizes: dict) -> list[Job]:
    """Every job above, the embedding's included (this block only appends to the file)."""
    return _all_jobs_before_embedding(sizes) + embedding_jobs(sizes)
