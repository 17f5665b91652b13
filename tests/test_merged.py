"""MergedLinear: loralib's lora.MergedLinear (fused q/k/v) on the fused kernels — interchangeable with
loralib's layer (state_dicts, outputs, gradients, merging), each output column multiplying only its own
group's adapter in the GEMM's epilogue, on group boundaries that cut tiles."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import MergedLinear, impl, reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import LAUNCHES, dropout_mask, tuning

from helpers import assert_close_to_ref, f64, host_syncs

loralib = pytest.importorskip("loralib")

ENABLES = [[True, False, True], [True, True, True], [False, True, False, False]]


def pair(enable, fan_in_fan_out=False, r=5, group=13, device="cpu"):
    """Ours and loralib's, same weights (loralib's B made non-zero so the adapters count)."""
    out = group * len(enable)  # 13 rows a group: boundaries cut every tile
    theirs = loralib.MergedLinear(23, out, r=r, lora_alpha=2 * r, lora_dropout=0.0, enable_lora=enable,
                                  fan_in_fan_out=fan_in_fan_out).to(device)  # fmt: skip
    if hasattr(theirs, "lora_B"):
        nn.init.normal_(theirs.lora_B)
    ours = MergedLinear(
        23, out, r=r, lora_alpha=2 * r, enable_lora=enable, fan_in_fan_out=fan_in_fan_out, device=device
    )
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("enable", ENABLES, ids=["TFT", "TTT", "FTFF"])
def test_interchangeable_with_loralib(enable, fan_in_fan_out, device):
    ours, theirs = pair(enable, fan_in_fan_out, device=device)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    x = torch.randn(3, 7, 23, device=device)
    xs, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 7, ours.out_features, device=device)
    before = LAUNCHES.copy()
    y = ours(xs)
    y.backward(dy)
    assert (LAUNCHES - before)["_shrink_kernel"] == 1, "the kernels ran"
    theirs(xt).backward(dy)
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
    for got, want in (
        (xs.grad, xt.grad),
        (ours.lora_A.grad, theirs.lora_A.grad),
        (ours.lora_B.grad, theirs.lora_B.grad),
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # eval merges as loralib does (same outputs), train unmerges exactly, and states load the other way
    w0 = ours.weight.detach().clone()
    ours.eval(), theirs.eval()
    assert ours.merged
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.train()
    assert torch.equal(ours.weight, w0)
    other = loralib.MergedLinear(23, ours.out_features, r=5, lora_alpha=10, enable_lora=enable,
                                 fan_in_fan_out=fan_in_fan_out).to(device)  # fmt: skip
    other.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(other(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["fused", "hybrid"])
@pytest.mark.parametrize(
    ("dtype", "lora_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)],
)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_parity_with_the_fp64_reference(implementation, dtype, lora_dtype, p, device):
    """Odd group width (13 rows), r = 5, bias, dropout (the kernels' own mask): y, dX, dA, dB against
    float64 by the tolerance rule."""
    layer = MergedLinear(53, 39, r=5, lora_alpha=7, lora_dropout=p, enable_lora=[True, False, True], device=device,
                         dtype=dtype, lora_dtype=lora_dtype)  # fmt: skip
    nn.init.normal_(layer.lora_B)
    x = torch.randn(37, 53, device=device).to(dtype).requires_grad_()
    dy = torch.randn(37, 39, device=device).to(dtype)
    torch.manual_seed(11)
    with impl.use_impl(implementation):
        y = layer(x)
        y.backward(dy)
    mask = None
    if p > 0:
        torch.manual_seed(11)
        mask = dropout_mask(_draw_seed(x.device), 37, 53, p)
    args = (layer.weight.detach(), layer.lora_A.detach(), layer.block_b().detach(), layer.scaling, layer.bias.detach())

    def ref(xx, w, a, b_full, s, bias):
        xx, a, b_full = (t.detach().clone().requires_grad_() for t in (xx, a, b_full))
        out = reference.lora_linear(xx, w, a, b_full, s, bias, p, dropout_mask=mask)
        out.backward(dy.to(out.dtype))
        return out, xx.grad, a.grad, b_full.grad[layer.lora_ind].view(2, 13, 2, 5).diagonal(dim1=0, dim2=2)

    r64 = ref(*f64(x, args[0], args[1], args[2]), layer.scaling, args[4].double())
    same = ref(x, args[0], args[1], args[2], layer.scaling, args[4])
    db = layer.lora_B.grad.view(2, 13, 5).permute(1, 2, 0)  # the blocks, as the reference's diagonal
    for name, got, want, torch_same in zip(("y", "dX", "dA", "dB"), (y, x.grad, layer.lora_A.grad, db), r64, same):
        assert_close_to_ref(name, got, want, torch_same)


@pytest.mark.parametrize("implementation", ["fused", "hybrid"])
@pytest.mark.parametrize("path", ["tma", "pointer"])
def test_each_tile_multiplies_only_its_groups_rank_columns(implementation, path, device):
    """The epilogue walks only the rank slices of the groups a tile's columns touch. Seen by handing it
    a B that is NOT zero outside each group's rank columns, with groups of 32 columns on 32-column tiles
    and 16 rank columns per group (one slice): each tile then adds exactly its own group's product, not
    the whole of B's (which a kernel ignoring the groups would)."""
    if device != "cpu":
        pytest.skip("forces the interpreter's 32x32 tiles")
    from fused_lora.kernels import configs

    torch.manual_seed(0)
    group_n = 32  # groups as enable_lora = [True, False, True, True] would make them
    bounds = torch.tensor([0, 16, 16, 32, 48], dtype=torch.int32)
    x, w = torch.randn(29, 40), torch.randn(128, 40) / 7
    a, b_dense = torch.randn(48, 40) / 7, torch.randn(128, 48)
    in_group = torch.zeros(128, 48, dtype=torch.bool)
    for q in range(4):
        in_group[q * group_n : (q + 1) * group_n, bounds[q] : bounds[q + 1]] = True
    tiles = [tuning.force("gemm", configs.name(configs.GEMM_INTERPRET[0])),
             tuning.force("low_rank", configs.name(configs.LOW_RANK_INTERPRET[0]))]  # fmt: skip
    with impl.use_impl(implementation), tuning.force("gemm_path", path), tiles[0], tiles[1]:
        y = fused_lora.lora_linear(x, w, a, b_dense, 0.7, groups=(group_n, bounds))
    torch.testing.assert_close(y, reference.lora_linear(x, w, a, b_dense * in_group, 0.7), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y, reference.lora_linear(x, w, a, b_dense, 0.7), rtol=1e-2, atol=1e-2)


def test_merge_round_trip_is_exact_and_survives_copies(device):
    layer = MergedLinear(33, 24, r=4, lora_alpha=8, enable_lora=[True, False, True], device=device,
                         dtype=torch.float16, lora_dtype=torch.float32)  # fmt: skip
    nn.init.normal_(layer.lora_B, std=3.0)
    w0 = layer.weight.detach().clone()
    layer.eval()
    clone = copy.deepcopy(layer)
    layer.train(), clone.train()
    assert torch.equal(layer.weight, w0) and torch.equal(clone.weight, w0)


def test_built_on_meta_then_materialised(device):
    """FSDP2's / skip_init's flow: construct on the meta device, to_empty, reset_parameters, load a state.
    lora_ind and group_bounds (not in the state_dict) come back right, and so does the forward."""
    ref = MergedLinear(8, 24, r=2, lora_alpha=4, enable_lora=[True, False, True], device=device)
    nn.init.normal_(ref.lora_B)
    with torch.device("meta"):
        layer = MergedLinear(8, 24, r=2, lora_alpha=4, enable_lora=[True, False, True])
    layer = layer.to_empty(device=device)
    layer.reset_parameters()
    layer.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(layer.lora_ind, ref.lora_ind) and torch.equal(layer.group_bounds, ref.group_bounds)
    x = torch.randn(3, 8, device=device)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    assert layer.double().group_bounds.dtype == torch.int32 and layer.lora_ind.device == ref.weight.device


def test_disabled_or_rank_zero_is_a_plain_linear(device):
    for layer in (MergedLinear(10, 6, r=0, enable_lora=[True, True], device=device),
                  MergedLinear(10, 6, r=3, enable_lora=[False, False], device=device)):  # fmt: skip
        assert not hasattr(layer, "lora_A")
        x = torch.randn(4, 10, device=device)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_enable_lora_takes_numpy_bools():
    """As loralib does: numpy bools in a list, or a numpy array."""
    np = pytest.importorskip("numpy")
    for enable in (list(np.array([True, False, True])), np.array([True, False, True]), [1, 0, np.True_]):
        assert MergedLinear(12, 30, r=4, enable_lora=enable).enable_lora == [True, False, True]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"length of enable_lora \(4\) must divide out_features \(6\)"):
        MergedLinear(8, 6, r=2, enable_lora=[True, False, True, False])
    with pytest.raises(TypeError, match="enable_lora must be a non-empty list of bools"):
        MergedLinear(8, 6, r=2, enable_lora=[])
    with pytest.raises(TypeError, match="enable_lora must hold bools"):
        MergedLinear(8, 6, r=2, enable_lora=["yes", "no"])
    with pytest.raises(TypeError, match="r must be an int"):
        MergedLinear(8, 6, r=2.5, enable_lora=[True])
    with pytest.raises(TypeError, match="from_linear is not supported"):
        MergedLinear.from_linear(nn.Linear(8, 6))


def test_adapter_files_round_trip_with_peft(tmp_path, device):
    """save_adapter writes a MergedLinear as PEFT's rank-r·g adapter with the block-structured B: PEFT
    loads it on the same base and computes the same outputs; load_adapter reads it back into the blocks."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(23, 39), nn.ReLU(), nn.Linear(39, 8)).to(device)
    model = copy.deepcopy(base)
    merged = MergedLinear(23, 39, r=4, lora_alpha=6, enable_lora=[True, False, True], device=device)
    merged.weight, merged.bias = model[0].weight, model[0].bias
    nn.init.normal_(merged.lora_B)
    model[0] = merged
    fused_lora.save_adapter(model, tmp_path)
    x = torch.randn(5, 23, device=device)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with fused_lora.use_backend("reference"):
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-5)
    fresh = copy.deepcopy(model)
    nn.init.zeros_(fresh[0].lora_B)
    fresh[0].lora_alpha = 1  # the file's scaling is taken, converted back to rank r
    fused_lora.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh[0].lora_B, model[0].lora_B) and fresh[0].lora_alpha == 6


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("inference_built", [False, True])
def test_training_steps_make_no_host_sync(device, backend, inference_built):
    """A GPU must never wait for the host inside a MergedLinear step: block_b indexed with a bool mask (a
    nonzero per forward), and bounds built under inference_mode were re-read (tolist) on every call.
    After the first call (which checks the bounds once) nothing reads a value back."""
    ctx = torch.inference_mode() if inference_built else contextlib.nullcontext()
    with ctx:
        layer = MergedLinear(24, 3 * 20, r=3, lora_alpha=6, enable_lora=[True, False, True], device=device)
    layer = _materialise(layer) if inference_built else layer
    x = torch.randn(5, 24, device=device)

    def step():
        with fused_lora.use_backend(backend):
            layer(x).square().mean().backward()

    step()
    assert host_syncs(step) == []


def _materialise(layer):
    """An inference-built layer's parameters as normal tensors (what loading a checkpoint does); its
    buffers stay inference tensors."""
    for name, p in list(layer.named_parameters(recurse=False)):
        setattr(layer, name, torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad))
    return layer


def test_moves_keep_the_index_buffers_storage(device):
    """`.to(same device)` or `.float()` rebuilt lora_ind and group_bounds as new tensors: a CUDA graph
    captured before would read freed memory. They are refreshed in place now."""
    layer = MergedLinear(24, 3 * 20, r=3, lora_alpha=6, enable_lora=[True, False, True], device=device)
    ptrs = (layer.lora_ind.data_ptr(), layer.group_bounds.data_ptr())
    layer.to(device)
    layer.float()
    assert (layer.lora_ind.data_ptr(), layer.group_bounds.data_ptr()) == ptrs
    assert layer.group_bounds.tolist() == [0, 3, 3, 6]
