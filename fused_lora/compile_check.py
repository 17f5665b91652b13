"""Compile every kernel, with every autotune configuration we ship, for sm_80 and sm_90a — no GPU needed.

    python -m fused_lora.compile_check            # the table; exit 1 on a compile error or a spill
    python -m fused_lora.compile_check --json F   # also write the rows to F

Each configuration is compiled in the heaviest variant that ``kernels.configs.keep_*`` admits it for
(fp32 adapters with tf32x3 dots, the largest rank bucket it serves, dropout where it may run with it),
with the specialisation a real launch of contiguous tensors gets (unit strides become constants,
pointers and 16-multiples are marked divisible by 16). Triton's bundled ``ptxas -v`` then reports
registers and spill bytes; the PTX tells which MMA instructions were used. The run fails when a kernel
does not compile, spills, needs more shared memory than the architecture has, or when a GEMM on sm_90a
does not use ``wgmma``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# A realistic problem: Llama-7B attention projection, 8192 tokens.
SIZES = {"M": 8192, "N": 4096, "K": 4096}


@dataclasses.dataclass
class Job:
    kernel: str  # module-level name in fused_lora.kernels.<module>
    module: str
    config: str
    variant: str
    args: dict  # arg name -> "*bf16" / "i32" / "fp32" / int (1 becomes a constant) / constexpr value
    meta: dict  # constexpr meta-parameters
    num_warps: int
    num_stages: int
    mma_expected: bool
    archs: tuple[int, ...] = ARCHS  # where kernels.configs admits this configuration


@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    variant: str
    arch: str
    registers: int = -1
    spill_bytes: int = -1
    shared: int = -1
    mma: str = "-"
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        limit = SMEM_LIMIT[int(self.arch[3:5])]  # what the hardware allows, not our pruning budget
        return not self.error and self.spill_bytes == 0 and 0 <= self.shared <= limit and ("MISSING" not in self.mma)


def _tl_dtype(name: str):
    import triton.language as tl

    return {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[name]


def _ptr(dtype: str) -> str:
    return "*" + dtype


def _spec(fn, args: dict, meta: dict):
    """signature, constexprs and attrs as Triton's JIT would build them for these argument values."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = meta[name] if name in meta else args[name]
        if name in meta:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, int) and not isinstance(v, bool):
            if v == 1:
                signature[name], constexprs[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if v % 16 == 0 and name not in fn.do_not_specialize:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = v
            if v.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _ptxas(ptx: str, arch: int) -> tuple[int, int, str]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True
        )
    log = out.stdout + out.stderr
    if out.returncode:
        raise RuntimeError(log[-400:])
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    note = "wgmma serialized (registers)" if "wgmma.mma_async instructions are serialized" in log else ""
    return regs, spills, note


def compile_job(job: Job, arch: int) -> Row:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(job.kernel, job.config, job.variant, f"sm_{arch}{'a' if arch == 90 else ''}")
    try:
        kernel = getattr(importlib.import_module(f"fused_lora.kernels.{job.module}"), job.kernel)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        meta = {k: (_tl_dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v) for k, v in job.meta.items()}
        sig, constexprs, attrs = _spec(fn, job.args, meta)
        compiled = triton.compile(
            ASTSource(fn, sig, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages},
        )
        ptx = compiled.asm["ptx"]
        row.shared = int(compiled.metadata.shared)
        row.registers, row.spill_bytes, row.note = _ptxas(ptx, arch)
        row.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        if job.mma_expected and arch == 90 and row.mma != "wgmma":
            row.mma += " (wgmma MISSING)"
    except Exception as e:  # report, never hide: a failed compile is a row with an error
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return row


def _run(args) -> Row:
    return compile_job(*args)


def run_all(workers: int, only: str = "") -> list[Row]:
    from .compile_jobs import all_jobs

    tasks = [(job, arch) for job in all_jobs(SIZES) for arch in job.archs if only in job.kernel + " " + job.config]
    if workers <= 1:
        return [compile_job(*t) for t in tasks]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, tasks))


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "config", "variant", "arch", "regs", "spills", "smem", "mma", "status")
    lines = [head]
    for r in rows:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "FAIL")
        if r.note:
            status += f" ({r.note})"
        lines.append(
            (r.kernel, r.config, r.variant, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared), r.mma, status)
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="only jobs whose kernel name or config contains this")
    ns = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    rows = run_all(ns.workers, ns.only or "")
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    kernels = sorted({r.kernel for r in rows})
    print(
        f"\n{len(rows)} compiles ({len(kernels)} kernels x configs x {len(ARCHS)} archs): "
        f"{len(rows) - len(bad)} ok, {len(bad)} failed; "
        f"max registers {max(r.registers for r in rows)}, total spill bytes "
        f"{sum(max(r.spill_bytes, 0) for r in rows)}"
    )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ok": r.ok} for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
