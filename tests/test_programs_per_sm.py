"""A GEMM configuration with two persistent programs per SM (kernels.configs: programs_per_sm): the grid
and the kernel's NUM_PROGRAMS stride follow the configuration (twice the SMs), every tile is still
computed exactly once, and the output equals the one-per-SM configuration's bit for bit."""

from __future__ import annotations

import importlib

import torch

from fused_lora.kernels import configs, tuning

gemm_module = importlib.import_module("fused_lora.kernels.lora_gemm")


def test_two_per_sm_doubles_the_persistent_grid_and_computes_the_same(monkeypatch):
    one = configs.GEMM_INTERPRET[0]
    two = one._replace(programs_per_sm=2)
    launches = []
    real = gemm_module.launch

    def spy(kernel, grid, *args, **kw):
        launches.append((grid, kw["NUM_PROGRAMS"]))
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(gemm_module, "launch", spy)
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 150, 40, 70, 24  # 5 x 3 tiles of 32 x 32: more tiles than 2 x 3 interpreter "SMs"
    p, q = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    l, rr, bias = torch.randn(M, r, generator=g), torch.randn(r, N, generator=g), torch.randn(N, generator=g)
    outs = {}
    for c in (one, two):
        monkeypatch.setattr(gemm_module, "gemm_table", lambda c=c: [c])
        with tuning.force("gemm", configs.name(c)):
            outs[c.programs_per_sm] = gemm_module.lora_gemm(p, q, l, rr, bias=bias)
    programs = gemm_module.num_programs(p.device)
    assert [n for _, n in launches] == [programs, 2 * programs], launches
    assert [grid for grid, _ in launches] == [(programs,), (2 * programs,)], launches
    assert torch.equal(outs[1], outs[2])
    want = p.double() @ q.double() + l.double() @ rr.double() + bias.double()
    torch.testing.assert_close(outs[2].double(), want, rtol=1e-4, atol=1e-4)
