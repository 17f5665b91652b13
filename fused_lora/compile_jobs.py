"""What ``compile_check`` compiles: every shipped configuration of every kernel, each in the heaviest
variants the configuration filters (``kernels.configs.keep_*``) let it run, on every path it can take
(Hopper: TMA descriptors and, for unaligned views, pointers; Ampere: pointers), with the strides of
contiguous tensors at a realistic size (unit strides become constants, as in a real launch)."""

from __future__ import annotations

import dataclasses

ARCHS = (80, 90)
RANK_BUCKETS = (16, 32, 64, 128, 256)
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NUM_SMS = {80: 108, 90: 132}  # A100, H100 SXM: the persistent grid's program count


@dataclasses.dataclass
class Job:
    kernel: str  # module-level name in fused_lora.kernels.<module>
    module: str
    config: str
    variant: str
    args: dict  # arg name -> "*bf16" / "i32" / "fp32" / int (1 becomes a constant) / constexpr value
    meta: dict  # constexpr meta-parameters ("tl.fp32" strings become Triton dtypes)
    num_warps: int
    num_stages: int
    mma_expected: bool
    archs: tuple[int, ...] = ARCHS  # where kernels.configs admits this configuration
    tma: bool = False  # the Hopper path: expects TMA (cp.async.bulk.tensor) on sm_90a
    serial_ok: bool = False  # memory-bound (N = r): serialised wgmma is reported, not a failure
    one_pipeline: bool = False  # sm_90a must fuse the tile walk and the K loop into one loop (TTGIR)
    options: dict = dataclasses.field(default_factory=dict)  # further compile options (enable_fp_fusion, ...)
    programs_per_sm: int = 1  # the persistent GEMM's programs per SM (its grid and NUM_PROGRAMS follow)

    def meta_for(self, arch: int) -> dict:
        if "NUM_PROGRAMS" not in self.meta:
            return self.meta
        return {**self.meta, "NUM_PROGRAMS": NUM_SMS[arch] * self.programs_per_sm}


# (label, activations, adapters, dX with dropout?) — the fp32-adapter and fp32 variants are the heaviest.
GEMM_VARIANTS = (
    ("y+bias, bf16 x/W, fp32 A/B", "bf16", "fp32", False),
    ("y+bias, bf16 x/W/A/B", "bf16", "bf16", False),
    ("dX+dropout, bf16, fp32 A/B", "bf16", "fp32", True),
    ("y+bias, fp32 (tf32x3)", "fp32", "fp32", False),
    ("dX+dropout, fp32 (tf32x3)", "fp32", "fp32", True),
)


def _modes(dt: str, lora_dt: str, kept: bool, bf16_parts: bool = True) -> dict:
    """LORA_MODE / LORA_DTYPE as kernels.precision.lora_mode picks them (fp32 activations: no TF32)."""
    if dt == "fp32":
        return {"LORA_MODE": 2, "LORA_DTYPE": "tl.fp32"}
    if lora_dt == "fp32":  # bf16 activations: BF16X3 (one fp32 side in bf16 parts), fp16: TF32X3
        return {"LORA_MODE": (3 if dt == "bf16" and bf16_parts else 2) if kept else 1, "LORA_DTYPE": "tl.fp32"}
    if lora_dt == "fp16":  # fp16 adapters: fp32 intermediates stay fp32, rounded to TF32
        return {"LORA_MODE": 1, "LORA_DTYPE": "tl.fp32"}
    return {"LORA_MODE": 0, "LORA_DTYPE": "tl." + lora_dt}


def _cfg_name(c) -> str:
    from fused_lora.kernels.configs import name

    return name(c)


def _admitted(keep, *args, tma: bool | None = None) -> tuple[int, ...]:
    if tma is None:
        return tuple(arch for arch in ARCHS if keep(*args, arch))
    return tuple(arch for arch in ARCHS if keep(*args, arch, tma))


# fmt: off
def _gemm_args(dt: str, lora_dt: str, sizes: dict, backward: bool, tma: bool) -> dict:
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
                scale_ptr="*fp32", out_ptr="*" + dt, bits_ptr="*i32", M=M, N=n_out, K=k_red, R=r, stride_bias=1,
                bits_words="i32", group_n="i32", groups_ptr="*i32", **strides)


def _low_rank_args(dt: str, lora_dt: str, sizes: dict, backward: bool, out_dt: str | None = None) -> dict:
    M, r = sizes["M"], 64
    n_out = sizes["K"] if backward else sizes["N"]
    lr = dict(stride_rr=n_out, stride_rn=1) if backward else dict(stride_rr=1, stride_rn=r)
    out = "*" + (out_dt or dt)
    return dict(l_ptr="*fp32", r_ptr="*" + lora_dt, bias_ptr="*" + dt, scale_ptr="*fp32", base_ptr=out,
                out_ptr=out, bits_ptr="*i32", M=M, N=n_out, R=r, stride_lm=r, stride_lr=1, stride_om=n_out,
                stride_on=1, stride_bias=1, stride_basem=n_out,
                bits_words="i32", group_n="i32", groups_ptr="*i32", **lr)


def _shrink_args(dt: str, sizes: dict, r: int) -> dict:
    M, K = sizes["M"], sizes["K"]
    return dict(x_ptr="*" + dt, a_ptr="*fp32", xa_ptr="*fp32", seed_ptr="*i64", M=M, K=K, R=r,
                stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1, stride_om=r, stride_or=1,
                stride_ap=r * K, threshold="i32", out_scale="fp32")


def _grad_args(dt: str, sizes: dict, r: int) -> dict:
    M, N, K = sizes["M"], sizes["N"], sizes["K"]
    return dict(dy_ptr="*" + dt, b_ptr="*fp32", xa_ptr="*fp32", x_ptr="*" + dt, g_ptr="*fp32", db_ptr="*fp32",
                da_ptr="*fp32", seed_ptr="*i64", bits_ptr="*i32", M=M, N=N, K=K, R=r,
                stride_dym=N, stride_dyn=1, stride_bn=r, stride_br=1, stride_xam=r, stride_xar=1,
                stride_xm=K, stride_xk=1, stride_gm=r, stride_gr=1, stride_dbp=0, stride_dbn=r, stride_dbr=1,
                stride_dap=0, stride_dar=K, stride_dak=1, stride_bp=N * r, scale_g="fp32", threshold="i32", n_chunk="i32",
                k_chunk="i32", stride_gs="i32", bits_words="i32", c_ptr="*fp32", y_ptr="*" + dt, dz_ptr="*" + dt,
                ds_ptr="*fp32", stride_ym=N, stride_dzm=N)
# fmt: on


def gemm_jobs(sizes: dict, measure_smem: bool = False) -> list[Job]:
    """The fused GEMM: the TMA path where Hopper admits the configuration, in both forms (r <= 16: one
    pipeline across tiles where kernels.configs.rank_slices makes it; r > 16: nested loops), the pointer
    path on both architectures (Ampere, and unaligned views on Hopper). `measure_smem`: only the TMA
    jobs, each configuration admitted but for its shared memory (what compile_check --smem-table
    measures)."""
    from fused_lora.kernels.configs import GEMM, R_CHUNK, keep_gemm, rank_slices

    jobs = []
    for c in GEMM:
        for label, dt, lora_dt, backward in GEMM_VARIANTS:
            for tma, r_pad in ((True, 16), (True, 64)) if measure_smem else ((True, 16), (True, 64), (False, 64)):
                modes = _modes(dt, lora_dt, kept=False)
                slices = rank_slices(r_pad, tma, False, modes["LORA_MODE"], backward)
                archs = tuple(a for a in ARCHS if keep_gemm(c, BYTES[dt], backward, a, tma, BYTES[lora_dt], slices > 0,
                                                            check_smem=not measure_smem))  # fmt: skip
                archs = tuple(a for a in archs if a >= 90) if tma else archs
                if not archs:
                    continue
                meta = dict(HAS_BIAS=not backward, DROPOUT=backward, HAS_GROUPS=False, COL_SCALE=False, **modes,
                            TMA=tma,
                            MAIN_PRECISION="tf32x3" if dt == "fp32" else "tf32",
                            Q_NK=tma and not backward, R_NR=tma and not backward, NUM_PROGRAMS=0,
                            R_CHUNK=R_CHUNK, R_SLICES=slices, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                            BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M, SUBTILES=c.SUBTILES)  # fmt: skip
                args = _gemm_args(dt, lora_dt, sizes, backward, tma)
                path = ("TMA, r<=16" if r_pad <= 16 else "TMA, r>16") if tma else "pointers"
                variant = f"{label}, {path}"
                jobs.append(Job("_lora_gemm_kernel", "lora_gemm", _cfg_name(c), variant, args, meta,
                                c.num_warps, c.num_stages, True, archs, tma, one_pipeline=bool(slices),
                                programs_per_sm=c.programs_per_sm))  # fmt: skip
    return jobs


def low_rank_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels.configs import LOW_RANK, R_CHUNK, keep_gemm

    # fp16 activations (fp32 or fp16 adapters): the term is written in fp32 for cuBLAS's fp32-output addmm
    # (fused_lora/impl.py; a 16-bit C could overflow where y is finite), in the TF32 mode of fp16 x.
    fp32_out = (("y+bias, fp16 x/W, fp32 A/B, fp32 C", "fp16", "fp32", False),
                ("dX+dropout, fp16, fp32 A/B, fp32 T", "fp16", "fp32", True),
                ("y+bias, fp16 x/W/A/B, fp32 C", "fp16", "fp16", False),
                ("dX+dropout, fp16 x/A/B, fp32 T", "fp16", "fp16", True))  # fmt: skip
    jobs = []
    for c in LOW_RANK:
        for label, dt, lora_dt, backward in (*GEMM_VARIANTS[:3], *fp32_out):
            out_dt = "fp32" if dt == "fp16" else dt
            for tma in (True, False):
                archs = _admitted(keep_gemm, c, BYTES[out_dt], backward, tma=tma)
                archs = tuple(a for a in archs if a >= 90) if tma else tuple(a for a in archs if a < 90)
                if not archs:
                    continue
                meta = dict(HAS_BIAS=not backward, DROPOUT=backward, HAS_GROUPS=False, COL_SCALE=False,
                            HAS_BASE=False, **_modes(dt, lora_dt, kept=False), TMA=tma,
                            R_NR=tma and not backward, R_CHUNK=R_CHUNK, BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N,
                            BLOCK_K=c.BLOCK_K, GROUP_M=c.GROUP_M, SUBTILES=c.SUBTILES)  # fmt: skip
                args = _low_rank_args(dt, lora_dt, sizes, backward, out_dt)
                variant = f"{label.replace('y+', 'C=').replace('dX+', 'T=')}, {'TMA' if tma else 'pointers'}"
                jobs.append(Job("_low_rank_kernel", "low_rank", _cfg_name(c), variant, args, meta,
                                c.num_warps, c.num_stages, True, archs, tma))  # fmt: skip
    return jobs


def _stream_variants(c, keep, cap=lambda dt: 256) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(activation dtype, adapter dtype, largest rank bucket admitted, archs): bf16 activations with fp32
    adapters (split in two TF32 halves: the heaviest) and with bf16 ones (native), fp32 activations."""
    out = []
    for dt, lora_dt in (("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")):
        fits = [(r, _admitted(keep, c, BYTES[dt], r)) for r in RANK_BUCKETS if r <= cap(dt)]
        fits = [(r, archs) for r, archs in fits if archs]
        if fits:
            out.append((dt, lora_dt, *fits[-1]))
    return out


def shrink_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels.configs import SHRINK, keep_shrink

    jobs = []
    for c in SHRINK:
        for dt, lora_dt, r, archs in _stream_variants(c, keep_shrink):
            meta = dict(R_PAD=r, DROPOUT=True, **_modes(dt, lora_dt, kept=True), BLOCK_M=c.BLOCK_M,
                        BLOCK_K=c.BLOCK_K, SPLIT_K=c.SPLIT_K)  # fmt: skip
            variant = f"dropout {dt}, {lora_dt} A, r<={r}"
            parts = meta["LORA_MODE"] == 3  # BF16X3: A's bf16 parts (kernels.precision.bf16_parts)
            args = {**_shrink_args(dt, sizes, r), "a_ptr": "*bf16" if parts else "*" + lora_dt}
            jobs.append(Job("_shrink_kernel", "shrink", _cfg_name(c), variant, args, meta,
                            c.num_warps, c.num_stages, False, archs, serial_ok=True))  # fmt: skip
    return jobs


def grad_jobs(sizes: dict, dora: bool = False) -> list[Job]:
    """The grad pass in its heaviest variant per configuration, whole and split; `dora`: DoRA's (the dY
    loop also reading y and writing dz: COL_SCALE), at the ranks kernels.configs admits it for."""
    from fused_lora.kernels.configs import BF16X3_MAX_R_BLOCK, GRAD, grad_r_block, keep_grad

    keep = (lambda *a: keep_grad(*a, dora=True)) if dora else keep_grad
    jobs = []
    for c in GRAD:
        for dt, lora_dt, r, archs in _stream_variants(c, keep, cap=lambda dt: grad_r_block(256, BYTES[dt])):
            modes = _modes(dt, lora_dt, kept=True, bf16_parts=r <= BF16X3_MAX_R_BLOCK)
            meta = dict(R_BLOCK=r, STORE_G=True, COMPUTE_DB=True, COMPUTE_DA=True, DROPOUT=True, DETERMINISTIC=False,
                        G_MODE=modes["LORA_MODE"], G_DTYPE=modes["LORA_DTYPE"], D_MODE=modes["LORA_MODE"],
                        D_DTYPE=modes["LORA_DTYPE"], BLOCK_M=c.BLOCK_M, BLOCK_N=c.BLOCK_N, PHASE=0,
                        STORE_BITS=True, COL_SCALE=dora, STORE_DZ=dora)  # fmt: skip
            variant = f"dropout {dt}, {lora_dt} A/B, r<={r}"
            parts = modes["LORA_MODE"] == 3  # BF16X3: B's bf16 parts (kernels.precision.bf16_parts)
            args = {**_grad_args(dt, sizes, r), "b_ptr": "*bf16" if parts else "*" + lora_dt}
            jobs.append(Job("_lora_grad_kernel", "lora_grad", _cfg_name(c), variant, args, meta,
                            c.num_warps, c.num_stages, False, archs, serial_ok=True))  # fmt: skip
            # the split pass's two launches (fused_lora/kernels/lora_grad.py)
            for phase, label, only in ((1, "split dY pass", dict(COMPUTE_DA=False, DROPOUT=False, STORE_BITS=False)),
                                       (2, "split x pass, dropout", dict(STORE_G=False, COMPUTE_DB=False))):
                jobs.append(Job("_lora_grad_kernel", "lora_grad", _cfg_name(c), f"{label} {dt}, {lora_dt} A/B, r<={r}",
                                args, {**meta, **only, "PHASE": phase}, c.num_warps, c.num_stages, False, archs,
                                serial_ok=True))  # fmt: skip
    return jobs


def mask_jobs(sizes: dict) -> list[Job]:
    args = dict(seed_ptr="*i64", out_ptr="*i8", M=sizes["M"], K=sizes["K"], stride_om=sizes["K"], threshold="i32")
    meta = dict(BLOCK_M=32, BLOCK_K=128)
    bits = dict(seed_ptr="*i64", out_ptr="*i32", M=sizes["M"], K=sizes["K"], words="i32", threshold="i32")
    return [Job("_dropout_mask_kernel", "dropout", "32x128 w4", "p>0", args, meta, 4, 1, False),
            Job("_keep_bits_kernel", "dropout", "32x128 w4", "p>0, packed", bits, meta, 4, 1, False)]


def all_jobs(sizes: dict) -> list[Job]:
    return gemm_jobs(sizes) + low_rank_jobs(sizes) + shrink_jobs(sizes) + grad_jobs(sizes) + mask_jobs(sizes)


# ======================================================================================================
# Embedding (issue 9: fused_lora.Embedding). Appended block: fused_lora/kernels/embedding.py at a Llama-3-size
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
# (label, dY dtype, deterministic, scale_grad_by_freq), fp32 adapters (TF32x3 products). Deterministic
# variants only for the entry deterministic mode launches (the first admitted, kernels.embedding).
EMBEDDING_BWD_VARIANTS = (
    ("bf16 dY, fp32 A/B, atomics", "bf16", False, False),
    ("bf16 dY, fp32 A/B, deterministic", "bf16", True, False),
    ("fp32 (tf32x3), atomics, scale_grad_by_freq", "fp32", False, True),
    ("fp32 (tf32x3), deterministic, scale_grad_by_freq", "fp32", True, True),
)


def _embedding_fwd_args(dt: str, lora_dt: str, r: int) -> dict:
    T, V, D = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"], EMBEDDING_SIZES["D"]
    return dict(idx_ptr="*i64", w_ptr="*" + dt, a_ptr="*" + lora_dt, b_ptr="*" + lora_dt, y_ptr="*" + dt,
                T=T, V=V, D=D, R=r, stride_wv=D, stride_wd=1, stride_ar=V, stride_av=1,
                stride_bd=r, stride_br=1, stride_yt=D, stride_yd=1, scale="fp32")  # fmt: skip


def _embedding_bwd_args(dt: str, r: int) -> dict:
    T, V, D = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"], EMBEDDING_SIZES["D"]
    return dict(dy_ptr="*" + dt, idx_ptr="*i64", a_ptr="*fp32", b_ptr="*fp32", cnt_ptr="*i64", db_ptr="*fp32",
                da_ptr="*fp32", g_ptr="*fp32", T=T, V=V, D=D, R=r, padding_idx="i32",
                stride_dyt=D, stride_dyd=1, stride_ar=V, stride_av=1, stride_bd=r, stride_br=1,
                stride_dbp=D * r, stride_dbd=r, stride_dbr=1, stride_dar=V, stride_dav=1, stride_gt=r, stride_gr=1,
                scale="fp32")  # fmt: skip


def _embedding_fwd_modes(dt: str, lora_dt: str) -> dict:
    """kernels.embedding._forward_mode: native for equal 16-bit dtypes, else as the GEMM epilogue."""
    return _modes(dt, lora_dt, kept=dt == lora_dt)


def embedding_jobs(sizes: dict | None = None) -> list[Job]:
    from fused_lora.kernels.configs import (
        EMBEDDING_BWD,
        EMBEDDING_FWD,
        EMBEDDING_R_BLOCK,
        EMBEDDING_R_CHUNK,
        admitted,
        keep_embedding,
    )

    jobs = []
    for c in EMBEDDING_FWD:
        for label, dt, lora_dt, r_pad in EMBEDDING_FWD_VARIANTS:
            archs = _admitted(keep_embedding, c, BYTES[dt], r_pad)
            if archs:
                meta = dict(R_PAD=r_pad, R_CHUNK=min(r_pad, EMBEDDING_R_CHUNK[BYTES[dt]]),
                            **_embedding_fwd_modes(dt, lora_dt), BLOCK_T=c.BLOCK_T, BLOCK_D=c.BLOCK_D,
                            SPLIT_D=c.SPLIT_D)  # fmt: skip
                args = _embedding_fwd_args(dt, lora_dt, r_pad)
                jobs.append(Job("_lora_embedding_fwd_kernel", "embedding", _cfg_name(c), label, args, meta,
                                c.num_warps, c.num_stages, False, archs))  # fmt: skip
    for c in EMBEDDING_BWD:
        for label, dt, det, freq in EMBEDDING_BWD_VARIANTS:
            r_block = EMBEDDING_R_BLOCK[BYTES[dt]]
            archs = _admitted(keep_embedding, c, BYTES[dt], r_block)
            if det:
                first = {a: admitted(EMBEDDING_BWD, keep_embedding, BYTES[dt], r_block, a)[0] for a in archs}
                archs = tuple(a for a in archs if first[a] is c)
            if archs:
                meta = dict(R_BLOCK=r_block, COMPUTE_DA=True, COMPUTE_DB=True, SCALE_FREQ=freq, DETERMINISTIC=det,
                            **_modes(dt, "fp32", kept=True, bf16_parts=False), BLOCK_T=c.BLOCK_T, BLOCK_D=c.BLOCK_D)  # fmt: skip
                args = _embedding_bwd_args(dt, r_block)
                jobs.append(Job("_lora_embedding_bwd_kernel", "embedding", _cfg_name(c), f"{label}, r<={r_block}",
                                args, meta, c.num_warps, c.num_stages, False, archs))  # fmt: skip
    T, V = EMBEDDING_SIZES["T"], EMBEDDING_SIZES["V"]
    for r_block in sorted(set(EMBEDDING_R_BLOCK.values())):
        for block_t in sorted({c.BLOCK_T for c in EMBEDDING_BWD}):
            args = dict(sorted_ptr="*i64", perm_ptr="*i64", g_ptr="*fp32", da_ptr="*fp32", T=T, R=r_block,
                        stride_gt=r_block, stride_gr=1, stride_dar=V, stride_dav=1)  # fmt: skip
            jobs.append(Job("_embedding_da_segments_kernel", "embedding", f"{block_t} w4",
                            f"deterministic dA, r<={r_block}", args, dict(R_BLOCK=r_block, BLOCK_T=block_t), 4, 1,
                            False))  # fmt: skip
    return jobs


_all_jobs_before_embedding = all_jobs


def all_jobs(sizes: dict) -> list[Job]:
    """Every job above, the embedding's included (this block only appends to the file)."""
    return _all_jobs_before_embedding(sizes) + embedding_jobs(sizes)


# ======================================================================================================
# 4-bit dequantisation (issue 17: QLoRA). Appended block: fused_lora/kernels/dequant.py at a Llama-3-8B MLP weight
# (14336 x 4096), every shipped configuration, each output dtype, plain and double-quantised scales, the
# smallest blocksize (a tile of many scale rows) and the largest (one scale per program). Compiled as
# launched: enable_fp_fusion=False (the nested scale's product and sum must round apart, as bitsandbytes').
# ======================================================================================================

DEQUANT_SIZES = {"N": 14336, "K": 4096}


def dequant_jobs(sizes: dict | None = None) -> list[Job]:
    from fused_lora.kernels.configs import DEQUANT

    numel = DEQUANT_SIZES["N"] * DEQUANT_SIZES["K"]
    jobs = []
    for c in DEQUANT:
        for out_dt in ("bf16", "fp16", "fp32"):
            for nested in (False, True):
                for bs in (32, 4096):
                    args = dict(packed_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", absmax2_ptr="*fp32",
                                code2_ptr="*fp32", offset_ptr="*fp32", lut_ptr="*fp32", out_ptr="*" + out_dt,
                                numel=numel, n_bytes=numel // 2, n_blocks=numel // bs, blocksize2=256)  # fmt: skip
                    meta = dict(LOG2_BS=bs.bit_length() - 1, NESTED=nested, BF16_BITS=False, BLOCK=c.BLOCK,
                                GROUP=min(bs, c.BLOCK))  # fmt: skip
                    variant = f"{out_dt} out, {'nested' if nested else 'fp32'} absmax, bs {bs}"
                    jobs.append(Job("_dequant4bit_kernel", "dequant", _cfg_name(c), variant, args, meta, c.num_warps,
                                    c.num_stages, False, options={"enable_fp_fusion": False}))  # fmt: skip
    return jobs


_all_jobs_before_dequant = all_jobs


def all_jobs(sizes: dict) -> list[Job]:
    """Every job above, the dequantisation kernel's included (this block only appends to the file)."""
    return _all_jobs_before_dequant(sizes) + dequant_jobs(sizes)


# ======================================================================================================
# DoRA's column scale (issue 18). Appended block: fused_lora/kernels/column_scale.py at the reference shape's output
# (8192 x 4096), 16-bit and fp32 tensors, fp32 scale, with and without bias.
# ======================================================================================================


def column_scale_jobs(sizes: dict) -> list[Job]:
    from fused_lora.kernels import column_scale as cs

    M, N = sizes["M"], sizes["N"]
    name = f"{cs.BLOCK_M}x{cs.BLOCK_N} w{cs.NUM_WARPS}"
    meta = dict(BLOCK_M=cs.BLOCK_M, BLOCK_N=cs.BLOCK_N)
    jobs = []
    for dt in ("bf16", "fp32"):
        for bias in (True, False):
            args = dict(z_ptr="*" + dt, c_ptr="*fp32", b_ptr="*fp32", y_ptr="*" + dt, M=M, N=N, stride_zm=N, stride_ym=N)
            jobs.append(Job("_scale_fwd_kernel", "column_scale", name, f"{dt} z, fp32 c, {'bias' if bias else 'no bias'}",
                            args, {**meta, "HAS_BIAS": bias}, cs.NUM_WARPS, 1, False))  # fmt: skip
        args = dict(dy_ptr="*" + dt, z_ptr="*" + dt, c_ptr="*fp32", dz_ptr="*" + dt, dc_ptr="*fp32", db_ptr="*fp32",
                    M=M, N=N, stride_dym=N, stride_zm=N, stride_dzm=N)  # fmt: skip
        jobs.append(Job("_scale_bwd_kernel", "column_scale", name, f"{dt} dY/z, fp32 c", args, meta, cs.NUM_WARPS, 1,
                        False))  # fmt: skip
    return jobs


def dora_epilogue_jobs(sizes: dict) -> list[Job]:
    """DoRA's fast path (fused_lora/dora_function.py): the fused GEMM's forward with the column scale in
    its epilogue (no bias) on every path the LoRA forward takes, the hybrid's pass over cuBLAS's x·Wᵀ
    (base + term, scaled), the grad pass's dY loop writing dz and dm's sums (bf16 activations), and the
    zero-magnitude columns' recomputation."""
    from fused_lora.kernels import column_scale as cs

    jobs = []
    for job in gemm_jobs(sizes):
        if "dX" not in job.variant and job.variant.startswith("y+bias, bf16 x/W, fp32 A/B"):
            variant = job.variant.replace("y+bias", "y·c (DoRA)")
            meta = {**job.meta, "HAS_BIAS": False, "COL_SCALE": True}
            jobs.append(dataclasses.replace(job, variant=variant, meta=meta))
    for job in low_rank_jobs(sizes):
        if job.variant.startswith("C=bias, bf16 x/W, fp32 A/B"):
            variant = job.variant.replace("C=bias", "y=(Z+C)·c (DoRA)")
            meta = {**job.meta, "HAS_BIAS": False, "COL_SCALE": True, "HAS_BASE": True}
            jobs.append(dataclasses.replace(job, variant=variant, meta=meta))
    for job in grad_jobs(sizes, dora=True):  # the dY pass also writing dz and dm's column sums (whole, and split)
        if job.meta["PHASE"] != 2:
            jobs.append(dataclasses.replace(job, variant="DoRA dz + Σ dY·y, " + job.variant))
    M, N, K = sizes["M"], sizes["N"], sizes["K"]
    for dt in ("bf16", "fp32"):
        args = dict(x_ptr="*" + dt, w_ptr="*" + dt, xa_ptr="*fp32", b_ptr="*fp32", dy_ptr="*" + dt, flag_ptr="*i8",
                    out_ptr="*fp32", M=M, N=N, K=K, R=16, rows_per="i32", stride_xm=K, stride_xk=1, stride_wn=K,
                    stride_wk=1, stride_xam=16, stride_bn=16, stride_br=1, stride_dym=N, stride_dyn=1)  # fmt: skip
        meta = dict(MAIN_PRECISION="tf32x3" if dt == "fp32" else "tf32", BLOCK_M=cs.DEAD_BLOCK_M,
                    BLOCK_N=cs.DEAD_BLOCK_N, BLOCK_K=cs.DEAD_BLOCK_K, R_CHUNK=16)  # fmt: skip
        name = f"{cs.DEAD_BLOCK_M}x{cs.DEAD_BLOCK_N}x{cs.DEAD_BLOCK_K} w4 s{cs.DEAD_STAGES}"
        jobs.append(Job("_dead_columns_kernel", "column_scale", name, f"{dt} x/W/dY, fp32 B", args, meta, 4,
                        cs.DEAD_STAGES, True))  # fmt: skip
    return jobs


_all_jobs_before_column_scale = all_jobs


def all_jobs(sizes: dict) -> list[Job]:
    """Every job above, DoRA's column scale included (this block only appends to the file)."""
    return _all_jobs_before_column_scale(sizes) + column_scale_jobs(sizes) + dora_epilogue_jobs(sizes)
