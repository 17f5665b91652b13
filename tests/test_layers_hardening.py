"""Issue 15: the hybrid's fp16 overflow."""

from __future__ import annotations

import pytest
import torch

import fused_lora
from fused_lora import reference

# --- item 7: the hybrid agrees with the fused GEMM where an fp16 low-rank term exceeds fp16's range ---


def _cancelling_fp16(lora_dtype):
    """x·Wᵀ ≈ -60000 and the low-rank term ≈ +70400 (beyond fp16's 65504) cancel to y ≈ 10400; in the
    backward dY·W ≈ -58500 and T = mask⊙(g·A) ≈ +68640 cancel to dX ≈ 10000. All values representable."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 5, 32, 24, 2
    x = (1 + torch.randint(-8, 9, (M, K), generator=g) / 64).half()
    w = (-1875 + torch.randint(-2, 3, (N, K), generator=g)).half()
    a = torch.ones(r, K).to(lora_dtype)
    b = torch.full((N, r), 1100.0).to(lora_dtype)
    dy = torch.full((M, N), 1.3).half()
    return x, w, a, b, dy


@pytest.mark.parametrize("lora_dtype", [torch.float16, torch.float32], ids=["fp16-adapters", "fp32-adapters"])
def test_hybrid_and_fused_agree_where_the_fp16_term_overflows(lora_dtype, device):
    x, w, a, b, dy = (t.to(device) for t in _cancelling_fp16(lora_dtype))
    y64 = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), 1.0)
    dx64 = dy.double() @ w.double() + (dy.double() @ b.double()) @ a.double()
    out = {}
    for impl in ("fused", "hybrid"):
        xx = x.clone().requires_grad_()
        with fused_lora.use_impl(impl):
            y = fused_lora.lora_linear(xx, w, a, b, 1.0)
            y.backward(dy)
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all(), f"{impl}: inf where the answer is finite"
        out[impl] = (y.double(), xx.grad.double())
    # both are within fp16-level rounding of the large terms (the products are TF32 / fp16 operands)
    for (y, dx), name in zip(out.values(), out):
        assert (y - y64).abs().max() <= 4 * 2**-10 * 70400, name
        assert (dx - dx64).abs().max() <= 4 * 2**-10 * 68640, name
    (yf, dxf), (yh, dxh) = out["fused"], out["hybrid"]
    ulp = lambda t: 2.0 ** torch.floor(torch.log2(t.abs().clamp_min(2**-14))) * 2**-10
    assert ((yf - yh).abs() <= 2 * ulp(yf)).all() and ((dxf - dxh).abs() <= 2 * ulp(dxf)).all()
