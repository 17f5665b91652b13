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
    per_tile: int = 0  # persistent: SASS instructions per output tile outside the K loop
    loop_nest: int = 0  # TTGIR: scf.for loops around the deepest MMA (1: the tile walk and K loop are one)
    one_pipeline: bool = False  # the job must compile to one loop (loop_nest 1) on this arch
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
            and (not self.one_pipeline or self.loop_nest == 1)
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


def loop_nest(ttgir: str) -> int:
    """The most ``scf.for`` loops around any MMA (``tt.dot`` / ``ttng.warp_group_dot``) in the TTGIR: 2 for
    a persistent loop whose K loop stayed inside it, 1 when Triton fused the nest into one loop (0: no
    MMA in a loop). Regions are read from the printed IR: a line ending in "{" opens one, a line starting
    with "}" closes one (``} else {`` does both)."""
    stack: list[bool] = []  # True: an scf.for region
    deepest = 0
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            if stack:
                stack.pop()
            if text.endswith("{"):
                stack.append(False)
            continue
        if re.search(r"\b(ttng\.warp_group_dot|tt\.dot)\b", text):
            deepest = max(deepest, sum(stack))
        if text.endswith("{"):
            stack.append(bool(re.search(r"\bscf\.for\b", text)))
    return deepest


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

    row = Row(job.kernel, job.config, job.variant, f"sm_{arch}{'a' if arch == 90 else ''}", serial_ok=job.serial_ok,
              one_pipeline=job.one_pipeline and arch == 90)
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
        stats = loop_stats(sass_text, tiles=job.module in ("lora_gemm", "low_rank"))
        row.persistent, row.per_iteration, row.loop_mmas = stats.persistent, stats.per_iteration, stats.mmas
        row.per_tile, row.loop_nest = stats.per_tile, loop_nest(compiled.asm["ttgir"])
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
    head = ("kernel", "config", "variant", "arch", "regs", "spills", "smem", "mma", "tma", "persist", "loops",
            "instr/iter", "instr/tile", "status")  # fmt: skip
    lines = [head]
    for r in rows:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else "FAIL")
        if r.note:
            status += f" ({r.note})"
        per_iter = f"{r.per_iteration} ({r.loop_mmas} mma)" if r.loop_mmas else "-"
        nest = {0: "-", 1: "one"}.get(r.loop_nest, "nested")
        cells = (r.kernel, r.config, r.variant, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared), r.mma)
        per_tile = str(r.per_tile) if r.persistent else "-"
        lines.append((*cells, "yes" if r.tma else "-", "yes" if r.persistent else "-", nest, per_iter, per_tile,
                      status))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def smem_key(job: Job) -> tuple[str, int, bool, bool]:
    """A TMA GEMM job's key in kernels.gemm_smem.SM90: (config, activation bytes, dropout, one loop)."""
    return job.config, 4 if job.args["p_ptr"] == "*fp32" else 2, job.meta["DROPOUT"], job.meta["R_SLICES"] > 0


def write_smem_table(workers: int) -> int:
    """Compile every GEMM configuration's TMA variants for sm_90a, shared memory aside, and write the
    largest allocation per key to fused_lora/kernels/gemm_smem.py (what keep_gemm admits by), merged with the entries
    already there: run it under each Triton CI checks (3.6 and 3.8) and the table holds the largest."""
    import triton

    from .compile_jobs import gemm_jobs

    jobs = [j for j in gemm_jobs(SIZES, measure_smem=True) if 90 in j.archs]
    with concurrent.futures.ProcessPoolExecutor(max(workers, 1)) as pool:
        rows = list(pool.map(_run, [(j, 90) for j in jobs]))
    from fused_lora.kernels.gemm_smem import SM90

    table: dict[tuple, int] = {k: v for k, v in SM90.items() if k in {smem_key(j) for j in jobs}}
    for job, row in zip(jobs, rows):
        if row.error:
            print(f"{job.config} {job.variant}: {row.error}", file=sys.stderr)
            return 1
        table[smem_key(job)] = max(table.get(smem_key(job), 0), row.shared)
    path = os.path.join(os.path.dirname(__file__), "kernels", "gemm_smem.py")
    lines = [
        '"""Shared memory (bytes) the fused GEMM\'s Hopper (TMA) path allocates, as the compiler allocated it for',
        "sm_90a: {(config name, activation bytes, dropout, one loop across tiles): bytes}, the largest over the",
        "adapter dtypes (fp32 adapters are the heaviest) and over the Tritons it was written under (each run of",
        "`python -m fused_lora.compile_check --smem-table` keeps the larger of its figure and the one here; last",
        f"run: triton {triton.__version__}). tests/test_compile.py checks every compiled TMA job against it.",
        "kernels.configs.keep_gemm admits a configuration by these figures against the hardware limit.",
        '"""',
        "",
        "# fmt: off",
        "SM90 = {",
    ]
    lines += [f"    {k!r}: {v}," for k, v in sorted(table.items())]
    lines += ["}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {len(table)} entries to {os.path.normpath(path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", help="only jobs whose kernel name or config contains this")
    ap.add_argument("--smem-table", action="store_true",
                    help="measure the fused GEMM's shared memory on sm_90a and rewrite fused_lora/kernels/gemm_smem.py")
    ns = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    if ns.smem_table:
        return write_smem_table(ns.workers)
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
