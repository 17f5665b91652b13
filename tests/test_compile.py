"""Every kernel, with every shipped configuration, compiles for sm_80 and sm_90a with Triton's own
compiler and no GPU; ptxas reports no spills and no serialised wgmma; the fused GEMM's Hopper path loads
through TMA, runs wgmma, is persistent and keeps its main loop short; its Ampere path runs mma.sync.

Runs ``python -m fused_lora.compile_check`` in a subprocess: the interpreter (TRITON_INTERPRET=1, set
for the other tests) would hand it interpreted functions instead of compilable ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fused_lora.kernels import configs

# SASS instructions per main-loop iteration of the TMA GEMM with 16-bit operands: 63-83 nested and 78-106
# in one loop across tiles (its K step also advances the tile walk) under triton 3.6, up to 123 under 3.8
# (128x64, 8 wgmma a step); the pointer path takes 83-267. A rise past this is a regression to look at.
TMA_LOOP_BUDGET = 130


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path_factory.mktemp("compile") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fused_lora.compile_check", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert out.exists(), proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    # scripts/test.sh runs this file again under a second Triton (PYTHONPATH): make sure it is that one
    expected = os.environ.get("FUSED_LORA_EXPECT_TRITON")
    assert not expected or {r["triton"] for r in rows} == {expected}, (expected, {r["triton"] for r in rows})
    return rows, proc.returncode


@pytest.mark.compile
def test_every_config_compiles_without_spills(rows):
    rows, returncode = rows
    bad = [r for r in rows if not r["ok"]]
    assert returncode == 0 and not bad, f"{len(bad)} of {len(rows)} compiles failed:\n" + "\n".join(
        f"triton {r['triton']} {r['kernel']} {r['config']} {r['variant']} {r['arch']}: regs {r['registers']} spills "
        f"{r['spill_bytes']} smem {r['shared']} mma {r['mma']} {r['note']} {r['error']}"
        for r in bad
    )
    compiled = {(r["kernel"], r["config"]) for r in rows}
    for kernel, table in (
        ("_lora_gemm_kernel", configs.GEMM),
        ("_low_rank_kernel", configs.LOW_RANK),
        ("_shrink_kernel", configs.SHRINK),
        ("_lora_grad_kernel", configs.GRAD),
        ("_dequant4bit_kernel", configs.DEQUANT),
    ):
        assert len({c for c in compiled if c[0] == kernel}) == len(table), kernel


@pytest.mark.compile
def test_fused_gemm_is_a_hopper_gemm(rows):
    rows, _ = rows
    gemm = [r for r in rows if r["kernel"] == "_lora_gemm_kernel"]
    tma = [r for r in gemm if ", TMA, r" in r["variant"]]
    assert tma and all(r["arch"] == "sm_90a" for r in tma)
    for r in tma:
        assert r["tma"] and r["mma"] == "wgmma" and r["persistent"], r
        if "fp32 (tf32x3)" not in r["variant"]:
            assert 0 < r["per_iteration"] <= TMA_LOOP_BUDGET, r
    for r in gemm:
        assert r["persistent"], r
        assert r["mma"] == ("wgmma" if r["arch"] == "sm_90a" else "mma.sync"), r
    # every variant has a TMA configuration on sm_90a and a pointer one on sm_80
    for label in ("y+bias, bf16 x/W, fp32 A/B", "dX+dropout, bf16, fp32 A/B", "y+bias, fp32", "dX+dropout, fp32"):
        assert any(r["variant"].startswith(label) for r in tma), label
        assert any(r["variant"].startswith(label) and r["arch"] == "sm_80" for r in gemm), label


@pytest.mark.compile
def test_hopper_gemm_is_one_pipeline_across_tiles(rows):
    """Ranks up to 16 on the Hopper path: the tile walk and the K loop compile to one loop (the TTGIR's
    deepest MMA sits in one scf.for), except where kernels.configs.rank_slices keeps them nested (the
    fp32-adapter forward, LoRA's and DoRA's, under triton >= 3.7); larger ranks keep the runtime rank walk,
    nested. A regression to the nested form (issue 16: it never compiled) fails here and in Row.ok."""
    import triton

    rows, _ = rows
    tma = [r for r in rows if r["kernel"] == "_lora_gemm_kernel" and ", TMA, r" in r["variant"]]
    newer = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7)
    for r in tma:
        exempt = newer and r["variant"].startswith(("y+bias, bf16 x/W, fp32 A/B", "y·c (DoRA), bf16 x/W, fp32 A/B"))
        want = 1 if r["variant"].endswith("r<=16") and not exempt else 2
        assert r["loop_nest"] == want, r
        assert r["per_tile"] > 0, r
    # two per SM: admitted nested only; DoRA's forward rows repeat LoRA's fp32-adapter one (nested under 3.8)
    one_per_sm = [r for r in tma if not r["config"].endswith(" p2") and not r["variant"].startswith("y·c")]
    assert sum(r["loop_nest"] == 1 for r in one_per_sm) >= len(one_per_sm) // 3


@pytest.mark.compile
def test_smem_admission_follows_the_compiler(rows):
    """keep_gemm admits the Hopper path by fused_lora/kernels/gemm_smem.py: every TMA job's allocation is at most its
    entry (the largest over the Tritons CI checks: triton 3.8 allocates 8 KB more than 3.6 for dX in one
    loop at 128x256, 16 KB more for fp32 at 128x128x32) and within 16 KB of it, so a configuration is
    admitted where the compiler makes it fit — the four-stage 128x256 ones the old formula rejected — and
    never where it does not."""
    from fused_lora.kernels.gemm_smem import SM90

    rows, _ = rows
    for r in rows:
        if r["kernel"] != "_lora_gemm_kernel" or ", TMA, r" not in r["variant"]:
            continue
        key = (r["config"], 4 if "fp32 (tf32x3)" in r["variant"] else 2, r["variant"].startswith("dX"),
               bool(r["one_pipeline"]))  # fmt: skip
        assert key in SM90, f"{key} not in fused_lora/kernels/gemm_smem.py: run python -m fused_lora.compile_check --smem-table"
        assert r["shared"] <= SM90[key], (key, r["shared"], SM90[key])
        if "bf16 x/W/A/B" not in r["variant"]:  # the table's figure is the heavier fp32-adapter variant's
            assert SM90[key] - r["shared"] <= 16 * 1024, (key, r["shared"], SM90[key])
    # the formula admission used (every buffer counted, less an 8 KB margin) refused these: 237,568 B
    old = 4 * (128 + 256) * 64 * 2 + 128 * 16 * 4 + 16 * 256 * 4 + 128 * 64 * 2
    four = [r for r in rows if r["config"] == "128x256x64x8x4 w8 s4" and ", TMA, r" in r["variant"]]
    assert four and old > configs.SMEM_LIMIT[90] - configs.SMEM_MARGIN
    assert all(r["shared"] <= configs.SMEM_LIMIT[90] for r in four)


@pytest.mark.compile
def test_two_programs_per_sm_fit_twice(rows):
    """A configuration with programs_per_sm = 2 (its name ends " p2") is admitted only where two of its
    programs fit on one SM: every such compile holds at most 65,536 / (2 x threads) registers and twice
    its shared memory (with the system's 1 KB per block) within the SM's 228 KB."""
    rows, _ = rows
    two = [r for r in rows if r["config"].endswith(" p2")]
    assert two, "no two-per-SM job compiled"
    for r in two:
        warps = int(r["config"].split(" w")[1].split()[0])
        assert r["registers"] <= configs.REGS_PER_SM // (2 * 32 * warps), r
        assert 2 * (r["shared"] + configs.SMEM_RESERVED) <= configs.SMEM_PER_SM[90], r
        assert r["arch"] == "sm_90a" and r["variant"].startswith(("y+bias", "y·c")) and r["loop_nest"] == 2, r


def test_two_programs_per_sm_admission():
    """Two per SM: the nested 16-bit forward on Hopper, by its measured shared memory; never dX with dropout
    (its epilogue's registers), the one-loop form (122,920 B: twice is over 228 KB), fp32, pointers, Ampere."""
    two = next(c for c in configs.GEMM if c.programs_per_sm == 2)
    assert configs.name(two).endswith(" p2") and configs.launch_kwargs(two).keys() >= {"BLOCK_M", "num_warps"}
    assert "programs_per_sm" not in configs.launch_kwargs(two)
    assert configs.keep_gemm(two, 2, False, 90, True, 4, pipelined=False)
    assert not configs.keep_gemm(two, 2, True, 90, True, 4, pipelined=False)
    assert not configs.keep_gemm(two, 2, False, 90, True, 4, pipelined=True)
    assert not configs.keep_gemm(two, 4, False, 90, True, 4, pipelined=False)
    assert not configs.keep_gemm(two, 2, False, 90, False)
    assert not configs.keep_gemm(two, 2, False, 80, False)
    unmeasured = two._replace(num_stages=2)
    assert not configs.keep_gemm(unmeasured, 2, False, 90, True, 4, pipelined=False)


def test_smem_table_decides_admission():
    """Measured entries are admitted against the hardware limit, estimates against it less a margin; an
    entry over the limit is refused (128x256x64 S2 with four stages, y in one loop: 245,808 B). dX in one
    loop at 128x256 S4 with four stages needed 245,792 B (253,984 under 3.8) while its epilogue drew the
    mask with Philox, and is admitted since it reads the packed keep bits (225,328 B)."""
    four = configs.GemmConfig(128, 256, 64, 8, 4, 8, 4)
    assert configs.smem_measured(four, 2, False, True)
    assert configs.keep_gemm(four, 2, False, 90, True, 4, pipelined=True)  # 229,424 B
    assert configs.keep_gemm(four, 2, True, 90, True, 4, pipelined=False)  # 213,024 B
    assert configs.keep_gemm(four, 2, True, 90, True, 4, pipelined=True)  # 225,328 B
    wide = configs.GemmConfig(128, 256, 64, 8, 2, 8, 4)
    assert configs.smem_measured(wide, 2, False, True)
    assert not configs.keep_gemm(wide, 2, False, 90, True, 4, pipelined=True)  # 245,808 B
    assert configs.gemm_smem(four, 2, 4, True, False, False) == 213024
    unmeasured = configs.GemmConfig(128, 256, 64, 8, 4, 8, 5)
    assert not configs.smem_measured(unmeasured, 2, False, False)
    assert not configs.keep_gemm(unmeasured, 2, False, 90, True)


def test_loop_nest_reads_the_ttgir():
    """compile_check.loop_nest: the scf.for loops around the deepest MMA, regions read from the printed IR."""
    from fused_lora.compile_check import loop_nest

    nested = """scf.for %t = %a to %b step %c : i32 {
      %k = scf.for %i = %a to %n step %c iter_args(%acc = %z) -> (tensor<128x256xf32>) : i32 {
        %d = ttng.warp_group_dot %x, %y, %acc : tensor
        scf.yield %d : tensor
      }
      %e = tt.dot %l, %r, %k : tensor
    } {tt.flatten}"""
    one = """scf.if %kz {
      scf.for %t = %a to %b step %c : i32 {
        %e = tt.dot %l, %r, %z : tensor
      } {tt.flatten}
    } else {
      %17:12 = scf.for %i = %a to %n step %c iter_args(%acc = %z) -> (tensor<128x256xf32>) : i32 {
        %d = ttng.warp_group_dot %x, %y, %acc : tensor
        scf.if %last {
          %e = ttng.warp_group_dot %l, %r, %d : tensor
        }
        scf.yield %d : tensor
      }
    }"""
    assert loop_nest(nested) == 2
    assert loop_nest(one) == 1
    assert loop_nest("%d = tt.dot %a, %b, %c : tensor") == 0


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("tma", [False, True])
def test_every_variant_has_a_config(arch, elem_bytes, tma):
    """The filters never leave a kernel without a configuration: every dtype, path, rank bucket, dropout."""
    for dropout in (False, True):
        assert any(configs.keep_gemm(c, elem_bytes, dropout, arch, tma) for c in configs.GEMM)
        assert any(configs.keep_gemm(c, elem_bytes, dropout, arch, tma) for c in configs.LOW_RANK)
    for r_pad in (16, 32, 64, 128, 256):
        assert any(configs.keep_shrink(c, elem_bytes, r_pad, arch) for c in configs.SHRINK), r_pad
        r_block = configs.grad_r_block(r_pad, elem_bytes)
        assert any(configs.keep_grad(c, elem_bytes, r_block, arch) for c in configs.GRAD), r_pad


def test_ranks_past_the_checked_buckets_still_get_a_config():
    """r > 256 is allowed: it runs the smallest entry (correct; compile_check does not cover it)."""
    assert configs.admitted(configs.SHRINK, configs.keep_shrink, 2, 512, 90) == configs.SHRINK[-1:]
    for kind, r in (("shrink", 512), ("grad", 128)):
        assert configs.deterministic_entry(kind, 2, r, 90)
    assert configs.deterministic_entry("gemm", 4, 16, 80, dropout=True)


PTXAS_PROBE = r"""
import json, os
import triton
import triton.backends.nvidia.compiler as nv
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_lora import compile_check, nvtools
from fused_lora.compile_jobs import all_jobs

# Triton 3.9's rule (sm_90 and up on ptxas-blackwell), whatever Triton is installed; its PTX .version then
# follows that binary's CUDA release, which the older bin/ptxas refuses when the releases differ.
nv.get_ptxas = lambda arch: knobs.nvidia.ptxas if arch < 90 else knobs.nvidia.ptxas_blackwell
out = {"chosen": {a: os.path.basename(nvtools.ptxas(a).path) for a in (80, 90)}}
job = next(j for j in all_jobs(compile_check.SIZES) if j.kernel == "_dropout_mask_kernel")
row = compile_check.compile_job(job, 90)
out["row"] = {"ok": row.ok, "error": row.error, "registers": row.registers}
# Fallbacks for a Triton that renames both: bundled binaries, oldest first, the first that takes the PTX
kernel = __import__("fused_lora.kernels." + job.module, fromlist=["x"])
fn = getattr(kernel, job.kernel)
fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
meta = {k: compile_check._tl_dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
        for k, v in job.meta_for(90).items()}
sig, constexprs, attrs = compile_check._spec(fn, job.args, meta)
options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
src = ASTSource(fn, sig, constexprs, attrs)
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
def gone(*a):
    raise AttributeError("no make_cubin")
nvtools._triton_make_cubin = gone
del nv.get_ptxas
log, cubin = nvtools.assemble(ptx, 90, options)
out["fallback"] = {"ptxas": nvtools.ptxas(90), "registers_reported": "Used" in log, "cubin": len(cubin) > 0}
out["describe"] = nvtools.describe((80, 90))
print(json.dumps(out))
"""


def test_compile_check_assembles_with_the_ptxas_triton_uses():
    """Triton 3.9 assembles sm_90a with bin/ptxas-blackwell and emits PTX only that binary takes; compile_check
    called bin/ptxas by path, and all of 3.9's sm_90a compiles failed ("Unsupported .version 9.4"). Here
    Triton's choice is mocked to 3.9's rule on whatever Triton is installed: the check follows it; and with
    Triton's lookup and assembly step both gone, the bundled binaries are tried oldest first."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas-blackwell").exists():
        pytest.skip("this Triton bundles no ptxas-blackwell")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PTXAS_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["chosen"] == {"80": "ptxas", "90": "ptxas-blackwell"}
    assert out["row"]["ok"] and out["row"]["registers"] > 0, out["row"]
    assert out["fallback"] == {"ptxas": None, "registers_reported": True, "cubin": True}
    assert "sm_90a: Triton names no ptxas" in out["describe"], out["describe"]
