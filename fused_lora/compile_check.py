"""Compile every kernel, with every configuration we ship, for sm_80 and sm_90a — no GPU needed.

    python -m fused_lora.compile_check            # the table; exit 1 on a compile error or a spill
    python -m fused_lora.compile_check --json F   # also write the rows to F

Each configuration is compiled in the heaviest variant that ``kernels.configs.keep_*`` admits it for
(fp32 adapters with tf32x3 dots, the largest rank bucket it serves, dropout where it may run with it),
with the specialisation a real launch of contiguous tensors gets (unit strides become constants,
pointers and 16-multiples are marked divisible by 16). The PTX is then assembled by the ptxas that
Triton itself uses for that architecture, with Triton's flags (:mod:`fused_lora.nvtools`: which binary
that is changes between Triton versions), and ``ptxas -v`` reports registers and spill bytes; the PTX
tells which MMA instructions were used and whether tiles move by TMA (``cp.async.bulk.tensor``); the
SASS (``nvdisasm``, :mod:`fused_lora.sass`) gives the instructions per main-loop iteration and whether
the kernel is persistent (an output store inside a loop). The run fails when a kernel does not compile,
spills, needs more shared memory than the architecture has, when a GEMM on sm_90a does not use
``wgmma`` or ptxas serialises its wgmma instructions (warnings C7510-C7515; in the memory-bound shrink
and grad passes, whose products are [tile, r] thin, that is reported, not fatal), or
when a TMA-path job has no TMA.
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

from . import nvtools
from .compile_jobs import ARCHS, Job, all_jobs
from .sass import loop_stats

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# A realistic problem: Llama-7B attention projection, 8192 tokens.
SIZES = {"M": 8192, "N": 4096, "K": 4096}


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
    tma: bool = False
    persistent: bool = False
    per_iteration: int = 0  # SASS instructions per main-loop iteration (0: no MMA loop)
    loop_mmas: int = 0
    serial_ok: bool = False  # a memory-bound kernel: serialised wgmma is reported in the note only
    note: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        limit = SMEM_LIMIT[int(self.arch[3:5])]  # what the hardware allows, not our pruning budget
        return (
            not self.error
            and self.spill_bytes == 0
            and 0 <= self.shared <= limit
            and "MISSING" not in self.mma
            and ("serialized" not in self.note or self.serial_ok)
        )


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


def _ptxas(log: str, cubin: bytes) -> tuple[int, int, str, str]:
    """(registers, spill bytes, note, SASS) from ``ptxas -v``'s report and the cubin it wrote."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvtools.nvdisasm().path, "-c", "-g", path], capture_output=True, text=True)
    if sass.returncode:
        raise RuntimeError(f"nvdisasm: {sass.stderr.strip()[-300:]}")
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas report: {log.strip()[-300:]!r}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    warning = re.search(r"\((C751\d)\).*?wgmma.mma_async instructions are serialized", log)
    note = f"wgmma serialized ({warning.group(1)})" if warning else ""
    return int(regs.group(1)), spills, note, sass.stdout


def compile_job(job: Job, arch: int) -> Row:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(job.kernel, job.config, job.variant, f"sm_{arch}{'a' if arch == 90 else ''}", serial_ok=job.serial_ok)
    try:
        kernel = getattr(importlib.import_module(f"fused_lora.kernels.{job.module}"), job.kernel)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        meta = {
            k: (_tl_dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v)
            for k, v in job.meta_for(arch).items()
        }
        sig, constexprs, attrs = _spec(fn, job.args, meta)
        options = {"num_warps": job.num_warps, "num_stages": job.num_stages, **job.options}
        with nvtools.ptxas_report() as report:  # Triton's own ptxas run, with its binary and flags
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=options)  # fmt: skip
        ptx, log, cubin = compiled.asm["ptx"], report.getvalue(), compiled.asm["cubin"]
        if "Used" not in log:  # taken from Triton's cache: assemble again, as Triton does
            log, cubin = nvtools.assemble(ptx, arch, options)
        row.shared = int(compiled.metadata.shared)
        row.registers, row.spill_bytes, row.note, sass_text = _ptxas(log, cubin)
        row.mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        row.tma = "cp.async.bulk.tensor" in ptx
        stats = loop_stats(sass_text)
        row.persistent, row.per_iteration, row.loop_mmas = stats.persistent, stats.per_iteration, stats.mmas
        if job.mma_expected and arch == 90 and row.mma != "wgmma":
            row.mma += " (wgmma MISSING)"
        if job.mma_expected and arch == 80 and row.mma != "mma.sync":
            row.mma += " (mma.sync MISSING)"
        if job.tma and arch == 90 and not row.tma:
            row.mma += " (TMA MISSING)"
    except Exception as e:  # report, never hide: a failed compile is a row with an error
        text = str(e).strip()
        if type(e).__name__ == "PTXASError":  # Triton's message ends with a reproducer command
            text = nvtools.ptxas_message(text)
        row.error = f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}"[:300]
    return row


def _run(args) -> Row:
    return compile_job(*args)


def run_all(workers: int, only: str = "") -> list[Row]:
    tasks = [(job, arch) for job in all_jobs(SIZES) for arch in job.archs if only in job.kernel + " " + job.config]
    if workers <= 1:
        return [compile_job(*t) for t in tasks]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, tasks))


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "config", "variant", "arch", "regs", "spills", "smem", "mma", "tma", "persist", "instr/iter",
            "status")  # fmt: skip
    lines = [head]
    for r in rows:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "FAIL")
        if r.note:
            status += f" ({r.note})"
        per_iter = f"{r.per_iteration} ({r.loop_mmas} mma)" if r.loop_mmas else "-"
        cells = (r.kernel, r.config, r.variant, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared), r.mma)
        lines.append((*cells, "yes" if r.tma else "-", "yes" if r.persistent else "-", per_iter, status))
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
    print(nvtools.describe(ARCHS))
    if ns.json:
        import triton

        with open(ns.json, "w") as f:
            json.dump([dataclasses.asdict(r) | {"ok": r.ok, "triton": triton.__version__} for r in rows], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
