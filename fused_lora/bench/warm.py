"""Compile every kernel configuration the tuner will time for a linear benchmark case, in parallel
processes, before the benchmark runs (a CUDA GPU is needed):

    python -m fused_lora.bench.warm [--tokens 8192] [--shapes attn-7b] [--ranks 16] [--dropout 0,0.1]
                                    [--dtype bf16] [--adapter-dtype fp32] [--workers 11]

Why: on a fresh machine the tuner (fused_lora/kernels/tuning.py) times each admitted configuration of each table
on the first call of a problem, and Triton compiles each of them then, one after another. At the
reference shape (bf16, fp32 adapters, r = 16, Hopper) that is about 77 compiles — forward GEMM 11, dX
GEMM 11 (p = 0) and 8 (with dropout), shrink 11 + 11, grad pass 8 + 8, the hybrid's low-rank term 3 + 3
+ 3 — each one to a few seconds. Compiled here in parallel, they land in Triton's on-disk cache, which
the benchmark's process then reads instead of compiling.

How: worker i, a process of its own, rotates every configuration table (gemm, shrink, grad, low_rank) so
that the table's i-th entry (i modulo its length) comes first, and runs with FUSED_LORA_AUTOTUNE=0, under
which every choice is the first entry a variant admits — in every thread: autograd runs a CUDA backward on
a thread of its own, where a ``tuning.force`` block set in the caller's would not be seen. It then runs the
layer's forward and backward once with each implementation (fused, hybrid) and each dropout: every launch
compiles its configuration. Nothing is timed and no choice is cached: the benchmark still tunes, on
cached binaries. The same binaries serve
other shapes of the same dtypes, rank bucket and dropout (M, N and K are run-time arguments: Triton
specialises only on their divisibility by 16), e.g. the decoder case's projections.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

TABLES = ("gemm", "shrink", "grad", "low_rank")


def table_names() -> dict[str, list[str]]:
    """Every configuration name of each tuning table, in the tables' shipped order."""
    from fused_lora.kernels import configs

    return {t: [configs.name(c) for c in entries] for t, entries in _tables().items()}


def workers_needed() -> int:
    return max(len(v) for v in table_names().values())


def _tables() -> dict[str, list]:
    """The list objects the kernels read their configurations from (the interpreter's when it runs)."""
    from fused_lora.kernels import configs

    return {"gemm": configs.gemm_table(), "shrink": configs.shrink_table(), "grad": configs.grad_table(),
            "low_rank": configs.gemm_table(low_rank=True)}  # fmt: skip


def forced(index: int) -> dict[str, str]:
    """The configuration worker `index` puts first in each table."""
    return {t: names[index % len(names)] for t, names in table_names().items()}


@contextlib.contextmanager
def rotated(index: int) -> Iterator[dict[str, str]]:
    """Inside: every table starts at its entry `index` (modulo its length), in place, for every thread;
    with FUSED_LORA_AUTOTUNE=0 that entry is what each variant admitting it launches. Restored after."""
    tables, first = _tables(), forced(index)
    saved = {t: list(entries) for t, entries in tables.items()}
    try:
        for entries in tables.values():
            k = index % len(entries)
            entries[:] = entries[k:] + entries[:k]
        yield first
    finally:
        for t, entries in tables.items():
            entries[:] = saved[t]


def cases(ns: argparse.Namespace, device: str = "cuda") -> list:
    """The linear benchmark cases the flags name (the same as ``python -m fused_lora.bench``'s)."""
    import torch

    from .providers import SHAPES, Case

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype, adapter = dtypes[ns.dtype], dtypes[ns.adapter_dtype]
    return [Case(shape, M, *SHAPES[shape], r, dtype, adapter, p, device)
            for shape in ns.shapes for M in ns.tokens for r in ns.ranks for p in ns.dropout]  # fmt: skip


def run_worker(index: int, cases: list) -> dict[str, str]:
    """Forward + backward of every case with each implementation (the fused GEMM, TMA where it can; the
    hybrid), every table rotated to worker `index`'s entry; returns the entries put first. Needs
    FUSED_LORA_AUTOTUNE=0 (else the tuner times every candidate: what this avoids)."""
    import torch

    from fused_lora.kernels import tuning

    from .providers import build, make_weights

    if tuning.autotune_enabled():
        raise RuntimeError("run_worker needs FUSED_LORA_AUTOTUNE=0 (with tuning on it would time every candidate)")
    with rotated(index) as first:
        for case in cases:
            w = make_weights(case)
            for provider in ("fused-tma", "hybrid"):
                build(provider, case, w).fwdbwd()
        if any(c.device == "cuda" for c in cases):
            torch.cuda.synchronize()
    return first


def _flags(ns: argparse.Namespace) -> list[str]:
    join = lambda vs: ",".join(str(v) for v in vs)
    return ["--tokens", join(ns.tokens), "--shapes", join(ns.shapes), "--ranks", join(ns.ranks), "--dropout",
            join(ns.dropout), "--dtype", ns.dtype, "--adapter-dtype", ns.adapter_dtype]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    import math

    from .options import DTYPES, names, numbers, positive_int
    from .providers import SHAPES

    ap = argparse.ArgumentParser(prog="python -m fused_lora.bench.warm", description=__doc__.splitlines()[0])
    add = ap.add_argument
    add("--tokens", type=numbers("token count", int, lambda v: v >= 1, "integers >= 1"), default=[8192])
    add("--shapes", type=names("shape", list(SHAPES)), default=["attn-7b"])
    add("--ranks", type=numbers("rank", int, lambda v: v >= 1, "integers >= 1"), default=[16])
    add("--dropout", type=numbers("dropout", float, lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
        default=[0.0, 0.1])  # fmt: skip
    add("--dtype", default="bf16", choices=DTYPES)
    add("--adapter-dtype", default="fp32", choices=DTYPES)
    add("--workers", type=positive_int, default=None, help="parallel processes (default: the longest table's length)")
    add("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one worker, in its own process
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = parser().parse_args(argv)
    if ns.worker is not None:
        os.environ["FUSED_LORA_AUTOTUNE"] = "0"  # every choice: the first admitted entry (rotated), untimed
        os.environ["FUSED_LORA_CACHE_DIR"] = "off"  # and nothing written to the choices file
        chosen = run_worker(ns.worker, cases(ns))
        print(f"worker {ns.worker}: compiled " + ", ".join(f"{t} {n}" for t, n in chosen.items()), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("fused_lora.bench.warm: no CUDA GPU visible: nothing to compile for", file=sys.stderr)
        return 2
    n = ns.workers or workers_needed()
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "fused_lora.bench.warm", *_flags(ns), "--worker", str(i)])
             for i in range(n)]  # fmt: skip
    codes = [p.wait() for p in procs]
    failed = [i for i, c in enumerate(codes) if c]
    print(f"warm: {n} workers, {time.time() - start:.0f} s, " + (f"FAILED: {failed}" if failed else "all ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
