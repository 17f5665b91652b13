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
    return json.loads(out.read_text()), proc.returncode


@pytest.mark.compile
def test_every_config_compiles_without_spills(rows):
    rows, returncode = rows
    bad = [r for r in rows if not r["ok"]]
    assert returncode == 0 and not bad, "\n".join(
        f"{r['kernel']} {r['config']} {r['variant']} {r['arch']}: regs {r['registers']} spills "
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
