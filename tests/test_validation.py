"""Bad input gets a clear ValueError / TypeError naming the argument and the shapes."""

from __future__ import annotations

import pytest
import torch

import fused_lora

from helpers import lora_inputs


@pytest.fixture
def good():
    return lora_inputs(6, 10, 8, 3)


@pytest.fixture
def good_dev(device):  # the kernels' device: on a GPU machine the triton backend refuses CPU tensors first
    return lora_inputs(6, 10, 8, 3, device=device)


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
def test_bad_scaling(good_dev, s):
    with pytest.raises(TypeError, match="scaling"):
        call(*good_dev, s=s)


def test_layer_arguments():
    with pytest.raises(ValueError, match="r must be >= 0"):
        fused_lora.LoRALinear(4, 4, r=-1)
    with pytest.raises(TypeError, match="r must be an int"):
        fused_lora.LoRALinear(4, 4, r=2.5)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        fused_lora.LoRALinear(4, 4, lora_dropout=1.0)
    layer = fused_lora.LoRALinear(10, 4, r=2)
    with pytest.raises(ValueError, match="last dimension is 9"):
        layer(torch.randn(3, 9))


def test_float64_needs_the_reference_backend(good_dev):
    x, w, a, b, bb = (t.double() for t in good_dev)
    with pytest.raises(TypeError, match="reference"):
        call(x, w, a, b, bb)
    with fused_lora.use_backend("reference"):
        assert call(x, w, a, b, bb).dtype == torch.float64


def _grouped():
    """Two groups of 16 output columns, rank 4 each, B block-structured (MergedLinear's layout)."""
    x, w, a = torch.randn(4, 16), torch.randn(32, 16), torch.randn(8, 16)
    b = torch.zeros(32, 8)
    b[:16, :4], b[16:, 4:] = torch.randn(16, 4), torch.randn(16, 4)
    return x, w, a, b


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize(
    ("groups", "error", "pattern"),
    [
        (
            (8, torch.tensor([0, 4, 8], dtype=torch.int32)),
            ValueError,
            r"bounds \[3\] must be .*\[32 / 8 \+ 1\] = \[5\]",
        ),
        ((16, torch.tensor([0, 4], dtype=torch.int32)), ValueError, r"bounds \[2\] must be .*= \[3\]"),
        ((16, torch.tensor([8, 4, 0], dtype=torch.int32)), ValueError, r"bounds \[8, 4, 0\] must be non-decreasing"),
        ((16, torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"within \[0, r\] = \[0, 8\]"),
        ((16, torch.tensor([-1, 4, 8], dtype=torch.int32)), ValueError, r"within \[0, r\]"),
        ((0, torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, r"group_n .* must be > 0, got 0"),
        ((12, torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, r"group_n = 12 must divide out_features = 32"),
        ((16.0, torch.tensor([0, 4, 8], dtype=torch.int32)), TypeError, r"group_n must be an int"),
        ((True, torch.tensor([0, 4, 8], dtype=torch.int32)), TypeError, r"group_n must be an int"),
        ((16, torch.tensor([0.0, 4.0, 8.0])), TypeError, r"bounds must be a dense int32 or int64 tensor"),
        ((16, [0, 4, 8]), TypeError, r"bounds must be an int32 or int64 torch.Tensor, got list"),
        ((16, torch.tensor([0, 4, 8], device="meta")), ValueError, r"bounds must be on x's device"),
        (torch.tensor([0, 4, 8], dtype=torch.int32), TypeError, r"groups must be a \(group_n, bounds\) pair"),
        ((16,), TypeError, r"groups must be a \(group_n, bounds\) pair"),
    ],
)
def test_bad_groups(backend, groups, error, pattern):
    """groups= is checked on every backend, before anything reads the bounds: a wrong group_n or short or
    unordered bounds used to give a silently wrong y (or read past the bounds' end)."""
    with fused_lora.use_backend(backend), pytest.raises(error, match=pattern):
        fused_lora.lora_linear(*_grouped(), 1.0, groups=groups)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_good_groups_on_every_backend(backend):
    """int32 and int64 bounds give the ungrouped result for a block-structured B; the reference honours
    the groups (B zeroed outside its blocks, what the kernels give on group-aligned tiles: see
    test_merged.py) rather than ignoring them."""
    x, w, a, b = _grouped()
    want = fused_lora.reference.lora_linear(x, w, a, b, 1.0)
    with fused_lora.use_backend(backend):
        for dtype in (torch.int32, torch.int64):
            y = fused_lora.lora_linear(x, w, a, b, 1.0, groups=(16, torch.tensor([0, 4, 8], dtype=dtype)))
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    with fused_lora.use_backend("reference"):
        dense = b + 1.0  # not block-structured: the groups decide which entries count
        y = fused_lora.lora_linear(x, w, a, dense, 1.0, groups=(16, torch.tensor([0, 4, 8])))
        blocks = torch.zeros_like(b, dtype=torch.bool)
        blocks[:16, :4], blocks[16:, 4:] = True, True
        torch.testing.assert_close(
            y, fused_lora.reference.lora_linear(x, w, a, dense * blocks, 1.0), rtol=1e-4, atol=1e-4
        )


def test_grouped_gradients_agree_between_backends(device):
    """With groups, the reference masked B inside autograd, so its dB was zero outside the blocks while the
    kernels' dB is dense (dYᵀ·xa): the two backends disagreed by ~6. Both now give the dense gradient
    (forward: the blocks only)."""
    torch.manual_seed(0)
    x, w, a, b = (t.to(device) for t in _grouped())
    bounds = torch.tensor([0, 4, 8], device=device)
    grads = {}
    for backend in ("triton", "reference"):
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        with fused_lora.use_backend(backend):
            y = fused_lora.lora_linear(xs, w, as_, bs, 0.5, groups=(16, bounds))
        y.backward(torch.ones_like(y))
        grads[backend] = (y.detach(), xs.grad, as_.grad, bs.grad)
    for name, got, want in zip(("y", "dX", "dA", "dB"), grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_groups_bounds_are_read_once_per_tensor(monkeypatch):
    """MergedLinear passes the same bounds buffer on every call: its values are read (a host sync on a GPU)
    once, and again only after it is modified in place."""
    from fused_lora import validation

    device = torch.device("cpu")
    bounds = torch.tensor([0, 4, 8], dtype=torch.int32)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real(t))
    for _ in range(3):
        validation.check_groups((16, bounds), 32, 8, device)
    assert len(reads) == 1
    bounds[2] = 9
    with pytest.raises(ValueError, match="within"):
        validation.check_groups((16, bounds), 32, 8, device)


@pytest.mark.parametrize("big", [10**400, -(10**400), 10**5000], ids=["1e400", "-1e400", "1e5000"])
def test_ints_beyond_float_range(good, big):
    """Python ints too large for a float used to raise a bare OverflowError naming nothing."""
    with pytest.raises(ValueError, match=r"scaling must be within float32's range"):
        call(*good, s=big)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        call(*good, p=big)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_x(good):
    """A (strided-layout) nested x passed the layout check and failed inside torch with an internal error."""
    x, w, a, b, bb = good
    with pytest.raises(TypeError, match="x is a nested tensor"):
        call(torch.nested.nested_tensor([x, x[:2]]), w, a, b, bb)
