"""fused_lora.conv_function.lora_conv: a convolution with LoRA in PEFT's factored shapes, against the plain
two-step form conv(x, W) + s·conv1x1(conv(x, A), B) in float64 — gradients (double backward too), padding
'same', autocast, the dropout draw, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_lora.conv_function import lora_conv

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def inputs(d, dtype=torch.float64, C=3, N=5, r=2, k=3, S=6):
    g = torch.Generator().manual_seed(d)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return mk(2, C, *([S] * d)), mk(N, C, *([k] * d)), mk(N), mk(r, C, *([k] * d)), mk(N, r)


def two_step(x, W, b, A, B, s, stride, padding, dilation=1):
    d = W.dim() - 2
    t = CONV[d](x, A, None, stride, padding, dilation)
    return CONV[d](x, W, b, stride, padding, dilation) + s * CONV[d](t, B.view(*B.shape, *([1] * d)))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_matches_the_two_step_form_with_gradients(d):
    x, W, b, A, B = inputs(d)
    got = lora_conv(x, W, A, B, 0.7, b, stride=2, padding=1, dilation=1)
    ref = two_step(x, W, b, A, B, 0.7, 2, 1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, e in zip(torch.autograd.grad(got, (x, W, b, A, B), g), torch.autograd.grad(ref, (x, W, b, A, B), g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_double_backward():
    x, W, b, A, B = inputs(2, C=2, N=3, k=2, S=4)
    f = lambda x, W, b, A, B: lora_conv(x, W, A, B, 1.3, b, padding=1, dilation=2)
    assert torch.autograd.gradcheck(f, (x, W, b, A, B))
    assert torch.autograd.gradgradcheck(f, (x, W, b, A, B))


def test_no_weight_sized_gradient_when_only_adapters_train():
    """The backward takes dA, dB from r-channel passes: no convolution weight gradient of W's shape."""
    x, W, b, A, B = inputs(2)
    W, b, x = W.detach(), b.detach(), x.detach()
    shapes = []
    real = torch.ops.aten.convolution_backward

    class Watch(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is real and out[1] is not None:
                shapes.append(tuple(out[1].shape))
            return out

    y = lora_conv(x, W, A, B, 0.5, b, padding=1)
    with Watch():
        y.sum().backward()
    assert shapes == [tuple(A.shape)], shapes


def test_padding_same_and_autocast():
    x, W, b, A, B = inputs(2, dtype=torch.float32)
    got = lora_conv(x, W, A, B, 0.5, b, padding="same")
    torch.testing.assert_close(got, two_step(x, W, b, A, B, 0.5, 1, 1), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_conv(x, W, A, B, 0.5, b, padding=1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), got, rtol=0.05, atol=0.05)


def test_dropout_draws_as_torch_dropout():
    """In training with p > 0: the same F.dropout draw PEFT makes, so the same mask for the same seed."""
    x, W, b, A, B = inputs(2)
    torch.manual_seed(3)
    got = lora_conv(x, W, A, B, 0.5, b, 0.4, True, padding=1)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.4, True)
    ref = CONV[2](x, W, b, 1, 1) + 0.5 * CONV[2](CONV[2](xd, A, None, 1, 1), B.view(5, 2, 1, 1))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    no_drop = lora_conv(x, W, A, B, 0.5, b, 0.4, False, padding=1)  # eval: no dropout
    torch.testing.assert_close(no_drop, two_step(x, W, b, A, B, 0.5, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: {**t, "A": t["A"][:, :2]}, ValueError, r"lora_A \[2, 2, 3, 3\] must be \[r, 3, 3, 3\]"),
        (lambda t: {**t, "B": t["B"][:4]}, ValueError, r"lora_B \[4, 2\] must be \[out, r\] = \[5, 2\]"),
        (lambda t: {**t, "x": t["x"][0]}, ValueError, r"x \[3, 6, 6\] must be \[batch, 3, \.\.\.\]"),
        (lambda t: {**t, "b": t["b"][:2]}, ValueError, r"bias \[2\] must be \[out\] = \[5\]"),
        (lambda t: {**t, "W": t["W"].float()}, TypeError, "weight is torch.float32 but x is torch.float64"),
        (lambda t: {**t, "B": t["B"].float()}, TypeError, "must share a dtype"),
        (lambda t: {**t, "x": t["x"].long()}, TypeError, "x must be a floating-point tensor"),
        (lambda t: {**t, "padding": "same", "stride": 2}, ValueError, "padding='same'"),
        (lambda t: {**t, "s": float("nan")}, (TypeError, ValueError), "scaling"),
        (lambda t: {**t, "p": 1.0}, ValueError, "dropout_p"),
    ],
)
def test_bad_input_is_named(change, error, match):
    x, W, b, A, B = (t.detach() for t in inputs(2))
    t = change({"x": x, "W": W, "b": b, "A": A, "B": B, "s": 0.5, "p": 0.0, "padding": 1, "stride": 1})
    with pytest.raises(error, match=match):
        lora_conv(t["x"], t["W"], t["A"], t["B"], t["s"], t["b"], t["p"], padding=t["padding"], stride=t["stride"])
