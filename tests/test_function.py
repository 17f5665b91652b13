"""lora_linear beyond parity: the dropout mask's consistency, RNG, edge sizes, autocast, backends."""

from __future__ import annotations

import contextvars

import pytest
import torch

import fused_lora
from fused_lora import reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import dropout_mask

from helpers import host_syncs, lora_inputs

P = 0.3
SEED = 99


def fused(x, w, a, b, bias, s=1.3, p=P):
    torch.manual_seed(SEED)  # the same mask on every call
    return fused_lora.lora_linear(x, w, a, b, s, bias=bias, dropout_p=p)


@pytest.mark.parametrize("wrt", ["x", "lora_A", "lora_B"])
def test_backward_uses_the_forward_mask(wrt, device):
    """With the mask fixed by the seed, y is linear in each of x, A and B, so a central difference with
    the same seed equals the directional derivative exactly (up to rounding): <dY, (y(t+v) - y(t-v))/2>
    must equal <grad_t, v>. A backward that drew another mask would miss by O(1)."""
    x, w, a, b, bias = lora_inputs(29, 45, 27, 6, device=device)
    args = {"x": x, "lora_A": a, "lora_B": b}
    args[wrt] = args[wrt].clone().requires_grad_()
    dy = torch.randn(29, 27, device=device)
    fused(args["x"], w, args["lora_A"], args["lora_B"], bias).backward(dy)
    grad = args[wrt].grad

    v = torch.randn_like(args[wrt])
    plus, minus = dict(args), dict(args)
    plus[wrt] = args[wrt].detach() + v
    minus[wrt] = args[wrt].detach() - v
    with torch.no_grad():
        y_plus = fused(plus["x"], w, plus["lora_A"], plus["lora_B"], bias)
        y_minus = fused(minus["x"], w, minus["lora_A"], minus["lora_B"], bias)
    directional = (dy.double() * (y_plus - y_minus).double() / 2).sum()
    analytic = (grad.double() * v.double()).sum()
    assert torch.allclose(directional, analytic, rtol=1e-4, atol=1e-3), (wrt, directional, analytic)

    # and the mask is really there: without dropout the same difference is another number
    with torch.no_grad():
        y0p = fused(plus["x"], w, plus["lora_A"], plus["lora_B"], bias, p=0.0)
        y0m = fused(minus["x"], w, minus["lora_A"], minus["lora_B"], bias, p=0.0)
    no_drop = (dy.double() * (y0p - y0m).double() / 2).sum()
    assert not torch.allclose(no_drop, analytic, rtol=1e-3), "dropout had no effect"


def test_dropout_mask_statistics_and_scale(device):
    """P(keep) = 1 - p, the kept values scaled by 1/(1-p) so E[drop(x)] = x (checked on xa = drop(x)·Aᵀ
    with A = I: xa is drop(x) itself)."""
    seed = torch.tensor([7], device=device)
    m = dropout_mask(seed, 257, 300, 0.25)
    assert abs(m.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(m[:, :150], m[:, 150:]), "columns repeat"
    assert not torch.equal(m[:128], m[128:256]), "rows repeat"
    x = torch.randn(40, 32, device=device)
    xa = fused_lora.kernels.shrink(x, torch.eye(32, device=device), dropout_p=0.25, seed=seed)
    keep = dropout_mask(seed, 40, 32, 0.25)
    torch.testing.assert_close(xa, torch.where(keep, x / 0.75, 0.0), rtol=1e-6, atol=1e-6)


def test_seed_follows_torch_manual_seed(device):
    x, w, a, b, bias = lora_inputs(17, 24, 19, 4, device=device)
    y1, y2 = fused(x, w, a, b, bias), fused(x, w, a, b, bias)
    torch.manual_seed(SEED + 1)
    y3 = fused_lora.lora_linear(x, w, a, b, 1.3, bias=bias, dropout_p=P)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_eval_mode_and_p0_draw_no_seed(device):
    """training=False (or p = 0) is the deterministic layer: no RNG consumed, no mask applied."""
    x, w, a, b, bias = lora_inputs(17, 24, 19, 4, device=device)
    torch.manual_seed(0)
    y_eval = fused_lora.lora_linear(x, w, a, b, 1.3, bias=bias, dropout_p=P, training=False)
    after_eval = torch.rand(1, device=device)
    torch.manual_seed(0)
    y0 = fused_lora.lora_linear(x, w, a, b, 1.3, bias=bias, dropout_p=0.0)
    after_p0 = torch.rand(1, device=device)
    torch.manual_seed(0)
    assert torch.equal(after_eval, torch.rand(1, device=device)) and torch.equal(after_eval, after_p0)
    assert torch.equal(y_eval, y0)


def test_empty_batch(device):
    x, w, a, b, bias = lora_inputs(0, 24, 19, 4, device=device)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias, dropout_p=0.1)
    assert y.shape == (0, 19)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_rank_zero_is_plain_linear(device):
    x, w, _, _, bias = lora_inputs(9, 12, 7, 1, device=device)
    a, b = torch.empty(0, 12, device=device), torch.empty(7, 0, device=device)
    y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias))


def test_nan_in_one_row_poisons_only_that_row(device):
    x, w, a, b, bias = lora_inputs(33, 40, 21, 5, device=device)
    x[7, 11] = float("nan")
    y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias, dropout_p=0.0)
    assert torch.isnan(y[7]).all()
    assert not torch.isnan(torch.cat([y[:7], y[8:]])).any()


def test_autocast_behaves_like_linear(device):
    """Under autocast, fp32 x/W/bias run as the autocast dtype (as nn.Linear would) and the output has
    that dtype; fp32 adapters stay fp32 and get fp32 gradients."""
    x, w, a, b, bias = lora_inputs(15, 32, 18, 4, device=device)
    a.requires_grad_()
    dtype = torch.float16  # bf16 tl.dot is wrong under the interpreter; the GPU tests cover bf16
    with torch.autocast(device, dtype=dtype):
        y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
        lin = torch.nn.functional.linear(x, w, bias)
    assert y.dtype == lin.dtype == dtype
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32


def test_autocast_reference_path_cpu():
    """The reference backend under CPU autocast (bf16) also behaves like nn.Linear."""
    x, w, a, b, bias = lora_inputs(15, 32, 18, 4)
    with fused_lora.use_backend("reference"), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
        lin = torch.nn.functional.linear(x, w, bias)
    assert y.dtype == lin.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.lora_linear(x, w, a, b, 1.0, bias).float(), rtol=2e-2, atol=2e-2)


def test_backend_selection(monkeypatch):
    """use_backend (scoped) beats set_backend (process) beats FUSED_LORA_BACKEND beats auto."""
    x, w, a, b, _ = lora_inputs(5, 8, 6, 2)
    monkeypatch.setenv("FUSED_LORA_BACKEND", "reference")
    with fused_lora.use_backend("auto"):
        assert fused_lora.backend.resolve_backend(torch.device("cpu")) == "reference"
        assert fused_lora.backend.resolve_backend(torch.device("cuda")) == "triton"

    def unscoped():  # a fresh context: no use_backend block around it (the test fixture opens one)
        assert fused_lora.get_backend() == "reference"
        fused_lora.set_backend("triton")
        try:
            assert fused_lora.get_backend() == "triton"
            with fused_lora.use_backend("reference"):
                assert fused_lora.get_backend() == "reference"
            assert fused_lora.get_backend() == "triton"
        finally:
            fused_lora.set_backend(None)
        monkeypatch.setenv("FUSED_LORA_BACKEND", "bogus")
        with pytest.raises(ValueError, match="FUSED_LORA_BACKEND"):
            fused_lora.lora_linear(x, w, a, b, 1.0)

    contextvars.Context().run(unscoped)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lora.set_backend("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused_lora.backend.resolve_backend(torch.device("cpu"))


def test_seed_is_drawn_on_the_inputs_device(device):
    assert _draw_seed(torch.device(device)).device.type == device


def test_autocast_accepts_what_linear_accepts(device):
    """Mixed dtypes that autocast casts anyway (fp32 x with a half W, half adapters) run as nn.Linear does."""
    x, w, a, b, bias = lora_inputs(11, 20, 9, 3, device=device)
    with torch.autocast(device, dtype=torch.float16):
        y = fused_lora.lora_linear(x, w.half(), a.half(), b.half(), 1.0, bias=bias)
        lin = torch.nn.functional.linear(x, w.half(), bias)
    assert y.dtype == lin.dtype == torch.float16


def test_strided_bias(device):
    """A bias that is a strided or expanded view is read through its stride."""
    x, w, a, b, _ = lora_inputs(13, 22, 15, 3, device=device)
    wide = torch.randn(15, 2, device=device)
    for bias in (wide[:, 0], torch.tensor([1.5], device=device).expand(15)):
        y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
        torch.testing.assert_close(y, reference.lora_linear(x, w, a, b, 1.0, bias=bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("K", "N"), [(0, 5), (6, 0)])
def test_zero_features(K, N, device):
    x, w, a, b, bias = lora_inputs(4, K, N, 2, device=device)
    x.requires_grad_()
    a.requires_grad_()
    y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
    assert y.shape == (4, N)
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        ([1.0, 2.0, 3.0, 4.0], TypeError, r"one-element tensor, got shape \[4\]"),
        ([[1.0], [2.0], [3.0]], TypeError, r"one-element tensor, got shape \[3, 1\]"),
        (float("nan"), TypeError, "finite"),
        (float("inf"), TypeError, "finite"),
        (1e300, ValueError, "float32's range"),
    ],
)
def test_learnable_scaling_is_checked_as_a_constant_one_is(value, error, pattern):
    """A scale that requires grad (reference backend) gets check_scaling's errors: it used to broadcast a
    multi-element tensor into y silently and accept NaN / inf."""
    x, w, a, b, _ = lora_inputs(3, 8, 4, 2)
    s = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    with fused_lora.use_backend("reference"), pytest.raises(error, match=pattern):
        fused_lora.lora_linear(x, w, a, b, s)
    with pytest.raises(error, match=pattern):
        fused_lora.lora_linear(x, w, a, b, s.detach())


def test_learnable_scaling_keeps_y_shape_and_its_gradient():
    """A [1, 1] learnable scale used to turn a 1-D x's y [N] into [1, N]; the gradient still flows."""
    x, w, a, b, _ = lora_inputs(1, 8, 4, 2)
    x = x[0]
    s = torch.full((1, 1), 0.7, requires_grad=True)
    with fused_lora.use_backend("reference"):
        y = fused_lora.lora_linear(x, w, a, b, s)
    assert y.shape == (4,)
    y.sum().backward()
    assert s.grad.shape == (1, 1)
    torch.testing.assert_close(s.grad[0, 0], ((x @ a.t()) @ b.t()).sum())


def test_learnable_scaling_is_read_once_per_value():
    """Checking a learnable scale read its value (.item(): a host sync on a GPU) on every call. It is read
    once, and again only after the scale changes (an optimizer step), which is still checked."""
    x, w, a, b, _ = lora_inputs(3, 8, 4, 2)
    s = torch.nn.Parameter(torch.tensor(0.7))

    def call():
        with fused_lora.use_backend("reference"):
            fused_lora.lora_linear(x, w, a, b, s).sum().backward()

    call()
    assert host_syncs(call) == []
    with torch.no_grad():
        s.fill_(float("nan"))  # as a diverged optimizer step would
    with pytest.raises(TypeError, match="finite"):
        call()
