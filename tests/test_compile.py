"""Every kernel, with every shipped autotune configuration, compiles for sm_80 and sm_90a with Triton's
own compiler and no GPU; ptxas reports no spills; the GEMM uses wgmma on sm_90a.

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


@pytest.mark.compile
def test_every_config_compiles_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fused_lora.compile_check", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    rows = json.loads(out.read_text())
    bad = [r for r in rows if not r["ok"]]
    assert proc.returncode == 0 and not bad, "\n".join(
        f"{r['kernel']} {r['config']} {r['variant']} {r['arch']}: regs {r['registers']} spills "
        f"{r['spill_bytes']} smem {r['shared']} mma {r['mma']} {r['error']}"
        for r in bad
    )
    gemm90 = [r for r in rows if r["kernel"] == "_lora_gemm_kernel" and r["arch"] == "sm_90a"]
    assert gemm90 and all(r["mma"] == "wgmma" for r in gemm90)
    compiled = {(r["kernel"], r["config"]) for r in rows}
    assert len({c for c in compiled if c[0] == "_lora_gemm_kernel"}) == len(configs.GEMM)
    assert len({c for c in compiled if c[0] == "_shrink_kernel"}) == len(configs.SHRINK)
    assert len({c for c in compiled if c[0] == "_lora_grad_kernel"}) == len(configs.GRAD)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_every_variant_has_a_config(arch, elem_bytes):
    """The filters never leave a kernel without a configuration: every dtype, rank bucket, dropout."""
    for dropout in (False, True):
        assert any(configs.keep_gemm(c, elem_bytes, dropout, arch) for c in configs.GEMM)
    for r_pad in (16, 32, 64, 128, 256):
        assert any(configs.keep_shrink(c, elem_bytes, r_pad, arch) for c in configs.SHRINK), r_pad
        r_block = configs.grad_r_block(r_pad, elem_bytes)
        assert any(configs.keep_grad(c, elem_bytes, r_block, arch) for c in configs.GRAD), r_pad
        for kind, r in (("shrink", r_pad), ("grad", r_block)):
            assert configs.deterministic_entry(kind, elem_bytes, r, arch)


def test_ranks_past_the_checked_buckets_still_get_a_config():
    """r > 256 is allowed: it runs the smallest entry (correct; compile_check does not cover it)."""
    for kind, r in (("shrink", 512), ("grad", 128)):
        assert configs.deterministic_entry(kind, 2, r, 90)
    assert configs.deterministic_entry("gemm", 4, 16, 80, dropout=True)
