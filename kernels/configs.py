"""Every autotune configuration we ship, in one place, with the filter that says where each may run.

Configurations are data (tuples below). :func:`keep_gemm` / :func:`keep_shrink` / :func:`keep_grad` decide
whether one fits a given variant (element size, dropout, rank); the autotuner prunes with them before it
benchmarks, and ``fused_lora.compile_check`` compiles every configuration in the worst variant that
:func:`keep_*` admits it for, so what we ship is what we checked.

Autotune keys use bucketed sizes (:func:`kernels.utils.bucket`): a new sequence length lands in a tuned
bucket and does not recompile, because M is also passed unspecialised.

Under ``TRITON_INTERPRET=1`` each kernel gets one small configuration: the interpreter runs programs one
by one on the CPU, and benchmarking configurations there would measure nothing.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton

from .utils import interpreting

# The filters below take an architecture: 80 (Ampere rules, also used for sm_86/89) or 90 (Hopper).
# The autotuner prunes for the GPU at hand; compile_check compiles each configuration for every
# architecture that admits it. Shared memory per block (sm_80: 163 KiB, sm_90: 227 KiB), less a margin.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SMEM_MARGIN = 8 * 1024


class GemmConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


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


# Tile shapes from the Triton matmul tutorials' Hopper/Ampere lists, plus BLOCK_K=32 variants so that
# fp32 inputs keep a pipeline within the shared-memory budget.
GEMM = [
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 8, 4),
    GemmConfig(64, 256, 64, 8, 4, 4),
    GemmConfig(128, 64, 64, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(64, 64, 64, 8, 4, 4),
    # fp32 operands (tf32 / tf32x3): BLOCK_K = 32 keeps the split operands in registers.
    GemmConfig(128, 128, 32, 8, 8, 3),
    GemmConfig(64, 128, 32, 8, 4, 4),
    GemmConfig(64, 64, 32, 8, 4, 4),
]
# The rank caps below were measured with compile_check (ptxas, sm_80 and sm_90a): the register
# pressure of these kernels is set by [BLOCK_M, R] accumulators *and* by [BLOCK, R] adapter tiles that
# mma.sync keeps in registers, which no simple formula captured. Raise a cap only with a clean check.
SHRINK = [
    ShrinkConfig(64, 64, 1, 4, 3, 64, 32),
    ShrinkConfig(64, 64, 2, 4, 3, 64, 16),
    ShrinkConfig(64, 64, 4, 4, 3, 64, 16),
    ShrinkConfig(128, 64, 2, 8, 3, 64, 16),
    ShrinkConfig(128, 64, 4, 8, 3, 64, 16),
    ShrinkConfig(32, 64, 1, 4, 3, 128, 16),
    ShrinkConfig(32, 64, 4, 4, 2, 128, 32),
    ShrinkConfig(16, 64, 2, 4, 2, 128, 64),
    ShrinkConfig(16, 64, 4, 8, 2, 256, 128),
    ShrinkConfig(16, 32, 4, 8, 2, 256, 256),
    ShrinkConfig(16, 32, 1, 8, 2, 256, 256),
]
GRAD = [
    GradConfig(32, 64, 4, 3, 64, 16),
    GradConfig(64, 64, 4, 3, 64, 0),
    GradConfig(64, 64, 8, 3, 64, 16),
    GradConfig(128, 64, 8, 2, 64, 0),
    GradConfig(32, 128, 4, 3, 32, 0),
    GradConfig(16, 64, 4, 2, 64, 32),
    GradConfig(16, 64, 8, 2, 64, 32),
    GradConfig(32, 32, 4, 2, 64, 32),
]

GEMM_INTERPRET = GemmConfig(32, 32, 32, 4, 4, 1)
SHRINK_INTERPRET = ShrinkConfig(16, 32, 2, 4, 1, 256, 256)
GRAD_INTERPRET = GradConfig(16, 32, 4, 1, 64, 64)


# The GEMM's low-rank prologue walks the rank in slices of this many columns. 16 is tl.dot's smallest
# K and keeps the slices' operands small enough that the largest tiles (128x256, 8 warps) stay under
# ~210 registers on sm_90a (32 or 64 pushed them to 255 and spills, measured by compile_check).
GEMM_R_CHUNK = 16


def _gemm_acc_limit(elem_bytes: int, dropout: bool, arch: int) -> int:
    """fp32 accumulator values per thread a GEMM tile may hold, measured with compile_check (ptxas).

    16-bit operands: 128 on sm_90a (128x256 tiles on 8 warps), 64 on sm_80 (mma.sync holds its operand
    fragments in registers too: 128 spilled with triton 3.6) and 64 with dropout (the keep-mask's Philox
    state is live beside the accumulator in the prologue; 128 spilled). fp32 operands run tf32x3, which
    splits every operand in two: 64 on sm_90a, 32 on sm_80."""
    if elem_bytes == 2:
        return 128 if arch >= 90 and not dropout else 64
    return 64 if arch >= 90 else 32


def keep_gemm(c: GemmConfig, elem_bytes: int, dropout: bool, arch: int) -> bool:
    """May `c` run the fused GEMM on `arch`? Its pipeline must fit shared memory and its accumulator
    the register budget above; fp32 operands also need BLOCK_K <= 32."""
    pipeline = c.num_stages * (c.BLOCK_M + c.BLOCK_N) * c.BLOCK_K * elem_bytes
    acc = c.BLOCK_M * c.BLOCK_N // (32 * c.num_warps)
    if elem_bytes == 4 and c.BLOCK_K > 32:
        return False
    return pipeline <= SMEM_LIMIT[arch] - SMEM_MARGIN and acc <= _gemm_acc_limit(elem_bytes, dropout, arch)


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


def keep_grad(c: GradConfig, elem_bytes: int, r_block: int, arch: int) -> bool:
    return _keep_stream(c, elem_bytes, r_block, arch)


def deterministic_entry(kind: str, elem_bytes: int, r: int, arch: int, dropout: bool = False):
    """The table entry deterministic mode (``torch.use_deterministic_algorithms``) launches, fixed so
    that the summation order never depends on what an autotuner picked: for the GEMM, the first admitted
    entry; for the shrink, one without a K split (no atomics); for grad, the admitted one with the
    tallest row band (its per-band partial sums, summed on the host in a fixed order, cost
    bands x (N + K) x r x 4 bytes). Ranks beyond the checked buckets (> 256) take the last entry."""
    if kind == "gemm":
        return next((c for c in GEMM if keep_gemm(c, elem_bytes, dropout, arch)), GEMM[-1])
    if kind == "shrink":
        table, keep = [c for c in SHRINK if c.SPLIT_K == 1], keep_shrink
    else:
        table, keep = sorted(GRAD, key=lambda c: -c.BLOCK_M), keep_grad
    return next((c for c in table if keep(c, elem_bytes, r, arch)), table[-1])


def deterministic_config(kind: str, elem_bytes: int, r: int, arch: int, dropout: bool = False) -> dict:
    """Launch keywords for :func:`deterministic_entry` (a small fixed one under the interpreter)."""
    if interpreting():
        interp = {"gemm": GEMM_INTERPRET, "shrink": SHRINK_INTERPRET._replace(SPLIT_K=1), "grad": GRAD_INTERPRET}
        c = interp[kind]
    else:
        c = deterministic_entry(kind, elem_bytes, r, arch, dropout)
    return dict(_as_triton(c).all_kwargs())


def _zero_xa(nargs) -> None:
    nargs["xa_ptr"].zero_()


def _as_triton(c) -> triton.Config:
    not_meta = ("num_warps", "num_stages", "max_rank_16", "max_rank_32")
    meta = {k: v for k, v in c._asdict().items() if k not in not_meta}
    # A K-split shrink adds its partial products atomically: its output must start at zero.
    hook = _zero_xa if meta.get("SPLIT_K", 1) > 1 else None
    return triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=hook)


def _first_or_all(kept, configs):
    """What the autotuner benchmarks: every admitted configuration, or only the first one when
    FUSED_LORA_AUTOTUNE=0 (one compile per variant: quick test runs, no tuning). Never nothing: beyond the
    checked rank buckets (r > 256) the last, smallest entry runs — correct, not checked for spills."""
    kept = kept or configs[-1:]
    return kept[:1] if os.environ.get("FUSED_LORA_AUTOTUNE", "1") == "0" else kept


def device_arch(t) -> int:
    """The rule set (80 or 90) for the GPU that holds tensor `t`."""
    import torch

    if t.device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(t.device)[0] >= 9 else 80


def prune_gemm(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    p, dropout = args["p_ptr"], bool(args["DROPOUT"])
    arch = device_arch(p)
    kept = [c for c in configs if keep_gemm(_from_triton(c, GemmConfig), p.element_size(), dropout, arch)]
    return _first_or_all(kept, configs)


def prune_shrink(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    x, r_pad = args["x_ptr"], args["R_PAD"]
    arch = device_arch(x)
    kept = [c for c in configs if keep_shrink(_from_triton(c, ShrinkConfig), x.element_size(), r_pad, arch)]
    return _first_or_all(kept, configs)


def prune_grad(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    dy, r_pad = args["dy_ptr"], args["R_BLOCK"]
    arch = device_arch(dy)
    kept = [c for c in configs if keep_grad(_from_triton(c, GradConfig), dy.element_size(), r_pad, arch)]
    return _first_or_all(kept, configs)


def _from_triton(c: triton.Config, kind):
    """The table entry a triton.Config was made from."""
    fields = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
    table = {GemmConfig: GEMM, ShrinkConfig: SHRINK, GradConfig: GRAD}[kind]
    return next(e for e in table if all(fields[f] == getattr(e, f) for f in fields))


def gemm_configs() -> list[triton.Config]:
    return [_as_triton(GEMM_INTERPRET)] if interpreting() else [_as_triton(c) for c in GEMM]


def shrink_configs() -> list[triton.Config]:
    return [_as_triton(SHRINK_INTERPRET)] if interpreting() else [_as_triton(c) for c in SHRINK]


def grad_configs() -> list[triton.Config]:
    return [_as_triton(GRAD_INTERPRET)] if interpreting() else [_as_triton(c) for c in GRAD]


# ======================================================================================================
# Embedding (issue 9: fused_lora.Embedding). Appended block: the kernels live in kernels/embedding.py.
# ======================================================================================================


class EmbeddingConfig(NamedTuple):
    BLOCK_T: int  # tokens per program
    BLOCK_D: int  # embedding columns per tile (streamed along D)
    SPLIT_D: int  # forward only: programs sharing one token band's D tiles (1 in the backward)
    num_warps: int
    num_stages: int
    max_rank_16: int  # largest rank slice it serves with 16-bit tables (measured: no spills)
    max_rank_32: int  # ... with fp32 tables


# Forward: y = W[idx] + s·A[:, idx]ᵀ·Bᵀ. Memory-bound (one gathered read of W's rows, one write of y);
# SPLIT_D > 1 keeps the GPU full when there are few tokens.
# The rank caps (max_rank_*: the largest padded rank R_PAD the forward serves, the largest R_BLOCK the
# backward serves) were measured with compile_check, sm_80 and sm_90a: zero spills. 0: never.
EMBEDDING_FWD = [
    EmbeddingConfig(32, 128, 1, 4, 2, 64, 256),
    EmbeddingConfig(64, 128, 1, 4, 2, 64, 0),
    EmbeddingConfig(16, 256, 1, 4, 2, 256, 256),
    EmbeddingConfig(16, 128, 4, 4, 2, 256, 256),
    EmbeddingConfig(32, 256, 2, 8, 2, 256, 256),
]
# Backward: g = dY·B and dB = s·dYᵀ·A[:, idx]ᵀ from one pass over dY, then dA scattered by index.
EMBEDDING_BWD = [
    EmbeddingConfig(32, 64, 1, 4, 2, 64, 16),
    EmbeddingConfig(64, 64, 1, 4, 2, 64, 0),
    EmbeddingConfig(64, 64, 1, 8, 2, 64, 16),
    EmbeddingConfig(16, 128, 1, 4, 2, 64, 0),
]
EMBEDDING_FWD_INTERPRET = EmbeddingConfig(16, 32, 2, 4, 1, 256, 256)
EMBEDDING_BWD_INTERPRET = EmbeddingConfig(16, 32, 1, 4, 1, 256, 256)
# Rank columns one program handles at a time, by table element size. Forward: the low-rank term is
# added in rank slices of this width (one slice: the tokens' A columns are gathered once per program;
# more: re-gathered per D tile). Backward: larger ranks split across programs, each re-reading its dY
# band. fp32 tables run tf32x3, which splits every operand in two, hence the narrower slices (wider ones
# spilled, measured by compile_check). 16 under the interpreter, so that small tests cover both paths.
EMBEDDING_R_CHUNK = {2: 64, 4: 16}
EMBEDDING_R_BLOCK = {2: 64, 4: 16}
EMBEDDING_R_INTERPRET = 16


def embedding_r_chunk(r_pad: int, elem_bytes: int) -> int:
    return min(r_pad, EMBEDDING_R_INTERPRET if interpreting() else EMBEDDING_R_CHUNK[elem_bytes])


def embedding_r_block(r_pad: int, elem_bytes: int) -> int:
    return min(r_pad, EMBEDDING_R_INTERPRET if interpreting() else EMBEDDING_R_BLOCK[elem_bytes])


def keep_embedding(c: EmbeddingConfig, elem_bytes: int, r: int, arch: int) -> bool:
    """`r` (R_PAD in the forward, R_BLOCK in the backward) within the measured cap; pipelined tiles (a
    [BLOCK_T, BLOCK_D] table tile and a [BLOCK_D, rank slice] fp32 adapter tile per stage) within
    shared memory."""
    if r > (c.max_rank_16 if elem_bytes == 2 else c.max_rank_32):
        return False
    cols = min(r, EMBEDDING_R_CHUNK[elem_bytes])
    return c.num_stages * c.BLOCK_D * (c.BLOCK_T * elem_bytes + cols * 4) <= SMEM_LIMIT[arch] - SMEM_MARGIN


def _embedding_table(kind: str):
    if interpreting():
        return [EMBEDDING_FWD_INTERPRET if kind == "fwd" else EMBEDDING_BWD_INTERPRET]
    return EMBEDDING_FWD if kind == "fwd" else EMBEDDING_BWD


def embedding_configs(kind: str) -> list[triton.Config]:
    """Autotune candidates for the forward ("fwd") or backward ("bwd") embedding kernel."""
    out = []
    for c in _embedding_table(kind):
        meta = {"BLOCK_T": c.BLOCK_T, "BLOCK_D": c.BLOCK_D}
        if kind == "fwd":
            meta["SPLIT_D"] = c.SPLIT_D
        out.append(triton.Config(meta, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _embedding_entry(kind: str, c: triton.Config) -> EmbeddingConfig:
    split = c.kwargs.get("SPLIT_D", 1)
    fields = (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
    table = _embedding_table(kind)
    return next(e for e in table if (e.BLOCK_T, e.BLOCK_D, e.num_warps, e.num_stages) == fields and split == e.SPLIT_D)


def _prune_embedding(kind: str, table_arg: str, rank_arg: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t, r = args[table_arg], args[rank_arg]
        arch = device_arch(t)
        kept = [c for c in configs if keep_embedding(_embedding_entry(kind, c), t.element_size(), r, arch)]
        return _first_or_all(kept, configs)

    return prune


prune_embedding_fwd = _prune_embedding("fwd", "w_ptr", "R_PAD")
prune_embedding_bwd = _prune_embedding("bwd", "dy_ptr", "R_BLOCK")


def embedding_deterministic_config(kind: str, elem_bytes: int, r: int, arch: int) -> dict:
    """The fixed configuration deterministic mode launches: the first admitted entry, so the order of
    every sum never depends on what an autotuner picked (the last entry past the checked ranks)."""
    table = _embedding_table(kind)
    c = next((e for e in table if interpreting() or keep_embedding(e, elem_bytes, r, arch)), table[-1])
    meta = {"BLOCK_T": c.BLOCK_T, "BLOCK_D": c.BLOCK_D, "num_warps": c.num_warps, "num_stages": c.num_stages}
    if kind == "fwd":
        meta["SPLIT_D"] = c.SPLIT_D
    return meta
