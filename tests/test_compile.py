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

# SASS instructions per main-loop iteration of the TMA GEMM with 16-bit operands: 63-83 when written
# (triton 3.6; the pointer path takes 83-267). A rise past this is a regression to look at.
TMA_LOOP_BUDGET = 110


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
    tma = [r for r in gemm if r["variant"].endswith("TMA")]
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
