"""LoRALinear as a drop-in for loralib's lora.Linear: names, shapes, init, merging, wrapping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import LoRALinear, reference

from helpers import assert_close_to_ref

loralib = pytest.importorskip("loralib")


def make_pair(device, r=6, fan_in_fan_out=False, bias=True):
    ours = LoRALinear(23, 17, r=r, lora_alpha=12, fan_in_fan_out=fan_in_fan_out, bias=bias, device=device)
    theirs = loralib.Linear(23, 17, r=r, lora_alpha=12, fan_in_fan_out=fan_in_fan_out, bias=bias).to(device)
    return ours, theirs


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_state_dict_round_trips_with_loralib(fan_in_fan_out, device):
    ours, theirs = make_pair(device, fan_in_fan_out=fan_in_fan_out)
    nn.init.normal_(theirs.lora_B)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 5, 23, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs2 = loralib.Linear(23, 17, r=6, lora_alpha=12, fan_in_fan_out=fan_in_fan_out).to(device)
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs2(x), ours(x), rtol=1e-5, atol=1e-5)


def test_initialisation_and_freezing(device):
    layer = LoRALinear(400, 30, r=8, lora_alpha=16, device=device)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=√5): sqrt(6 / ((1 + 5) · fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert not layer.weight.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"bias", "lora_A", "lora_B"}  # loralib leaves bias trainable too
    assert layer.scaling == 16 / 8
    assert LoRALinear(4, 4, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4


def test_constructor_matches_loralib(device):
    """The same call builds the same layer in both: defaults (r=0, lora_alpha=1, no dropout,
    merge_weights) and positional order (in, out, r, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights)."""
    for args, kwargs in [((12, 10), {}), ((12, 10, 4), {}), ((12, 10, 4, 2, 0.1, True, False), {}),
                         ((12, 10), {"r": 2, "bias": False})]:  # fmt: skip
        ours, theirs = LoRALinear(*args, **kwargs), loralib.Linear(*args, **kwargs)
        for attr in ("r", "lora_alpha", "fan_in_fan_out", "merge_weights"):
            assert getattr(ours, attr) == getattr(theirs, attr), (args, kwargs, attr)
        assert ours.lora_dropout_p == (theirs.lora_dropout.p if isinstance(theirs.lora_dropout, nn.Dropout) else 0)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }
        if ours.r:
            assert ours.scaling == theirs.scaling
    assert not hasattr(LoRALinear(12, 10), "lora_A")  # r = 0: a plain linear layer, as loralib's


def test_rank_zero_is_nn_linear(device):
    layer = LoRALinear(10, 7, r=0, device=device)
    assert not hasattr(layer, "lora_A") and layer.weight.requires_grad
    x = torch.randn(3, 10, device=device)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_eval_merges_and_train_unmerges(device):
    layer = LoRALinear(33, 21, r=5, lora_dropout=0.2, device=device)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 33, device=device)
    y_unmerged = fused_lora.lora_linear(
        x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias, training=False
    )
    layer.eval()
    assert layer.merged
    delta = reference.merge_delta(layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer.weight, w0 + delta)
    assert_close_to_ref("merged y", layer(x), y_unmerged.double(), y_unmerged)
    layer.eval()  # idempotent
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
    layer.merge()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=4 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_round_trip_is_exact(dtype, fan_in_fan_out):
    """The delta is added in fp32 and rounded once; a round trip restores W bit for bit, even after
    many eval/train toggles (plain rounding would drift by an ulp per trip)."""
    layer = LoRALinear(64, 48, r=4, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    nn.init.normal_(layer.lora_B, std=0.05)
    w0 = layer.weight.detach().clone()
    layer.merge()
    w_nk = w0.t() if fan_in_fan_out else w0
    expected = (w_nk.float() + reference.merge_delta(layer.lora_A, layer.lora_B, layer.scaling)).to(dtype)
    assert torch.equal(layer._weight_nk(), expected)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    for _ in range(20):
        layer.eval()
        layer.train()
    assert torch.equal(layer.weight, w0)


def test_merge_weights_false_never_merges(device):
    layer = LoRALinear(9, 9, r=2, merge_weights=False, device=device)
    layer.eval()
    assert not layer.merged


def test_from_linear_shares_the_weight(device):
    base = nn.Linear(31, 19, device=device)
    layer = LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad
    assert layer.lora_A.device == base.weight.device and layer.lora_A.dtype == torch.float32
    x = torch.randn(5, 31, device=device)
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at start
    half = LoRALinear.from_linear(nn.Linear(8, 8).half())
    assert half.lora_A.dtype == torch.float32 and half.weight.dtype == torch.float16
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="already"):
        LoRALinear.from_linear(layer)


def test_training_step_updates_only_adapters(device):
    layer = LoRALinear(26, 14, r=3, lora_dropout=0.1, device=device)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    w0 = layer.weight.detach().clone()
    x, target = torch.randn(12, 26, device=device), torch.randn(12, 14, device=device)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    assert torch.equal(layer.weight, w0)
    assert torch.count_nonzero(layer.lora_B) > 0


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["linear", "linear+dropout", "conv2d"])
def test_a_training_step_reads_nothing_back(device, backend, kind):
    """No item(), tolist(), nonzero or bool-mask indexing in a step: on a GPU each is a wait for the host
    (the dropout seed is drawn on the device for the same reason)."""
    from helpers import host_syncs

    if kind == "conv2d":
        layer, x = fused_lora.Conv2d(3, 4, 3, r=2, lora_alpha=4, device=device), torch.randn(2, 3, 8, 8, device=device)
    else:
        p = 0.1 if kind == "linear+dropout" else 0.0
        layer = fused_lora.LoRALinear(24, 20, r=3, lora_alpha=6, lora_dropout=p, device=device)
        x = torch.randn(5, 24, device=device, requires_grad=True)

    def step():
        with fused_lora.use_backend(backend):
            layer(x).square().mean().backward()

    step()
    assert host_syncs(step) == []
