"""fused_lora.Embedding as a drop-in for loralib's lora.Embedding: strict state_dicts both ways, train and
eval outputs and LoRA gradients (loralib run in float64 is the yardstick, by the tolerance rule),
nn.Embedding's options as loralib passes them, initialisation, exact merging, wrapping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import Embedding, reference
from fused_lora.kernels import LAUNCHES

from helpers import assert_close_to_ref

loralib = pytest.importorskip("loralib")

V, D = 41, 29


def pair(device, r=5, **kw):
    """loralib's layer with random A and B, and ours loaded from its state_dict (strictly)."""
    theirs = loralib.Embedding(V, D, r=r, lora_alpha=7, **kw).to(device)
    nn.init.normal_(theirs.lora_A)
    ours = Embedding(V, D, r=r, lora_alpha=7, device=device, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def ids(device, shape=(3, 13)):
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, V, shape, generator=g)
    idx.view(-1)[::4] = 3  # repeated indices
    idx[0, 0] = 1
    return idx.to(device)


def forward_backward(layer, idx, dy):
    layer.zero_grad(set_to_none=True)
    y = layer(idx)
    y.backward(dy)
    return y.detach(), layer.lora_A.grad, layer.lora_B.grad


def test_state_dicts_load_strictly_both_ways(device):
    ours, theirs = pair(device)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.lora_A.shape == (5, V) and ours.lora_B.shape == (D, 5)
    back = loralib.Embedding(V, D, r=5, lora_alpha=7).to(device)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k


@pytest.mark.parametrize(
    "options",
    [{}, {"padding_idx": 3}, {"padding_idx": -2, "scale_grad_by_freq": True}, {"scale_grad_by_freq": True}],
    ids=["plain", "padding_idx", "padding_idx-neg+freq", "freq"],
)
def test_train_outputs_and_gradients_match_loralib(options, device):
    ours, theirs = pair(device, **options)
    idx = ids(device)
    dy = torch.randn(3, 13, D, device=device)
    before = LAUNCHES.copy()
    got = forward_backward(ours, idx, dy)
    launched = LAUNCHES - before
    assert launched["_lora_embedding_fwd_kernel"] == 1 and launched["_lora_embedding_bwd_kernel"] == 1, launched
    same = forward_backward(theirs, idx, dy)
    ref64 = forward_backward(copy.deepcopy(theirs).double(), idx, dy.double())
    for name, g, r, t in zip(("y", "dA", "dB"), got, ref64, same):
        assert_close_to_ref(name, g, r, t)
    if ours.padding_idx is not None:
        assert torch.count_nonzero(got[1][:, ours.padding_idx]) == 0


def test_max_norm_renormalises_w_and_a_as_loralib_does(device):
    """loralib passes max_norm to both lookups: the looked-up rows of W and columns of A are renormalised
    in place before they are read. Ours does the same to the same elements."""
    ours, theirs = pair(device, max_norm=1.5)
    with torch.no_grad():
        ours.lora_A.mul_(3)
        theirs.lora_A.mul_(3)
    idx = ids(device)
    dy = torch.randn(3, 13, D, device=device)
    ref64_layer = copy.deepcopy(theirs).double()
    got = forward_backward(ours, idx, dy)
    same = forward_backward(theirs, idx, dy)
    ref64 = forward_backward(ref64_layer, idx, dy.double())
    for name, g, r, t in zip(("y", "dA", "dB"), got, ref64, same):
        assert_close_to_ref(name, g, r, t)
    used = idx.unique()
    assert_close_to_ref("renormed W", ours.weight, ref64_layer.weight, theirs.weight)
    assert_close_to_ref("renormed A", ours.lora_A, ref64_layer.lora_A, theirs.lora_A)
    assert (ours.weight[used].norm(dim=1) <= 1.5 + 1e-5).all()
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[used.cpu()] = False
    assert ours.lora_A[:, untouched.to(device)].abs().max() > 0.1, "columns not looked up must stay as they were"


def test_eval_merges_like_loralib_and_round_trips_exactly(device):
    ours, theirs = pair(device, padding_idx=0)
    w0 = ours.weight.detach().clone()
    idx = ids(device)
    y_train = ours(idx).detach()
    ours.eval()
    theirs.eval()
    assert ours.merged and theirs.merged
    ref64 = copy.deepcopy(theirs).double()
    assert_close_to_ref("merged W", ours.weight, ref64.weight, theirs.weight)
    with torch.no_grad():
        assert_close_to_ref("eval y", ours(idx), ref64(idx), theirs(idx))
        assert_close_to_ref("eval y vs train y", ours(idx), ref64(idx), y_train)
    for _ in range(5):
        ours.train()
        ours.eval()
    ours.train()
    assert not ours.merged and torch.equal(ours.weight, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_round_trip_is_bit_exact(dtype):
    layer = Embedding(300, 24, r=4, lora_alpha=8, dtype=dtype, padding_idx=7)
    nn.init.normal_(layer.lora_A)
    w0 = layer.weight.detach().clone()
    layer.merge()
    expected = (w0.float() + reference.merge_delta(layer.lora_A, layer.lora_B, 2.0).t()).to(dtype)
    assert torch.equal(layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       w0.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip


def test_initialisation_freezing_and_rank_zero(device):
    layer = Embedding(V, D, r=4, padding_idx=2, device=device)
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    assert 0.5 < layer.lora_B.std().item() < 1.5  # nn.init.normal_ (std 1), as loralib
    assert torch.count_nonzero(layer.weight[2]) == 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert layer.scaling == 1 / 4  # loralib's defaults: lora_alpha = 1
    plain = Embedding(V, D, device=device)  # r = 0: an nn.Embedding
    assert not hasattr(plain, "lora_A") and plain.weight.requires_grad
    idx = ids(device)
    torch.testing.assert_close(plain(idx), nn.functional.embedding(idx, plain.weight))
    given = torch.randn(V, D, device=device)
    assert torch.equal(Embedding(V, D, r=2, _weight=given.clone()).weight, given)  # loralib re-draws it
    assert Embedding(V, D, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


def test_from_embedding_shares_weight_and_options(device):
    base = nn.Embedding(V, D, padding_idx=1, max_norm=100.0, device=device).half()
    layer = Embedding.from_embedding(base, r=3, lora_alpha=6)
    assert layer.weight is base.weight and not base.weight.requires_grad
    assert (layer.padding_idx, layer.max_norm, layer.lora_A.dtype) == (1, 100.0, torch.float32)
    idx = ids(device)
    torch.testing.assert_close(layer(idx), base(idx))  # A = 0 at start
    with pytest.raises(TypeError, match="already"):
        Embedding.from_embedding(layer)
    with pytest.raises(TypeError, match=r"wraps an nn\.Embedding, got Linear"):
        Embedding.from_embedding(nn.Linear(2, 2))
    default = Embedding.from_embedding(nn.Embedding(V, D, device=device))  # from_linear's (PEFT's) defaults
    assert (default.r, default.lora_alpha) == (8, 8)


def test_layer_errors(device):
    with pytest.raises(ValueError, match="sparse=True is not supported with r > 0"):
        Embedding(V, D, r=2, sparse=True)
    assert Embedding(V, D, sparse=True).sparse  # r = 0: nn.Embedding's sparse gradients
    with pytest.raises(ValueError, match="r must be >= 0"):
        Embedding(V, D, r=-1)
    layer = Embedding(V, D, r=2, device=device)
    for mode in ("train", "eval"):  # merged (eval) layers check their indices too
        getattr(layer, mode)()
        with pytest.raises(fused_lora.IndexOutOfRangeError, match=r"index 41 at position \(1,\)"):
            layer(torch.tensor([0, V], device=device))
        with pytest.raises(TypeError, match="int64 or int32"):
            layer(torch.tensor([0.0, 1.0], device=device))


def test_training_step_updates_only_adapters(device):
    layer = Embedding(V, D, r=3, lora_alpha=3, device=device)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    w0 = layer.weight.detach().clone()
    idx, target = ids(device), torch.randn(3, 13, D, device=device)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(layer(idx), target).backward()
        opt.step()
    assert torch.equal(layer.weight, w0) and torch.count_nonzero(layer.lora_A) > 0


def test_index_check_reads_back_once_per_step(device):
    """The clear out-of-range error needs the indices' min and max on the host: one read per forward
    (it was two, min and max apart: two GPU waits); nothing else in a step reads a value back."""
    from helpers import host_syncs

    emb = fused_lora.Embedding(50, 16, r=2, lora_alpha=4, device=device)
    idx = torch.randint(0, 50, (4, 7), device=device)
    step = lambda: emb(idx).sum().backward()
    step()
    assert host_syncs(step) == ["tolist"]
