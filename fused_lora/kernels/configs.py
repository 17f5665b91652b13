"""Every kernel configuration we ship, in one place, with the filters that say where each may run.

Configurations are data (the tuples below). ``keep_*`` decides whether one fits a variant (element
size, dropout, rank, TMA or pointer path, architecture); :mod:`kernels.tuning` times the admitted ones
on first use of a problem, and ``fused_lora.compile_check`` compiles every configuration in the heaviest
variant its filter admits, so what we ship is what we checked (registers, spills, TMA, wgmma).

Under ``TRITON_INTERPRET=1`` each kernel gets small configurations instead: the interpreter runs
programs one by one on the CPU, and their only job there is to exercise every code path (several tiles
per persistent program, sub-tiled epilogues, K splits).
"""

from __future__ import annotations

from typing import NamedTuple

from .utils import interpreting

# Rule sets by architecture: 80 (Ampere rules, also used for sm_86/89: pointer loads, mma.sync) and 90
# (Hopper: TMA descriptors, wgmma). Shared memory per block, less a margin for what Triton adds.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per block (the opt-in maximum)
SMEM_MARGIN = 8 * 1024
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # per SM, shared by the blocks resident on it
SMEM_RESERVED = 1024  # per block, kept by the system (CUDA reserves 1 KB of each block's shared memory)
REGS_PER_SM = 65536


class GemmConfig(NamedTuple):
    """The fused GEMM (lora_gemm) and the hybrid's low-rank term (K = 0)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    SUBTILES: int  # the epilogue works on BLOCK_N / SUBTILES columns at a time (dropout, stores)
    num_warps: int
    num_stages: int
    # persistent programs per SM: 2 lets one program's epilogue and pipeline refill overlap the other's
    # main loop (the nested form's exposed per-tile time); admitted where two fit (keep_gemm)
    programs_per_sm: int = 1


class ShrinkConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_K: int
    SPLIT_K: int  # programs sharing one row band's K blocks (atomics into a zeroed xa when > 1)
    num_warps: int
    num_stages: int
    max_rank_16: int  # largest R_PAD it serves with 16-bit activations (measured: no spills)
    max_rank_32: int  # ... with fp32 activations (0: never)


class GradConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int  # the streamed tile: along N for dY, then along K for x
    num_warps: int
    num_stages: int
    max_rank_16: int  # largest R_BLOCK it serves with 16-bit activations (measured: no spills)
    max_rank_32: int  # ... with fp32 activations (0: never)


# The persistent GEMM. 128x256 (8 warps, two warpgroups of 64x256 wgmma) is the shape cuBLAS runs at
# this size on Hopper; its dropout epilogue needs 4 sub-tiles to stay under 255 registers. The smaller
# tiles serve Ampere, small M (more tiles than SMs), fp32 and the dropout epilogue.
GEMM = [
    GemmConfig(128, 256, 64, 8, 2, 8, 3),
    GemmConfig(128, 256, 64, 8, 4, 8, 3),
    # four stages: 229,408 B (S2) / 213,024 B (S4) nested, 229,424 B one loop (S4, fp32 adapters) of 232,448
    GemmConfig(128, 256, 64, 8, 2, 8, 4),
    GemmConfig(128, 256, 64, 8, 4, 8, 4),
    GemmConfig(128, 128, 64, 8, 1, 8, 4),
    GemmConfig(128, 128, 64, 8, 2, 8, 4),
    GemmConfig(64, 256, 64, 8, 2, 4, 4),
    GemmConfig(128, 64, 64, 8, 2, 4, 4),
    GemmConfig(64, 128, 64, 8, 2, 4, 4),
    GemmConfig(64, 64, 64, 8, 1, 4, 4),
    # fp32 operands (tf32 / tf32x3): BLOCK_K = 32 keeps the split operands in registers.
    GemmConfig(128, 128, 32, 8, 2, 8, 3),
    GemmConfig(64, 128, 32, 8, 2, 4, 4),
    GemmConfig(64, 64, 32, 8, 1, 4, 4),
    # two per SM: the nested forward (r > 16, grouped) only — 114,712 B and ~122 registers fit twice
    GemmConfig(128, 128, 64, 8, 2, 8, 3, programs_per_sm=2),
]
# The hybrid's low-rank term out = mask ⊙ (L·R) + bias: K = 0, memory-bound (writes [M, N]).
LOW_RANK = [
    GemmConfig(128, 128, 16, 8, 2, 8, 1),
    GemmConfig(64, 128, 16, 8, 2, 4, 1),
    GemmConfig(64, 64, 16, 8, 1, 4, 1),
]
# The rank caps below were measured with compile_check (ptxas, sm_80 and sm_90a) in the heaviest variant
# (fp32 adapters, whose tiles are split in two TF32 halves for fp32 accuracy): the register pressure of
# these kernels is set by [BLOCK_M, R] accumulators *and* by [BLOCK, R] adapter tiles that mma.sync keeps
# in registers, which no simple formula captured. Raise a cap only with a clean check.
SHRINK = [
    ShrinkConfig(64, 64, 1, 4, 3, 32, 16),
    ShrinkConfig(64, 64, 2, 4, 3, 32, 16),
    ShrinkConfig(64, 64, 4, 4, 3, 32, 16),
    ShrinkConfig(128, 64, 2, 8, 3, 32, 16),
    ShrinkConfig(128, 64, 4, 8, 3, 32, 16),
    ShrinkConfig(32, 64, 1, 4, 3, 64, 16),
    ShrinkConfig(32, 64, 4, 4, 2, 64, 16),
    ShrinkConfig(16, 64, 2, 4, 2, 128, 32),
    ShrinkConfig(16, 64, 4, 8, 2, 128, 128),  # bf16 r = 256 spilled under triton 3.8 (sm_80)
    ShrinkConfig(16, 32, 4, 8, 2, 256, 256),
    ShrinkConfig(16, 32, 1, 8, 2, 256, 256),
]
GRAD = [
    GradConfig(32, 64, 4, 3, 16, 0),  # r <= 64 spilled on sm_80 once round_tf32 kept NaNs; fp32 under 3.8; r <= 32 (8 B) once the dA pass stored the keep bits
    GradConfig(64, 64, 4, 3, 32, 0),  # r <= 64 with dropout spilled under triton 3.8 (sm_80)
    GradConfig(64, 64, 8, 3, 64, 16),
    GradConfig(128, 64, 8, 2, 16, 0),  # r <= 32 spilled 112 B on sm_80 once the dA pass stored the keep bits
    GradConfig(32, 128, 4, 3, 16, 0),
    GradConfig(16, 64, 4, 2, 64, 32),
    GradConfig(16, 64, 8, 2, 64, 32),
    GradConfig(32, 32, 4, 2, 64, 16),  # fp32 r <= 32 spilled on sm_80 (ditto)
]

# Under the interpreter: small tiles, and two of each so that tests can force different tile shapes in
# the forward and the backward (the dropout mask must not depend on them).
GEMM_INTERPRET = [GemmConfig(32, 32, 32, 4, 1, 4, 1), GemmConfig(16, 64, 16, 2, 2, 4, 1)]
LOW_RANK_INTERPRET = [GemmConfig(32, 32, 16, 4, 1, 4, 1), GemmConfig(16, 64, 16, 2, 2, 4, 1)]
SHRINK_INTERPRET = [ShrinkConfig(16, 32, 2, 4, 1, 256, 256), ShrinkConfig(32, 16, 1, 4, 1, 256, 256)]
GRAD_INTERPRET = [GradConfig(16, 32, 4, 1, 64, 64), GradConfig(32, 16, 4, 1, 64, 64)]

# The low-rank term walks the rank in slices of this many columns (tl.dot's smallest K).
R_CHUNK = 16
# Up to this padded rank the fused GEMM's Hopper path unrolls its rank walk (R_SLICES slices known at
# compile time) so that the persistent loop holds one loop and Triton flattens it with the K loop into one
# pipeline across tiles. Above it (and for grouped adapters, whose walk depends on the tile) the walk is a
# runtime loop and the two loops stay nested: unrolled, every slice's L and R tiles got shared memory of
# their own (r = 64: 245,888 B at 128x256, over the limit).
STATIC_RANK_MAX = 16


def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def rank_slices(r_pad: int, tma: bool, grouped: bool, lora_mode: int = 0, dropout: bool = False) -> int:
    """R_SLICES of the fused GEMM: the number of R_CHUNK rank slices unrolled at compile time, which makes
    the Hopper path one pipeline across tiles (0: a runtime rank walk, nested loops).

    Under triton >= 3.7 the flattened forward with a TF32 low-rank product accumulated into the main
    accumulator (LORA_MODE 1: fp32/fp16 adapters on 16-bit activations, no dropout) made ptxas serialise
    every wgmma (C7515: "non wgmma instructions defining accumulator registers ... between start and end
    of the pipeline stage"; triton 3.8.0, all 11 such configurations); there it stays nested. Triton 3.6
    compiles it clean."""
    if not tma or grouped or r_pad > STATIC_RANK_MAX:
        return 0
    if lora_mode == 1 and not dropout and _triton_version() >= (3, 7):
        return 0
    return r_pad // R_CHUNK


def gemm_smem(c: GemmConfig, elem_bytes: int, lora_bytes: int, tma: bool, dropout: bool = False,
              pipelined: bool = False) -> int:
    """Shared memory the fused GEMM needs. The Hopper (TMA) path: what the compiler allocated, as
    compile_check measured it (:data:`kernels.gemm_smem.SM90`, in the heaviest variant: fp32 adapters;
    tests/test_compile.py holds the table to the compiled kernels), else an estimate — the pipeline's
    operand tiles, the low-rank tiles (one R tile per epilogue slice with dropout) and one output
    sub-tile staged for the TMA store. The pointer path: the pipeline's operand tiles."""
    pipeline = c.num_stages * (c.BLOCK_M + c.BLOCK_N) * c.BLOCK_K * elem_bytes
    if not tma:
        return pipeline
    from .gemm_smem import SM90

    measured = SM90.get((name(c), elem_bytes, dropout, pipelined))
    if measured is not None:
        return measured
    sub_n = c.BLOCK_N // c.SUBTILES
    r_tiles = c.SUBTILES if dropout else 1
    return pipeline + c.BLOCK_M * R_CHUNK * 4 + r_tiles * R_CHUNK * c.BLOCK_N * lora_bytes + c.BLOCK_M * sub_n * elem_bytes


def _gemm_acc_limit(elem_bytes: int, dropout: bool, arch: int, tma: bool) -> int:
    """fp32 accumulator values per thread a GEMM tile may hold, measured with compile_check (ptxas).

    16-bit operands: 128 on sm_90a (128x256 tiles on 8 warps; with dropout only through TMA: the pointer
    path's masked low-rank loads and the keep-mask do not fit beside them), 64 on sm_80 (mma.sync holds
    its operand fragments in registers too). fp32 operands (tf32x3 splits each operand in two): 64 on
    sm_90a, 32 on sm_80 and for the pointer path's dropout epilogue."""
    if elem_bytes == 2:
        if arch < 90:
            return 64
        return 128 if tma or not dropout else 64
    if arch < 90 or (dropout and not tma):
        return 32
    return 64


def keep_gemm(c: GemmConfig, elem_bytes: int, dropout: bool, arch: int, tma: bool = False, lora_bytes: int = 4,
              pipelined: bool = False, check_smem: bool = True) -> bool:
    """May `c` run the fused GEMM in this variant (`pipelined`: the one-loop Hopper form, R_SLICES > 0)?
    Its accumulator within the register budget above; with dropout, one epilogue slice (BLOCK_N /
    SUBTILES columns) at most 32 values per thread (its masked low-rank product is a second accumulator
    of that size) and, on the pointer path, the [BLOCK_M, 16] low-rank slice it holds beside it at most 8
    per thread (measured: 16 spilled on sm_80 under triton 3.8); fp32 operands with BLOCK_K <= 32; the
    shared memory within the limit — the hardware's for what the compiler was measured to allocate (the
    Hopper path), less a margin for an estimate (`check_smem=False`: all but that, for measuring it)."""
    acc = c.BLOCK_M * c.BLOCK_N // (32 * c.num_warps)
    if acc > _gemm_acc_limit(elem_bytes, dropout, arch, tma) or (dropout and acc // c.SUBTILES > 32):
        return False
    if dropout and not (tma and arch >= 90) and c.BLOCK_M * R_CHUNK // (32 * c.num_warps) > 8:
        return False  # the pointer path's [BLOCK_M, 16] low-rank slice: 128x64 w4 (16 per thread) spilled under 3.8
    if elem_bytes == 4 and c.BLOCK_K > 32:
        return False
    hopper = tma and arch >= 90
    if c.programs_per_sm > 1 and not (hopper and not dropout and not pipelined and elem_bytes == 2):
        return False  # two per SM: measured only for the nested 16-bit forward (dX's epilogue needs ~184 registers)
    if not check_smem:
        return True
    smem = gemm_smem(c, elem_bytes, lora_bytes, hopper, dropout, pipelined and hopper)
    measured = hopper and smem_measured(c, elem_bytes, dropout, pipelined)
    if c.programs_per_sm > 1:  # every resident program's allocation, and the system's 1 KB each, on one SM
        return measured and c.programs_per_sm * (smem + SMEM_RESERVED) <= SMEM_PER_SM[arch]
    return smem <= SMEM_LIMIT[arch] - (0 if measured else SMEM_MARGIN)


def smem_measured(c: GemmConfig, elem_bytes: int, dropout: bool, pipelined: bool) -> bool:
    from .gemm_smem import SM90

    return (name(c), elem_bytes, dropout, pipelined) in SM90


def _keep_stream(c, elem_bytes: int, r: int, arch: int) -> bool:
    """Rank within the configuration's measured cap; pipeline stages ([BLOCK_M, tile] activations and
    a [tile, r] adapter tile each) within shared memory."""
    if r > (c.max_rank_16 if elem_bytes == 2 else c.max_rank_32):
        return False
    tile = c[1]  # BLOCK_K (shrink) or BLOCK_N (grad)
    return c.num_stages * tile * (c.BLOCK_M * elem_bytes + r * 4) <= SMEM_LIMIT[arch] - SMEM_MARGIN


def keep_shrink(c: ShrinkConfig, elem_bytes: int, r_pad: int, arch: int) -> bool:
    return _keep_stream(c, elem_bytes, r_pad, arch)


def grad_r_block(r_pad: int, elem_bytes: int) -> int:
    """Rank columns one grad program owns: all of them up to 64 (32 for fp32 activations); larger
    ranks split across programs, each re-reading its dY and x band."""
    return min(r_pad, 64 if elem_bytes == 2 else 32)


# The grad pass multiplies fp32 adapters by bf16 activations as three bf16 parts (precision.BF16X3) up to
# this rank block; at 64, the parts of the in-register xa and g tiles spilled on sm_80 (B split per tile:
# 20-412 B in five configurations; B split on the host: 8 B at 64x64 w8 s3; triton 3.6), so rank blocks
# of 64 keep TF32X3.
BF16X3_MAX_R_BLOCK = 32


# DoRA's dY loop (kernels.lora_grad COL_SCALE: y read, dz written) needs more registers: at their LoRA
# caps these spilled with fp32 adapters (16-bit activations, sm_80: 244 B at r <= 32, 48 B / 64 B at
# r <= 64, 24 B at r <= 32, 16 B at r <= 64 under triton 3.8; sm_90a under 3.8: 220 B at r <= 16; fp32 activations:
# 24-152 B), so DoRA's pass takes them only up to these ranks (16-bit, fp32 activations; 0: never),
# measured without spills under triton 3.6 and 3.8 (compile_check's DoRA rows).
GRAD_DORA_CAP = {
    (64, 64, 4, 3): (16, 16), (64, 64, 8, 3): (16, 0), (32, 128, 4, 3): (0, 0), (16, 64, 4, 2): (32, 16),
    (16, 64, 8, 2): (32, 32),
}  # fmt: skip


def keep_grad(c: GradConfig, elem_bytes: int, r_block: int, arch: int, dora: bool = False) -> bool:
    caps = GRAD_DORA_CAP.get(tuple(c[:4])) if dora else None
    if caps is not None and r_block > caps[0 if elem_bytes == 2 else 1]:
        return False
    return _keep_stream(c, elem_bytes, r_block, arch)


def gemm_table(low_rank: bool = False) -> list[GemmConfig]:
    if interpreting():
        return LOW_RANK_INTERPRET if low_rank else GEMM_INTERPRET
    return LOW_RANK if low_rank else GEMM


def shrink_table() -> list[ShrinkConfig]:
    return SHRINK_INTERPRET if interpreting() else SHRINK


def grad_table() -> list[GradConfig]:
    return GRAD_INTERPRET if interpreting() else GRAD


def admitted(table: list, keep, *args) -> list:
    """The entries `keep(entry, *args)` admits; never none: beyond the checked rank buckets (r > 256)
    the last, smallest entry runs — correct, not checked for spills."""
    return [c for c in table if keep(c, *args)] or table[-1:]


def deterministic_entry(kind: str, elem_bytes: int, r: int, arch: int, dropout: bool = False, tma: bool = False,
                        pipelined: bool = False, dora: bool = False):
    """The entry deterministic mode (``torch.use_deterministic_algorithms``) launches, fixed so that the
    summation order never depends on what was timed: for the GEMM, the first admitted entry; for the
    shrink, one without a K split (no atomics); for grad, the admitted one with the tallest row band
    (its per-band partial sums, summed on the host in a fixed order, cost bands x (N + K) x r x 4
    bytes). Ranks beyond the checked buckets (> 256) take the last entry."""
    if kind == "gemm":
        return admitted(gemm_table(), keep_gemm, elem_bytes, dropout, arch, tma, 4, pipelined)[0]
    if kind == "shrink":
        table = [c for c in shrink_table() if c.SPLIT_K == 1]
        return admitted(table, keep_shrink, elem_bytes, r, arch)[0]
    table = sorted(grad_table(), key=lambda c: -c.BLOCK_M)
    return admitted(table, keep_grad, elem_bytes, r, arch, dora)[0]


def name(c) -> str:
    """A configuration's name: its tile sizes, then warps and stages ("128x256x64x8x2 w8 s3")."""
    tiles = [str(v) for k, v in c._asdict().items() if k.isupper()]
    per_sm = getattr(c, "programs_per_sm", 1)
    return "x".join(tiles) + f" w{c.num_warps} s{c.num_stages}" + (f" p{per_sm}" if per_sm > 1 else "")


def launch_kwargs(c) -> dict:
    """Keyword arguments for ``kernel[grid](...)``: the meta-parameters, num_warps and num_stages."""
    return {k: v for k, v in c._asdict().items() if k.isupper() or k in ("num_warps", "num_stages")}


def device_arch(t) -> int:
    """The rule set (80 or 90) for the GPU that holds tensor `t` (90 off the GPU: the interpreter runs
    the Hopper path, TMA descriptors included)."""
    import torch

    if t.device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(t.device)[0] >= 9 else 80


# ======================================================================================================
# Embedding (issue 9: fused_lora.Embedding). Appended block: the kernels live in fused_lora/kernels/embedding.py.
# ======================================================================================================


class EmbeddingConfig(NamedTuple):
    """Forward: y = W[idx] + s·A[:, idx]ᵀ·Bᵀ, memory-bound (one gathered read of W's rows, one write)."""

    BLOCK_T: int  # tokens per program
    BLOCK_D: int  # embedding columns per tile (streamed along D)
    SPLIT_D: int  # programs sharing one token band's D tiles (keeps the GPU full with few tokens)
    num_warps: int
    num_stages: int
    max_rank_16: int  # largest padded rank R_PAD it serves with 16-bit tables (measured: no spills)
    max_rank_32: int  # ... with fp32 tables (0: never)


class EmbeddingGradConfig(NamedTuple):
    """Backward: g = dY·B and dB = s·dYᵀ·A[:, idx]ᵀ from one pass over dY, then dA scattered by index."""

    BLOCK_T: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    max_rank_16: int  # largest R_BLOCK it serves with 16-bit dY (measured: no spills)
    max_rank_32: int  # ... with fp32 dY (0: never)


# The rank caps were measured with compile_check (sm_80 and sm_90a: zero spills).
EMBEDDING_FWD = [
    EmbeddingConfig(32, 128, 1, 4, 2, 64, 256),
    EmbeddingConfig(64, 128, 1, 4, 2, 64, 0),
    EmbeddingConfig(16, 256, 1, 4, 2, 128, 256),  # bf16 r = 256 spilled once round_tf32 kept NaNs
    EmbeddingConfig(16, 128, 4, 4, 2, 256, 256),
    EmbeddingConfig(32, 256, 2, 8, 2, 128, 256),  # bf16 r = 256 spilled under triton 3.8
]
# The first admitted entry is the one deterministic mode launches. Under triton 3.8 (ptxas 12.9) every
# entry with 64-column tiles spilled on sm_80 (bf16 dY r <= 64: 104-296 B; fp32 dY with
# scale_grad_by_freq: 8-56 B), and 32x32 w4 spilled under 3.6 on sm_90a; these two are clean under both
# (compile_check, sm_80 and sm_90a). The kernel is memory-bound: narrower tiles cost issue slots, not bytes.
EMBEDDING_BWD = [
    EmbeddingGradConfig(32, 32, 8, 2, 64, 16),
    EmbeddingGradConfig(16, 32, 4, 2, 64, 16),
]
EMBEDDING_FWD_INTERPRET = [EmbeddingConfig(16, 32, 2, 4, 1, 256, 256), EmbeddingConfig(32, 16, 1, 4, 1, 256, 256)]
EMBEDDING_BWD_INTERPRET = [EmbeddingGradConfig(16, 32, 4, 1, 256, 256), EmbeddingGradConfig(32, 16, 4, 1, 256, 256)]

# Rank columns one program handles at a time, by table element size. Forward: the low-rank term is
# added in rank slices of this width (one slice: the tokens' A columns are gathered once per program;
# more: re-gathered per D tile). Backward: larger ranks split across programs, each re-reading its dY
# band. fp32 tables run TF32x3 (every operand split in two), hence the narrower slices (wider ones
# spilled, measured by compile_check). 16 under the interpreter, so that small tests cover both paths.
EMBEDDING_R_CHUNK = {2: 64, 4: 16}
EMBEDDING_R_BLOCK = {2: 64, 4: 16}
EMBEDDING_R_INTERPRET = 16


def embedding_r_chunk(r_pad: int, elem_bytes: int) -> int:
    return min(r_pad, EMBEDDING_R_INTERPRET if interpreting() else EMBEDDING_R_CHUNK[elem_bytes])


def embedding_r_block(r_pad: int, elem_bytes: int) -> int:
    return min(r_pad, EMBEDDING_R_INTERPRET if interpreting() else EMBEDDING_R_BLOCK[elem_bytes])


def keep_embedding(c: EmbeddingConfig | EmbeddingGradConfig, elem_bytes: int, r: int, arch: int) -> bool:
    """`r` (R_PAD in the forward, R_BLOCK in the backward) within the measured cap; pipelined tiles (a
    [BLOCK_T, BLOCK_D] table tile and a [BLOCK_D, rank slice] fp32 adapter tile per stage) within shared
    memory."""
    if r > (c.max_rank_16 if elem_bytes == 2 else c.max_rank_32):
        return False
    cols = min(r, EMBEDDING_R_CHUNK[elem_bytes])
    return c.num_stages * c.BLOCK_D * (c.BLOCK_T * elem_bytes + cols * 4) <= SMEM_LIMIT[arch] - SMEM_MARGIN


def embedding_table(kind: str) -> list:
    """The forward ("fwd") or backward ("bwd") embedding configurations (small ones under the interpreter)."""
    if kind == "fwd":
        return EMBEDDING_FWD_INTERPRET if interpreting() else EMBEDDING_FWD
    return EMBEDDING_BWD_INTERPRET if interpreting() else EMBEDDING_BWD


# ======================================================================================================
# 4-bit dequantisation (issue 17: QLoRA). Appended block: the kernel lives in fused_lora/kernels/dequant.py.
# ======================================================================================================


class DequantConfig(NamedTuple):
    BLOCK: int  # elements per program (BLOCK / 2 bytes in); a tile row of min(blocksize, BLOCK) shares a scale
    num_warps: int
    num_stages: int


# Memory-bound and elementwise: 16 elements (8 bytes in, 32 bytes of bf16 out) per thread, or 32.
DEQUANT = [DequantConfig(4096, 8, 1), DequantConfig(2048, 4, 1), DequantConfig(8192, 8, 1)]
# Under the interpreter: small programs, so that a tile spanning several scale blocks (bs 32) and one
# inside a block (bs >= 128) are both exercised by small tests.
DEQUANT_INTERPRET = [DequantConfig(256, 4, 1)]


def dequant_table() -> list[DequantConfig]:
    return DEQUANT_INTERPRET if interpreting() else DEQUANT
