"""BF16X3 (kernels/precision.py): bf16 activations with fp32 adapters multiply the one fp32 operand as
three bf16 parts against the bf16 operand as it is. The kept fp32 products — xa (shrink), g, dA, dB (grad
pass, whole and split) — match the fp64 reference by the parity rule against plain fp32 torch, which a
two-part split or a bf16-rounded adapter would not. Under Triton's interpreter these run inside
``exact_bf16_dot`` (the interpreter's own bf16 dot multiplies raw bits, triton#11584); outside it bf16
is still refused."""

from __future__ import annotations

import sys

import pytest
import torch

import fused_lora
from fused_lora.backend import bf16_dot_wrong, exact_bf16_dot, interpreting
from fused_lora.kernels import configs, lora_grad, shrink, tuning
from fused_lora.kernels.dropout import dropout_mask, effective_dropout_p
from fused_lora.kernels.precision import BF16X3, TF32X3, lora_mode, native_16bit
from fused_lora.kernels.utils import rank_pad

from helpers import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def exact_dot():
    fused_lora.set_backend("triton")
    with exact_bf16_dot():
        yield
    fused_lora.set_backend(None)


def test_modes():
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    assert native_16bit(bf, f32)[0] == int(BF16X3)  # x·Aᵀ, dY·B
    assert lora_mode(bf, f32, kept=True)[0] == int(BF16X3)  # dA, dB
    assert lora_mode(f16, f32, kept=True)[0] == int(TF32X3)  # fp16 parts of fp32 values would underflow
    assert lora_mode(bf, f32, kept=False)[0] != int(BF16X3)  # rounded to 16 bits anyway: one TF32 MMA
    assert lora_mode(bf, f32, kept=True, bf16_parts=False)[0] == int(TF32X3)  # tiles too wide: spills
    assert native_16bit(bf, f32, bf16_parts=False)[0] == int(TF32X3)


@pytest.mark.parametrize("r", [12, 40])
def test_grad_pass_picks_bf16x3_up_to_its_rank_block(exact_dot, monkeypatch, r):
    """Rank blocks up to configs.BF16X3_MAX_R_BLOCK multiply in BF16X3; wider ones (r = 40: a block of
    64, where the three parts spilled on sm_80) keep TF32X3 — the kernels launched say so."""
    mod = sys.modules["fused_lora.kernels.lora_grad"]
    seen, real = [], mod.launch

    def spy(kernel, grid, *args, **meta):
        seen.append((meta["G_MODE"], meta["D_MODE"]))
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(mod, "launch", spy)
    dy, B, xa, x, _ = _inputs(19, 40, 36, r)
    lora_grad(dy, B, xa, x, scaling=0.5)
    want = int(BF16X3) if configs.grad_r_block(rank_pad(r), 2) <= configs.BF16X3_MAX_R_BLOCK else int(TF32X3)
    assert want == (int(BF16X3) if r == 12 else int(TF32X3))
    assert seen and all(m == (want, want) for m in seen), (r, seen)


@pytest.mark.skipif(not interpreting(), reason="the interpreter's bf16 dot")
def test_bf16_refused_outside_the_exact_dot():
    assert bf16_dot_wrong()
    x = torch.randn(8, 16).bfloat16()
    with pytest.raises(TypeError, match="bf16"):
        shrink(x, torch.randn(3, 16).bfloat16())
    with exact_bf16_dot():
        assert not bf16_dot_wrong()
    assert bf16_dot_wrong()


def _inputs(M, N, K, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(M, N, generator=g).bfloat16()
    B = torch.randn(N, r, generator=g) / 4
    xa = torch.randn(M, r, generator=g)
    x = torch.randn(M, K, generator=g).bfloat16()
    A = torch.randn(r, K, generator=g) / 8
    return [t.to(DEVICE) for t in (dy, B, xa, x, A)]


def _truth(dy, B, xa, x, s, p, mask, dtype):
    dy, B, xa, x = (t.to(dtype) for t in (dy, B, xa, x))
    xm = x * mask.to(dtype) if mask is not None else x
    g = dy @ B * (s / (1 - p))
    return g, g.t() @ xm, dy.t() @ xa


def _check_grad(got, dy, B, xa, x, s, p, mask):
    ref = _truth(dy, B, xa, x, s, p, mask, torch.float64)
    same = _truth(dy, B, xa, x, s, p, mask, torch.float32)  # the yardstick: fp32 torch, as PEFT computes them
    for name, a, want, yard in zip(("g", "dA", "dB"), got, ref, same):
        assert a.dtype == torch.float32
        assert_close_to_ref(name, a, want, yard, dtype=torch.float32)


@pytest.mark.parametrize("split", [None, 2])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("r", [5, 12, 40])
def test_grad_pass(exact_dot, split, p, r):
    M, N, K, s = 37, 150, 130, 0.7
    dy, B, xa, x, _ = _inputs(M, N, K, r)
    seed = torch.tensor([4321], dtype=torch.int64, device=DEVICE)
    mask = dropout_mask(seed, M, K, p) if p else None
    pe = effective_dropout_p(p) if p else 0.0
    if split is None:
        got = lora_grad(dy, B, xa, x, scaling=s, dropout_p=p, seed=seed)
    else:
        base = configs.name(configs.grad_table()[0])
        with tuning.force("grad", f"{base} split{split}"):
            got = lora_grad(dy, B, xa, x, scaling=s, dropout_p=p, seed=seed)
    _check_grad(got, dy, B, xa, x, s, pe, mask)


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("r", [3, 16, 33])
def test_shrink(exact_dot, p, r):
    M, K, s = 41, 130, 0.5
    _, _, _, x, A = _inputs(M, 8, K, r, seed=1)
    seed = torch.tensor([99], dtype=torch.int64, device=DEVICE)
    got = shrink(x, A, scale=s, dropout_p=p, seed=seed if p else None)
    keep = dropout_mask(seed, M, K, p).to(torch.float64) / (1 - effective_dropout_p(p)) if p else 1.0
    ref = (x.double() * keep) @ A.double().t() * s
    same = ((x.float() * (keep.float() if p else 1.0)) @ A.t()) * s
    assert_close_to_ref("xa", got, ref, same, dtype=torch.float32)


def test_the_rule_catches_a_coarser_split():
    """What the parity tests above would see if the kernel kept only two bf16 parts of B (or rounded B
    to bf16): an error the fp32 yardstick's bound does not admit."""
    M, N, K, s = 37, 150, 130, 0.7
    dy, B, xa, x, _ = _inputs(M, N, K, 12)
    ref = _truth(dy, B, xa, x, s, 0.0, None, torch.float64)[0]
    same = _truth(dy, B, xa, x, s, 0.0, None, torch.float32)[0]
    hi = B.bfloat16().float()
    mid = (B - hi).bfloat16().float()
    for coarse in (hi, hi + mid):
        got = dy.double() @ coarse.double() * s
        with pytest.raises(AssertionError, match="exceeds bound"):
            assert_close_to_ref("g", got.float(), ref, same, dtype=torch.float32)
    lo = (B - hi - mid).bfloat16().float()
    assert_close_to_ref("g", (dy.double() @ (hi + mid + lo).double() * s).float(), ref, same, torch.float32)
