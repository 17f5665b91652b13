"""fused_lora.Conv1d/2d/3d: loralib's shapes and state_dicts (Conv2d, and k = 1 in 1-D/3-D), outputs and
gradients (LoRA and input) against loralib and the float64 reference, working 1-D/3-D kernels where
loralib's crash, dropout with the mask checked, exact merging, wrapping, bad kernel sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fused_lora import Conv1d, Conv2d, Conv3d, reference_layers
from fused_lora.kernels import LAUNCHES

from helpers import assert_close_to_ref

loralib = pytest.importorskip("loralib")

CLASSES = {1: (Conv1d, "Conv1d"), 2: (Conv2d, "Conv2d"), 3: (Conv3d, "Conv3d")}
SPATIAL = {1: (23,), 2: (11, 9), 3: (7, 6, 5)}


def randomize(layer, seed=4):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def grads(layer, x, dy):
    """y and the gradients of x, lora_A, lora_B."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


def check_against(ours, ref_layer, x, *, p=0.0, seed=0):
    """Ours vs `ref_layer` (loralib's, or ours) run in float64 and in x's dtype, by the tolerance rule.
    With dropout, every run draws the same mask (the same seed and the same draw)."""
    dy = torch.randn_like(ours(x))
    runs = []
    ref64 = copy.deepcopy(ref_layer).double()
    for layer, xx, dd in ((ours, x, dy), (ref64, x.double(), dy.double()), (ref_layer, x, dy)):
        torch.manual_seed(seed)
        runs.append(grads(layer, xx, dd))
    for name, g, r64, same in zip(("y", "dX", "dA", "dB"), *runs):
        assert_close_to_ref(name, g, r64, same)
    return runs[0]


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_matches_loralib_both_ways(groups, device):
    """loralib's own shapes: state_dicts load strictly both ways; train and eval outputs, input and LoRA
    gradients equal loralib's (stride, padding, groups)."""
    theirs = loralib.Conv2d(6, 10, 3, r=2, lora_alpha=5, stride=2, padding=1, groups=groups).to(device)
    randomize(theirs)
    ours = Conv2d(6, 10, 3, r=2, lora_alpha=5, stride=2, padding=1, groups=groups, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["lora_A", "lora_B", "conv.weight", "conv.bias"]
    x = torch.randn(2, 6, 13, 11, device=device)
    check_against(ours, theirs, x)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close_to_ref("eval y", ours(x), copy.deepcopy(theirs).double()(x.double()), theirs(x))
    ours.train()
    back = loralib.Conv2d(6, 10, 3, r=2, lora_alpha=5, groups=groups).to(device)
    back.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("dims", [1, 3])
def test_pointwise_conv1d_conv3d_match_loralib(dims, device):
    """With k = 1 loralib's Conv1d/Conv3d work, and their shapes are ours: strict loads both ways, parity."""
    ours_cls, name = CLASSES[dims]
    theirs = getattr(loralib, name)(5, 7, 1, r=3, lora_alpha=6).to(device)
    randomize(theirs)
    ours = ours_cls(5, 7, 1, r=3, lora_alpha=6, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    check_against(ours, theirs, torch.randn(2, 5, *SPATIAL[dims], device=device))
    getattr(loralib, name)(5, 7, 1, r=3, lora_alpha=6).load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_work_where_loralib_crashes(dims, device):
    """k = 3: loralib's B·A has in·out·k² elements, not W's in·out·k^d, and its forward fails; ours has
    A [r·k, in·k^(d-1)], B [out·k, r·k], and runs and matches the float64 reference."""
    ours_cls, name = CLASSES[dims]
    x = torch.randn(2, 4, *SPATIAL[dims], device=device)
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        getattr(loralib, name)(4, 6, 3, r=2)(x.cpu())
    ours = ours_cls(4, 6, 3, r=2, lora_alpha=3, padding=1, device=device)
    randomize(ours)
    assert ours.lora_A.shape == (2 * 3, 4 * 3 ** (dims - 1)) and ours.lora_B.shape == (6 * 3, 2 * 3)
    check_against(ours, ours, x)
    y64 = reference_layers.lora_conv(copy.deepcopy(ours.conv).double(), x.double(), ours.lora_A.double(),
                                     ours.lora_B.double(), ours.scaling)  # fmt: skip
    assert_close_to_ref("y vs reference_layers", ours(x), y64, ours(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_settings_odd_shapes(dims, device):
    """groups, stride, dilation and a reflect padding, odd channel counts and sizes."""
    ours_cls, _ = CLASSES[dims]
    ours = ours_cls(6, 9, 3, r=3, lora_alpha=2, stride=2, padding=2, dilation=2, groups=3,
                    padding_mode="reflect", device=device)  # fmt: skip
    randomize(ours)
    check_against(ours, ours, torch.randn(3, 6, *SPATIAL[dims], device=device))


@pytest.mark.parametrize("dims", [1, 2])
def test_dropout_applies_to_the_low_rank_input(dims, device):
    """y = conv(x, W) + bias + conv(dropout(x), ΔW): checked against the reference with the very mask
    nn.Dropout drew (same seed), against a float64 run, and shown to differ from no dropout. Eval: none."""
    ours_cls, _ = CLASSES[dims]
    ours = ours_cls(4, 5, 3, r=2, lora_alpha=4, lora_dropout=0.4, device=device)
    randomize(ours)
    x = torch.randn(2, 4, *SPATIAL[dims], device=device)
    got = check_against(ours, ours, x, p=0.4, seed=11)
    torch.manual_seed(11)
    mask = F.dropout(torch.ones_like(x), 0.4) != 0
    y_ref = reference_layers.lora_conv(ours.conv, x, ours.lora_A, ours.lora_B, ours.scaling, 0.4, mask)
    torch.testing.assert_close(got[0], y_ref.detach(), rtol=1e-5, atol=1e-5)
    y_nodrop = reference_layers.lora_conv(ours.conv, x, ours.lora_A, ours.lora_B, ours.scaling)
    assert not torch.allclose(got[0], y_nodrop.detach(), atol=1e-3), "dropout had no effect"
    ours.eval()
    torch.testing.assert_close(ours(x), y_nodrop)


def test_merged_agrees_with_unmerged_to_the_delta_rounding(device):
    """The unmerged forward convolves with round(W + ΔW) from one fp32 addmm (torch's fp32 GEMM, as any
    fp32 layer); merge() writes round(W + ΔW) with ΔW multiplied in float64 (the same bits under every
    setting). The two weights differ by no more than the fp32 product's rounding error bound,
    (r·k + 2)·eps·(|W| + s·|B|·|A|), so the outputs agree to fp32 rounding."""
    ours = Conv2d(3, 5, 3, r=2, lora_alpha=4, device=device)
    randomize(ours)
    x = torch.randn(2, 3, 8, 7, device=device)
    w0 = ours.conv.weight.detach().clone()
    y, w_forward = ours(x), ours.merged_weight().detach()
    ours.eval()
    A, B = ours.lora_A.detach(), ours.lora_B.detach()
    size = (B.abs() @ A.abs() * ours.scaling).view(w0.shape) + w0.abs()
    bound = (A.shape[0] + 2) * torch.finfo(torch.float32).eps * size
    assert ((ours.conv.weight - w_forward).abs() <= bound).all()
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_merge_round_trip_is_bit_exact(dtype, channels_last):
    ours = Conv2d(8, 12, 3, r=4, lora_alpha=8, dtype=dtype)
    if channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    randomize(ours)
    w0 = ours.conv.weight.detach().clone()
    for _ in range(10):
        ours.eval()
        ours.train()
    assert torch.equal(ours.conv.weight, w0)
    assert ours.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def _trained(dtype=torch.bfloat16, seed=4):
    layer = Conv2d(4, 6, 3, r=2, lora_alpha=4, dtype=dtype)
    randomize(layer, seed)
    return layer


def test_load_state_dict_keeps_w_in_step_with_merged():
    """As for LoRALinear: a checkpoint loaded into an eval-mode (merged) layer is re-merged, adapters alone
    loaded into a merged layer are merged in place of the old ones, a merged layer's state_dict carries
    the record (it loads merged, not merged twice, and unmerges bit for bit)."""
    x = torch.randn(2, 4, 7, 7, dtype=torch.bfloat16)
    src = _trained()
    w0 = src.conv.weight.detach().clone()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    want = src(x).detach()

    target = _trained(seed=5).eval()  # other adapters, merged
    target.load_state_dict(state)
    assert target.merged and torch.equal(target(x), want)
    target.train()
    assert torch.equal(target.conv.weight, w0) and torch.equal(target(x), want)

    target = _trained(seed=5)
    target.conv.load_state_dict({"weight": w0, "bias": state["conv.bias"]})
    target.eval()
    missing, unexpected = target.load_state_dict({k: v for k, v in state.items() if "lora_" in k}, strict=False)
    assert missing == ["conv.weight", "conv.bias"] and not unexpected
    assert target.merged and torch.equal(target(x), want)
    target.train()
    assert torch.equal(target.conv.weight, w0)

    src.eval()
    merged_state = src.state_dict()
    assert list(merged_state) == ["lora_A", "lora_B", "unmerge_index", "unmerge_value", "conv.weight", "conv.bias"]
    for mode in ("train", "eval"):
        fresh = getattr(_trained(seed=5), mode)()
        fresh.load_state_dict(merged_state, strict=True)
        assert fresh.merged == (mode == "eval") and torch.equal(fresh(x), want)
        fresh.train()
        assert torch.equal(fresh.conv.weight, w0)
    twin = copy.deepcopy(src)
    twin.load_state_dict(merged_state)
    assert twin.merged and torch.equal(twin(x), want)
    twin.train()
    assert torch.equal(twin.conv.weight, w0)


def test_init_and_rank_zero(device):
    ours = Conv2d(16, 8, 3, r=4, device=device)
    assert torch.count_nonzero(ours.lora_B) == 0 and ours.lora_A.abs().max() <= 1 / (16 * 3) ** 0.5
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "conv.bias"}
    assert ours.scaling == 1 / 4
    plain = Conv1d(3, 4, 5, device=device)  # r = 0
    x = torch.randn(2, 3, 17, device=device)
    torch.testing.assert_close(plain(x), plain.conv(x))
    assert plain.conv.weight.requires_grad and not hasattr(plain, "lora_A")


def test_from_conv_shares_the_module(device):
    base = nn.Conv3d(3, 4, (2, 2, 2), padding=1, device=device).half()
    layer = Conv3d.from_conv(base, r=2, lora_alpha=4, lora_dropout=0.1)
    assert layer.conv is base and not base.weight.requires_grad and layer.lora_A.dtype == torch.float32
    x = torch.randn(1, 3, 4, 5, 6, device=device).half()
    torch.testing.assert_close(layer.eval()(x), base(x))
    with pytest.raises(TypeError, match=r"wraps an nn\.Conv2d, got Conv3d"):
        Conv2d.from_conv(base)
    default = Conv2d.from_conv(nn.Conv2d(2, 2, 3, device=device))  # from_linear's (PEFT's) defaults
    assert (default.r, default.lora_alpha) == (8, 8)

    class Custom(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="got Custom"):
        Conv2d.from_conv(Custom(2, 2, 3))
    with pytest.raises(ValueError, match="lazy"):
        Conv2d.from_conv(nn.LazyConv2d(4, 3))
    with pytest.raises(ValueError, match=r"\(1, 3\) is not the same in every dimension"):
        Conv2d.from_conv(nn.Conv2d(2, 2, (1, 3)))


@pytest.mark.parametrize(
    ("cls", "kernel_size", "error", "pattern"),
    [
        (Conv2d, (3, 5), ValueError, r"\(3, 5\) is not the same in every dimension.*use an int kernel_size"),
        (Conv3d, (3, 3, 1), ValueError, "not the same in every dimension"),
        (Conv1d, (3, 3), ValueError, r"must be an int or 1 ints for a 1-D convolution"),
        (Conv2d, 2.5, TypeError, "kernel_size must be an int"),
        (Conv2d, True, TypeError, "kernel_size must be an int"),
        (Conv2d, 0, ValueError, "kernel_size must be >= 1"),
    ],
)
def test_kernel_sizes_loralib_cannot_express(cls, kernel_size, error, pattern):
    with pytest.raises(error, match=pattern):
        cls(4, 4, kernel_size, r=2)


def test_uniform_tuple_kernel_is_accepted():
    assert Conv2d(4, 4, (3, 3), r=2).lora_A.shape == Conv2d(4, 4, 3, r=2).lora_A.shape
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        Conv2d(4, 4, 3, r=2, lora_dropout=1.0)


def test_no_kernel_launched(device):
    """Convolutions run on torch (cuDNN on a GPU): the delta is weight-sized."""
    before = LAUNCHES.copy()
    Conv2d(3, 4, 3, r=2, device=device)(torch.randn(1, 3, 6, 6, device=device)).sum().backward()
    assert LAUNCHES - before == {}
