"""The fused GEMM's two rank walks on the Hopper (TMA) path: unrolled at compile time for ranks up to
16 (R_SLICES = 1: the persistent loop holds one loop, which Triton fuses with the K loop into one
pipeline across tiles) and a runtime loop above (nested). Both must give the fp64 answer, with and
without dropout and bias, and the same mask; the pointer path and grouped adapters keep the runtime
walk. Under the interpreter the TMA descriptors run for real (shapes here are 16-byte aligned)."""

from __future__ import annotations

import importlib

import pytest
import torch

from fused_lora.kernels import configs, dropout_mask, tuning

gemm_module = importlib.import_module(configs.__name__.rsplit(".", 1)[0] + ".lora_gemm")
lora_gemm = gemm_module.lora_gemm


@pytest.fixture
def slices_seen(monkeypatch):
    """Every R_SLICES the launcher chose, in order."""
    seen: list[int] = []
    real = gemm_module.rank_slices

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(gemm_module, "rank_slices", spy)
    return seen


def _operands(M, K, N, r, dtype, device, lora_dtype=torch.float32):
    g = torch.Generator().manual_seed(M * 1000 + r)
    p = torch.randn(M, K, generator=g).to(dtype).to(device)
    q = (torch.randn(K, N, generator=g) / K**0.5).to(dtype).to(device)
    l = torch.randn(M, r, generator=g).to(device)
    rr = (torch.randn(r, N, generator=g) / 4).to(lora_dtype).to(device)
    bias = torch.randn(N, generator=g).to(dtype).to(device)
    return p, q, l, rr, bias


def _reference(p, q, l, r, bias, keep):
    low = l.double() @ r.double()
    if keep is not None:
        low = low * keep.double()
    out = p.double() @ q.double() + low
    return out + bias.double() if bias is not None else out


@pytest.mark.parametrize("r", [1, 5, 16, 24, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_both_rank_walks_match_fp64(r, dtype, dropout_p, slices_seen, device):
    """out = p·q + mask ⊙ (l·r) + bias: y (bias, no mask) and dX (mask, no bias) on the TMA path, the
    unrolled walk for r <= 16 and the runtime walk above, against fp64; fp16 and fp32 operands."""
    M, K, N = 70, 48, 40  # 16-byte aligned rows for fp16 and fp32: TMA-addressable
    p, q, l, rr, bias = _operands(M, K, N, r, dtype, device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    dx = dropout_p > 0
    with tuning.force("gemm_path", "tma"):
        out = lora_gemm(p, q, l, rr, bias=None if dx else bias, dropout_p=dropout_p, seed=seed if dx else None)
    keep = dropout_mask(seed, M, N, dropout_p) if dx else None
    want = _reference(p, q, l, rr, None if dx else bias, keep)
    same_dtype = (p.double() @ q.double()).to(dtype).double() - p.double() @ q.double()
    tol = 8 * same_dtype.abs().max().item() + 1e-5 * want.abs().max().item() + 1e-6
    err = (out.double() - want).abs()
    assert err.max().item() <= tol, f"r={r}: max error {err.max().item():.3g} at {divmod(err.argmax().item(), N)}"
    assert slices_seen and slices_seen[-1] == (1 if r <= 16 else 0), slices_seen


def test_unrolled_and_runtime_walks_agree_bit_for_bit(monkeypatch, device):
    """For r <= 16 both walks are one rank slice: the unrolled kernel must give exactly the runtime one's
    output, dropout mask included (the mask is a function of (seed, m, k) only)."""
    p, q, l, rr, _ = _operands(45, 32, 64, 13, torch.float32, device)
    seed = torch.tensor([77], dtype=torch.int64, device=device)
    with tuning.force("gemm_path", "tma"):
        unrolled = lora_gemm(p, q, l, rr, dropout_p=0.25, seed=seed)
        monkeypatch.setattr(gemm_module, "rank_slices", lambda *a, **k: 0)
        runtime = lora_gemm(p, q, l, rr, dropout_p=0.25, seed=seed)
    assert torch.equal(unrolled, runtime)


def test_pointer_path_and_groups_keep_the_runtime_walk():
    assert configs.rank_slices(16, tma=False, grouped=False) == 0
    assert configs.rank_slices(16, tma=True, grouped=True) == 0
    assert configs.rank_slices(32, tma=True, grouped=False) == 0
    assert configs.rank_slices(16, tma=True, grouped=False, lora_mode=0) == 1
    assert configs.rank_slices(16, tma=True, grouped=False, lora_mode=2) == 1
