"""Issue 15, items 5-7 and the constructor checks: merging under autocast / TF32 settings, tied weights at
the layer level, the hybrid's fp16 overflow, and bad constructor arguments found at construction."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_lora
from fused_lora import Conv2d, Embedding, LoRALinear, MergedLinear, reference

AUTOCAST_DTYPE = torch.bfloat16


def _randomize(layer: nn.Module, seed: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


LAYERS = {
    "linear": lambda d: LoRALinear(37, 29, r=3, lora_alpha=5, device=d),
    "linear-fan-in-fan-out": lambda d: LoRALinear(37, 29, r=3, lora_alpha=5, fan_in_fan_out=True, device=d),
    "merged": lambda d: MergedLinear(37, 30, r=2, lora_alpha=3, enable_lora=[True, False, True], device=d),
    "embedding": lambda d: Embedding(41, 13, r=3, lora_alpha=5, device=d),
    "conv2d": lambda d: Conv2d(5, 7, 3, r=2, lora_alpha=3, device=d),
}


def _weight(layer: nn.Module) -> torch.Tensor:
    return layer.conv.weight if isinstance(layer, Conv2d) else layer.weight


# --- item 5: merge arithmetic is fp32 whatever the autocast / TF32 settings, and round-trips exactly ---


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_inside_autocast_is_the_plain_merge_and_round_trips(kind, device):
    """eval() inside an autocast region used to form ΔW in bf16: the merged W differed from the plain
    merge, and train() outside the region (ΔW in fp32 again) left thousands of elements of W changed."""
    layer = _randomize(LAYERS[kind](device))
    w0 = _weight(layer).detach().clone()
    plain = copy.deepcopy(layer)
    plain.merge()
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        layer.eval()
    assert layer.merged
    assert torch.equal(_weight(layer), _weight(plain)), "merged under autocast differs from the plain merge"
    layer.train()
    changed = (_weight(layer) != w0).sum().item()
    assert changed == 0, f"{changed} of {w0.numel()} elements of W changed by eval() under autocast + train()"
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):  # and the other way round
        layer.merge()
    layer.unmerge()
    assert torch.equal(_weight(layer), w0)


@pytest.fixture
def reduced_fp32_matmuls():
    """Every switch that lowers torch's fp32 matmul precision, turned on for the test and restored: TF32 on
    CUDA, oneDNN's bf16 for fp32 on CPUs that have it. (On a CPU without bf16 support the CPU switch
    changes nothing; on a GPU the TF32 one does.)"""
    before = torch.get_float32_matmul_precision()
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = (cuda.fp32_precision, mkldnn.fp32_precision)
    torch.set_float32_matmul_precision("medium")
    cuda.fp32_precision, mkldnn.fp32_precision = "tf32", "bf16"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
        cuda.fp32_precision, mkldnn.fp32_precision = saved


@pytest.mark.parametrize("kind", list(LAYERS))
def test_merge_ignores_reduced_precision_matmul_settings(kind, device, request):
    layer = _randomize(LAYERS[kind](device))
    w0 = _weight(layer).detach().clone()
    plain = copy.deepcopy(layer)
    plain.merge()
    request.getfixturevalue("reduced_fp32_matmuls")
    layer.merge()
    assert torch.equal(_weight(layer), _weight(plain))
    layer.unmerge()
    assert torch.equal(_weight(layer), w0)


def test_merged_weight_is_w_plus_the_exact_delta_rounded_once():
    """ΔW is the float64 product rounded once to fp32 (reference.merge_delta), W + ΔW rounded once."""
    layer = _randomize(LoRALinear(53, 41, r=5, lora_alpha=7, dtype=torch.bfloat16, lora_dtype=torch.float32))
    w0 = layer.weight.detach().clone()
    layer.merge()
    exact = (layer.lora_B.double() @ layer.lora_A.double() * layer.scaling).float()
    assert torch.equal(reference.merge_delta(layer.lora_A, layer.lora_B, layer.scaling), exact)
    assert torch.equal(layer.weight, (w0.float() + exact).to(torch.bfloat16))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_conv_forward_under_autocast_is_nn_conv_under_autocast(p, device):
    """The unmerged forward built W + s·B·A with an addmm that autocast ran in bf16; nn.Conv2d under
    autocast convolves in bf16 with its fp32 weight rounded once. Now W + ΔW is formed in fp32 and the
    convolution under autocast is nn.Conv2d's on that weight, bit for bit (dropout: the low-rank input's
    convolution with ΔW, as PEFT's, under the same autocast)."""
    layer = _randomize(Conv2d(5, 7, 3, r=2, lora_alpha=3, lora_dropout=p, padding=1, device=device))
    x = torch.randn(2, 5, 9, 8, device=device)
    conv = layer.conv
    with torch.no_grad():
        W, dW = conv.weight, layer.delta_weight()
        merged = torch.addmm(W.reshape(layer.lora_B.shape[0], -1), layer.lora_B, layer.lora_A, alpha=layer.scaling)
    torch.manual_seed(5)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        got = layer(x)
    torch.manual_seed(5)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE):
        if p > 0:
            want = F.conv2d(x, W, conv.bias, padding=1) + F.conv2d(F.dropout(x, p), dW, None, padding=1)
        else:
            want = F.conv2d(x, merged.view(W.shape), conv.bias, padding=1)
    assert got.dtype == want.dtype == AUTOCAST_DTYPE
    assert torch.equal(got, want)


# --- item 6: tied weights are not merged at the layer level ---


def _tied_head(device):
    emb = nn.Embedding(50, 16, device=device)
    head = nn.Linear(16, 50, bias=False, device=device)
    head.weight = emb.weight
    return emb, head


def test_from_linear_on_a_tied_head_is_not_merged_by_eval(device):
    """from_linear's default merge_weights=True merged ΔW into the embedding's table on eval()."""
    emb, head = _tied_head(device)
    lora = _randomize(LoRALinear.from_linear(head, r=4, lora_alpha=8))
    ids = torch.tensor([[1, 7, 49]], device=device)
    want_emb, w0 = emb(ids), emb.weight.detach().clone()
    h = torch.randn(3, 16, device=device)
    want_head = lora(h)
    with pytest.warns(RuntimeWarning, match=r"not merged .*also held by Embedding\(50, 16\).*tied weights"):
        lora.eval()
    assert not lora.merged and torch.equal(emb.weight, w0) and torch.equal(emb(ids), want_emb)
    assert torch.equal(lora(h), want_head)
    with pytest.raises(ValueError, match=r"LoRALinear.merge\(\): .*also held by Embedding\(50, 16\)"):
        lora.merge()
    assert torch.equal(emb.weight, w0)


def test_from_embedding_on_a_tied_table_is_not_merged_by_eval(device):
    emb, head = _tied_head(device)
    lora = Embedding.from_embedding(emb, r=4, lora_alpha=8)
    with torch.no_grad():
        lora.lora_A.normal_()
    w0 = head.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"not merged .*also held by Linear\(in_features=16"):
        lora.eval()
    assert not lora.merged and torch.equal(head.weight, w0)
    with pytest.raises(ValueError, match="tied weights"):
        lora.merge()


@pytest.mark.parametrize("direction", ["other takes the layer's", "layer takes the other's"])
def test_a_tie_made_by_hand_after_construction_is_seen(direction, device):
    layer = _randomize(LoRALinear(16, 50, r=2, device=device))
    emb = nn.Embedding(50, 16, device=device)
    if direction == "other takes the layer's":
        emb.weight = layer.weight  # seen by the parameter-registration hook
    else:
        layer.weight = emb.weight  # a Parameter the layer has not seen: looked for at merge
        layer.weight.requires_grad_(False)
    w0 = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="also held by Embedding"):
        layer.merge()
    assert torch.equal(emb.weight, w0)
    layer.merge_weights = True
    with pytest.warns(RuntimeWarning, match="tied weights"):
        layer.eval()
    assert torch.equal(emb.weight, w0)


def test_a_conv_whose_weight_another_conv_takes_is_not_merged():
    layer = _randomize(Conv2d(3, 4, 3, r=2))
    other = nn.Conv2d(3, 4, 3)
    other.weight = layer.conv.weight
    with pytest.raises(ValueError, match=r"Conv2d.merge\(\): .*also held by Conv2d\(3, 4"):
        layer.merge()


def test_untied_wrapping_costs_no_walk_and_inject_lora_one(monkeypatch, device):
    """The garbage collector's objects are walked only when the reference count says someone else refers
    to a weight not yet accounted for: wrapping an untied layer and merging never walk them; inject_lora
    (which holds references to every parameter, to restore them on failure) walks once for all its
    targets, not once per target."""
    from fused_lora import sharing

    walks = []
    real = sharing._scan
    monkeypatch.setattr(sharing, "_scan", lambda targets: (walks.append(len(targets)), real(targets)))
    lin = LoRALinear.from_linear(nn.Linear(5, 6, device=device), r=2)
    conv = Conv2d.from_conv(nn.Conv2d(2, 3, 3, device=device), r=2)
    emb = Embedding.from_embedding(nn.Embedding(9, 4, device=device), r=2)
    for m in (lin, conv, emb):
        m.merge()
        assert m.merged
    twin = copy.deepcopy(lin)  # new Parameters, referred to by the copy only: adopted without a walk
    twin.unmerge()
    twin.merge()
    assert walks == []
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(6))).to(device)
    fused_lora.inject_lora(model, [str(i) for i in range(6)], r=2)
    for m in model:
        m.merge()
    assert len(walks) <= 1


def test_a_deep_copy_of_a_tied_model_is_still_tied(device):
    emb, head = _tied_head(device)
    model = nn.ModuleDict({"emb": emb, "head": LoRALinear.from_linear(head, r=2, merge_weights=False)})
    twin = copy.deepcopy(model)
    assert twin["head"].weight is twin["emb"].weight
    with pytest.raises(ValueError, match="tied weights"):
        twin["head"].merge()


def test_a_failed_inject_lora_replaces_nothing(device):
    """inject_lora builds every layer before replacing any: a layer built for a tied head and then thrown
    away (another target failed) must not leave the head uncounted as a holder of the shared table."""
    emb, head = _tied_head(device)
    model = nn.ModuleDict({"emb": emb, "head": head, "odd": nn.Conv2d(2, 2, (3, 5), device=device)})
    with pytest.raises(ValueError, match="not the same in every dimension"):  # refused after the head was wrapped
        fused_lora.inject_lora(model, ["head", "odd"], r=2)
    gc.collect()  # the exception's frames, and the layer built for the head, are gone
    assert type(model["head"]) is nn.Linear and model["head"].weight is emb.weight
    lora = Embedding.from_embedding(emb, r=2, merge_weights=False)
    with pytest.raises(ValueError, match=r"also held by Linear\(in_features=16"):
        lora.merge()


def test_eval_mode_load_of_a_tied_layer_does_not_merge(device):
    emb, head = _tied_head(device)
    lora = _randomize(LoRALinear.from_linear(head, r=2))
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lora.eval()
    w0 = emb.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="tied weights"):
        lora.load_state_dict({k: v for k, v in state.items() if "lora_" in k}, strict=False)
    assert not lora.merged and torch.equal(emb.weight, w0)


# --- item 7: the hybrid agrees with the fused GEMM where an fp16 low-rank term exceeds fp16's range ---


def _cancelling_fp16(lora_dtype):
    """x·Wᵀ ≈ -60000 and the low-rank term ≈ +70400 (beyond fp16's 65504) cancel to y ≈ 10400; in the
    backward dY·W ≈ -58500 and T = mask⊙(g·A) ≈ +68640 cancel to dX ≈ 10000. All values representable."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 5, 32, 24, 2
    x = (1 + torch.randint(-8, 9, (M, K), generator=g) / 64).half()
    w = (-1875 + torch.randint(-2, 3, (N, K), generator=g)).half()
    a = torch.ones(r, K).to(lora_dtype)
    b = torch.full((N, r), 1100.0).to(lora_dtype)
    dy = torch.full((M, N), 1.3).half()
    return x, w, a, b, dy


@pytest.mark.parametrize("lora_dtype", [torch.float16, torch.float32], ids=["fp16-adapters", "fp32-adapters"])
def test_hybrid_and_fused_agree_where_the_fp16_term_overflows(lora_dtype, device):
    x, w, a, b, dy = (t.to(device) for t in _cancelling_fp16(lora_dtype))
    y64 = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), 1.0)
    dx64 = dy.double() @ w.double() + (dy.double() @ b.double()) @ a.double()
    out = {}
    for impl in ("fused", "hybrid"):
        xx = x.clone().requires_grad_()
        with fused_lora.use_impl(impl):
            y = fused_lora.lora_linear(xx, w, a, b, 1.0)
            y.backward(dy)
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all(), f"{impl}: inf where the answer is finite"
        out[impl] = (y.double(), xx.grad.double())
    # both are within fp16-level rounding of the large terms (the products are TF32 / fp16 operands)
    for (y, dx), name in zip(out.values(), out):
        assert (y - y64).abs().max() <= 4 * 2**-10 * 70400, name
        assert (dx - dx64).abs().max() <= 4 * 2**-10 * 68640, name
    (yf, dxf), (yh, dxh) = out["fused"], out["hybrid"]
    ulp = lambda t: 2.0 ** torch.floor(torch.log2(t.abs().clamp_min(2**-14))) * 2**-10
    assert ((yf - yh).abs() <= 2 * ulp(yf)).all() and ((dxf - dxh).abs() <= 2 * ulp(dxf)).all()


# --- the constructor checks ---

BAD_ALPHAS = [
    ("string", "16", TypeError),
    ("None", None, TypeError),
    ("bool", True, TypeError),
    ("complex", 1j, TypeError),
    ("nan", math.nan, ValueError),
    ("inf", -math.inf, ValueError),
    ("int beyond float", 10**400, ValueError),
    ("scaling beyond fp32", 1e300, ValueError),
]

BUILDERS = {
    "LoRALinear": lambda **kw: LoRALinear(6, 4, r=2, **kw),
    "MergedLinear": lambda **kw: MergedLinear(6, 4, r=2, enable_lora=[True, False], **kw),
    "Embedding": lambda **kw: Embedding(7, 3, r=2, **kw),
    "Conv1d": lambda **kw: fused_lora.Conv1d(2, 3, 3, r=2, **kw),
    "Conv2d": lambda **kw: Conv2d(2, 3, 3, r=2, **kw),
    "Conv3d": lambda **kw: fused_lora.Conv3d(2, 3, 1, r=2, **kw),
    "from_linear": lambda **kw: LoRALinear.from_linear(nn.Linear(6, 4), r=2, **kw),
    "from_embedding": lambda **kw: Embedding.from_embedding(nn.Embedding(7, 3), r=2, **kw),
    "from_conv": lambda **kw: Conv2d.from_conv(nn.Conv2d(2, 3, 3), r=2, **kw),
    "inject_lora": lambda **kw: fused_lora.inject_lora(nn.Sequential(nn.Linear(6, 4)), ["0"], r=2, **kw),
}


@pytest.mark.parametrize("label, alpha, error", BAD_ALPHAS, ids=[b[0] for b in BAD_ALPHAS])
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_bad_lora_alpha_fails_at_construction(builder, label, alpha, error):
    """A string or None used to pass construction and fail at the first forward with a bare TypeError
    (loralib fails at construction); NaN / inf / a scaling beyond fp32 were never caught."""
    with pytest.raises(error, match="lora_alpha"):
        BUILDERS[builder](lora_alpha=alpha)


@pytest.mark.parametrize("alpha", [np.float32(3.0), np.int64(3), torch.tensor(3.0), 3], ids=str)
def test_lora_alpha_as_loralib_takes_it(alpha):
    layer = LoRALinear(6, 4, r=2, lora_alpha=alpha)
    assert layer.scaling == 1.5 and isinstance(layer.lora_alpha, (int, float))


@pytest.mark.parametrize("pad", [7, -8, 100])
def test_padding_idx_out_of_range_is_a_value_error(pad):
    """torch's nn.Embedding raises a bare AssertionError ("Padding_idx must be within num_embeddings")."""
    with pytest.raises(ValueError, match=rf"padding_idx {pad} is outside \[-7, 7\)"):
        Embedding(7, 3, r=2, padding_idx=pad)
    with pytest.raises(TypeError, match="padding_idx must be an int"):
        Embedding(7, 3, r=2, padding_idx=1.0)
    assert Embedding(7, 3, r=2, padding_idx=np.int64(-7)).padding_idx == 0


def test_embedding_keywords_it_does_not_have():
    with pytest.raises(TypeError, match="fan_in_fan_out: the table is always"):
        Embedding(7, 3, r=2, fan_in_fan_out=True)
    with pytest.raises(TypeError, match="lora_dropout: embeddings apply no dropout"):
        Embedding(7, 3, r=2, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"_weight must be a \[num_embeddings, embedding_dim\] = \[7, 3\]"):
        Embedding(7, 3, r=2, _weight=torch.zeros(3, 7))  # torch: a bare AssertionError


def test_embedding_adapter_dtype_refused_at_construction_not_at_forward():
    with pytest.raises(TypeError, match=r"lora_dtype is torch\.float16; with a torch\.bfloat16 table"):
        Embedding(7, 3, r=2, dtype=torch.bfloat16, lora_dtype=torch.float16)
    with pytest.raises(TypeError, match=r"lora_dtype is torch\.float16; with a torch\.bfloat16 table"):
        Embedding.from_embedding(nn.Embedding(7, 3, dtype=torch.bfloat16), lora_dtype=torch.float16)


ENABLES = {
    "bool-tensor": torch.tensor([True, False, True]),
    "list-of-0-d": [torch.tensor(True), False, torch.tensor(True)],
    "int-tensor": torch.tensor([1, 0, 1]),
}


@pytest.mark.parametrize("enable", list(ENABLES.values()), ids=list(ENABLES))
def test_enable_lora_as_a_torch_tensor(enable):
    """loralib indexes with enable_lora, so it takes a torch bool tensor; ours refused it."""
    torch.manual_seed(1)
    got = MergedLinear(6, 9, r=2, enable_lora=enable)
    torch.manual_seed(1)
    want = MergedLinear(6, 9, r=2, enable_lora=[True, False, True])
    assert got.enable_lora == [True, False, True]
    assert {k: v.shape for k, v in got.state_dict().items()} == {k: v.shape for k, v in want.state_dict().items()}


def test_rank_as_loralib_takes_it_and_bad_ranks():
    assert LoRALinear(6, 4, r=torch.tensor(3)).r == 3 and LoRALinear(6, 4, r=np.int32(3)).r == 3
    for bad, error in ((2.0, TypeError), (True, TypeError), (-1, ValueError), (torch.tensor(2.0), TypeError)):
        with pytest.raises(error, match="r must be"):
            LoRALinear(6, 4, r=bad)


@pytest.mark.parametrize("flag", ["merge_weights", "fan_in_fan_out", "use_rslora"])
def test_flags_must_be_bools(flag):
    """merge_weights="False" was taken as true (a non-empty string)."""
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'False'"):
        LoRALinear(6, 4, r=2, **{flag: "False"})
    assert LoRALinear(6, 4, r=2, **{flag: np.bool_(False)}) is not None


def test_lora_dtype_and_lora_dropout_named():
    with pytest.raises(TypeError, match=r"lora_dtype must be None or a floating-point torch\.dtype, got 'float32'"):
        LoRALinear(6, 4, r=2, lora_dtype="float32")
    with pytest.raises(TypeError, match="lora_dtype must be"):
        Conv2d(2, 3, 3, r=2, lora_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoRALinear.from_linear(nn.Linear(6, 4), lora_dropout=1.5)
