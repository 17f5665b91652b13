"""Bad input gets a clear ValueError / TypeError naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

import fused_lora

from helpers import lora_inputs


@pytest.fixture
def good():
    return lora_inputs(6, 10, 8, 3)


def call(x, w, a, b, bias=None, s=1.0, p=0.0):
    return fused_lora.lora_linear(x, w, a, b, s, bias=bias, dropout_p=p)


@pytest.mark.parametrize(
    ("mutate", "error", "pattern"),
    [
        (lambda x, w, a, b, bb: (torch.randn(6, 11), w, a, b, bb), ValueError, r"last dimension is 11.*\[8, 10\]"),
        (lambda x, w, a, b, bb: (x, torch.randn(8, 9), a, b, bb), ValueError, r"expects in_features = 9"),
        (lambda x, w, a, b, bb: (x, w, torch.randn(3, 9), b, bb), ValueError, r"lora_A \[3, 9\].*\[r, 10\]"),
        (lambda x, w, a, b, bb: (x, w, a, torch.randn(8, 4), bb), ValueError, r"lora_B \[8, 4\].*\[8, 3\]"),
        (lambda x, w, a, b, bb: (x, w, a, b, torch.randn(7)), ValueError, r"bias \[7\].*\[8\]"),
        (lambda x, w, a, b, bb: (x.long(), w, a, b, bb), TypeError, r"x must be a floating-point"),
        (lambda x, w, a, b, bb: (x.numpy(), w, a, b, bb), TypeError, r"x must be a torch.Tensor"),
        (lambda x, w, a, b, bb: (x.half(), w, a, b, bb), TypeError, r"weight is torch.float32 but x is"),
        (lambda x, w, a, b, bb: (x, w, a.double(), b, bb), TypeError, r"lora_A .* and lora_B .* share"),
        (lambda x, w, a, b, bb: (x, w, torch.randn(3), b, bb), ValueError, r"lora_A must be 2-D"),
        (lambda x, w, a, b, bb: (x, w, a, b, bb.to("meta")), ValueError, r"one device.*bias on meta"),
    ],
)
def test_bad_tensors(good, mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        call(*mutate(*good))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout(good, p):
    with pytest.raises(ValueError, match="dropout_p must be in"):
        call(*good, p=p)


def test_bad_dropout_type(good):
    with pytest.raises(TypeError, match="dropout_p"):
        call(*good, p="0.1")


@pytest.mark.parametrize("s", [float("inf"), "2", None])
def test_bad_scaling(good, s):
    with pytest.raises(TypeError, match="scaling"):
        call(*good, s=s)


def test_layer_arguments():
    with pytest.raises(ValueError, match="r must be >= 0"):
        fused_lora.LoRALinear(4, 4, r=-1)
    with pytest.raises(TypeError, match="r must be an int"):
        fused_lora.LoRALinear(4, 4, r=2.5)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        fused_lora.LoRALinear(4, 4, lora_dropout=1.0)
    layer = fused_lora.LoRALinear(10, 4, r=2)
    with pytest.raises(ValueError, match="last dimension is 9"):
        layer(torch.randn(3, 9))


def test_float64_needs_the_reference_backend(good):
    x, w, a, b, bb = (t.double() for t in good)
    with pytest.raises(TypeError, match="reference"):
        call(x, w, a, b, bb)
    with fused_lora.use_backend("reference"):
        assert call(x, w, a, b, bb).dtype == torch.float64
