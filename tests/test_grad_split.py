"""The grad pass split over N and K (issue 16 item 4): PHASE 1 (the dY pass in N chunks: partial g, dB)
and PHASE 2 (the x pass in K chunks: dA) give g, dA and dB as the fp64 reference by the parity rule, with
the same dropout mask as the unsplit pass; deterministic mode stays bitwise repeatable; the split count
follows the SM count; a training step through lora_linear is unchanged by a forced split."""

from __future__ import annotations

import importlib

import pytest
import torch

import fused_lora
from fused_lora.kernels import LAUNCHES, configs, lora_grad, tuning
from fused_lora.kernels.dropout import dropout_mask, effective_dropout_p

from helpers import assert_close_to_ref

grad_module = importlib.import_module("fused_lora.kernels.lora_grad")  # the package exports the function by that name
BASE = configs.name(configs.GRAD_INTERPRET[0])


def _inputs(M, N, K, r, dtype, lora_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(M, N, generator=g).to(dtype)
    B = (torch.randn(N, r, generator=g) / 4).to(lora_dtype)
    xa = torch.randn(M, r, generator=g)  # fp32, as the forward saves it
    x = torch.randn(M, K, generator=g).to(dtype)
    return dy, B, xa, x


def _truth(dy, B, xa, x, s, p, mask, dtype):
    """(g, dA, dB) in `dtype` arithmetic (the yardstick) or float64 (the truth)."""
    dy, B, xa, x = (t.to(dtype) for t in (dy, B, xa, x))
    xm = x * mask.to(dtype) if mask is not None else x
    g = dy @ B * (s / (1 - p))
    return g, g.t() @ xm, dy.t() @ xa


@pytest.mark.parametrize("splits", [2, 3, 16])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize(
    "dtype, lora_dtype, r",
    [(torch.float32, torch.float32, 5), (torch.float16, torch.float32, 12), (torch.float16, torch.float16, 3),
     (torch.float32, torch.float32, 70)],  # fmt: skip  (r = 70 in fp32: three rank blocks of 32)
)
def test_split_grad_pass_matches_reference(splits, p, dtype, lora_dtype, r):
    M, N, K, s = 37, 150, 130, 0.7
    dy, B, xa, x = _inputs(M, N, K, r, dtype, lora_dtype)
    seed = torch.tensor([4321], dtype=torch.int64)
    mask = dropout_mask(seed, M, K, p) if p else None
    pe = effective_dropout_p(p) if p else 0.0
    before = LAUNCHES.copy()
    with tuning.force("grad", f"{BASE} split{splits}"):
        got = lora_grad(dy, B, xa, x, scaling=s, dropout_p=p, seed=seed)
    assert (LAUNCHES - before)["_lora_grad_kernel"] == 2  # the two phases
    ref = _truth(dy, B, xa, x, s, pe, mask, torch.float64)
    same = _truth(dy, B, xa, x, s, pe, mask, lora_dtype)  # the yardstick: torch in the adapters' dtype
    for name, a, want, yard in zip(("g", "dA", "dB"), got, ref, same):
        assert a.dtype == torch.float32
        assert_close_to_ref(name, a, want, yard, dtype=lora_dtype)


def test_split_and_unsplit_draw_one_mask():
    """The x pass's mask depends on (seed, row, column) only: split and unsplit dA agree to rounding,
    and both differ by O(1) from a dA with another seed."""
    M, N, K, r = 40, 96, 200, 4
    dy, B, xa, x = _inputs(M, N, K, r, torch.float32, torch.float32, seed=3)
    seed = torch.tensor([7], dtype=torch.int64)
    _, one, _ = lora_grad(dy, B, xa, x, scaling=1.0, dropout_p=0.5, seed=seed)
    with tuning.force("grad", f"{BASE} split4"):
        _, split, _ = lora_grad(dy, B, xa, x, scaling=1.0, dropout_p=0.5, seed=seed)
    _, other, _ = lora_grad(dy, B, xa, x, scaling=1.0, dropout_p=0.5, seed=torch.tensor([8], dtype=torch.int64))
    torch.testing.assert_close(split, one, rtol=1e-5, atol=1e-4)
    assert (other - one).abs().max() > 1.0


@pytest.mark.parametrize("need", [(True, False, True), (False, True, False), (False, False, True), (True, True, False)])
def test_split_with_some_outputs(need):
    """need_g / need_dA / need_dB subsets: what is asked for is right, the rest is None (g still formed
    internally when only dA is asked for)."""
    need_g, need_dA, need_dB = need
    dy, B, xa, x = _inputs(20, 80, 70, 6, torch.float32, torch.float32, seed=5)
    ref = _truth(dy, B, xa, x, 0.5, 0.0, None, torch.float64)
    with tuning.force("grad", f"{BASE} split3"):
        got = lora_grad(dy, B, xa, x, scaling=0.5, need_g=need_g, need_dA=need_dA, need_dB=need_dB)
    for want_it, a, want in zip(need, got, ref):
        if want_it:
            torch.testing.assert_close(a.double(), want, rtol=1e-4, atol=1e-4)
        else:
            assert a is None


def test_deterministic_split_is_repeatable():
    """Deterministic mode with a split: partial g per N chunk summed in a fixed order; two runs are
    bitwise equal and agree with the unsplit pass to rounding."""
    dy, B, xa, x = _inputs(50, 120, 90, 7, torch.float32, torch.float32, seed=9)
    seed = torch.tensor([11], dtype=torch.int64)
    entry = configs.deterministic_entry("grad", 4, 16, 90)
    run = lambda: lora_grad(dy, B, xa, x, scaling=0.3, dropout_p=0.2, seed=seed, deterministic=True)
    with tuning.force("grad", f"{configs.name(entry)} split3"):
        before = LAUNCHES.copy()
        first, second = run(), run()
        assert (LAUNCHES - before)["_lora_grad_kernel"] == 4
    plain = run()
    for a, b, c in zip(first, second, plain):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_split_count_follows_the_sms(monkeypatch):
    """Two programs per SM: no split when the bands give that, else enough chunks (each of at least
    MIN_SPLIT_TILES tiles, at most 16); off the GPU, never."""
    monkeypatch.setattr(grad_module, "num_programs", lambda device: 132)
    cuda = torch.device("cuda")
    assert grad_module.grad_splits(264, 4096, 4096, 64, cuda) == 1  # M = 8192 at 32-row bands
    assert grad_module.grad_splits(128, 4096, 4096, 64, cuda) == 3  # M = 8192 at 64-row bands
    assert grad_module.grad_splits(32, 4096, 4096, 64, cuda) == 9  # M = 2048
    assert grad_module.grad_splits(1, 4096, 4096, 64, cuda) == 16  # capped
    assert grad_module.grad_splits(8, 4096, 512, 64, cuda) == 2  # K = 512: 8 tiles, chunks of >= 4
    assert grad_module.grad_splits(8, 4096, 192, 64, cuda) == 1
    assert grad_module.grad_splits(1, 4096, 4096, 64, torch.device("cpu")) == 1


def test_training_step_with_a_forced_split():
    """lora_linear's backward through the split pass: dX, dA, dB as with the unsplit pass (same mask)."""
    torch.manual_seed(0)
    x = torch.randn(33, 48, requires_grad=True)
    w = torch.randn(40, 48) / 7
    a = (torch.randn(6, 48) / 7).requires_grad_()
    b = (torch.randn(40, 6) / 7).requires_grad_()

    def grads(force):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(5)
        with tuning.force("grad", force):
            y = fused_lora.lora_linear(x, w, a, b, 0.8, None, 0.3, True)
            (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        return y.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()

    plain, split = grads(BASE), grads(f"{BASE} split2")
    for p_, s_ in zip(plain, split):
        torch.testing.assert_close(s_, p_, rtol=1e-5, atol=1e-5)
