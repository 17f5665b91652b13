"""The integrations beyond nn.Linear: inject_lora on embeddings and convolutions, loralib's helpers and
state_dicts, merge_lora, PEFT's adapter files both ways (embeddings as they are, convolutions converted
exactly), patch_peft_model serving PEFT's lora.Embedding and convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.integrations.inject import lora_layers, shared_weights
from fused_lora.integrations.peft_conv import conv_from_peft, conv_to_peft
from fused_lora.kernels import LAUNCHES

from helpers import assert_close_to_ref

peft = pytest.importorskip("peft")
loralib = pytest.importorskip("loralib")
TARGETS = ["emb", "conv1", "conv2", "conv3", "head"]


class Net(nn.Module):
    """An embedding, 1-D, 2-D and 3-D convolutions (k = 3, 3, 2) and a linear head."""

    def __init__(self, seed=0, lib=nn, **lora):
        torch.manual_seed(seed)
        super().__init__()
        kw = (lambda **extra: {**lora, **extra}) if lora else (lambda **extra: {})
        self.emb = lib.Embedding(30, 12, padding_idx=0, **kw())
        self.conv1 = lib.Conv1d(12, 10, 3, padding=1, **kw(lora_dropout=0.0))
        self.conv2 = lib.Conv2d(1, 4, 3, padding=1, **kw(lora_dropout=0.0))
        self.conv3 = lib.Conv3d(1, 2, 2, padding=1, **kw(lora_dropout=0.0))
        self.head = lib.Linear(10, 5, **kw(lora_dropout=0.0))

    def forward(self, ids):
        h = self.conv1(self.emb(ids).transpose(1, 2))  # [B, 10, T]
        img = self.conv2(h.unsqueeze(1))  # [B, 4, 10, T]
        vol = self.conv3(img.unsqueeze(1))  # [B, 2, 5, 11, T + 1]
        return self.head(vol.mean((1, 2))[..., :10, :].transpose(1, 2))  # [B, T + 1, 5]


def ids(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 30, (2, 7), generator=g).to(device)


def randomize(model, seed=3):
    """Every adapter non-zero (loralib/PEFT start with B = 0, or A = 0 for embeddings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def injected(device="cpu", r=2, alpha=3, **kw):
    model = Net().to(device)
    fused_lora.inject_lora(model, TARGETS, r=r, lora_alpha=alpha, **kw)
    randomize(model)
    return model


def test_inject_wraps_embeddings_and_convolutions(device):
    model = Net().to(device)
    inputs = ids(device)
    before = model(inputs)
    emb, conv2 = model.emb, model.conv2
    report = fused_lora.inject_lora(model, TARGETS, r=2, lora_alpha=4)
    assert sorted(report.modules) == sorted(TARGETS)
    assert isinstance(model.emb, fused_lora.Embedding) and model.emb.weight is emb.weight
    assert isinstance(model.conv2, fused_lora.Conv2d) and model.conv2.conv is conv2
    assert isinstance(model.conv1, fused_lora.Conv1d) and isinstance(model.conv3, fused_lora.Conv3d)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(model(inputs), before)  # A = 0 (embedding) / B = 0 (others) at start


def test_inject_refuses_what_it_cannot_reproduce():
    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = nn.Sequential(Scaled(5, 4), nn.Conv2d(4, 4, (1, 3)), nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"0 matches target_modules but is a Scaled with its own forward"):
        fused_lora.inject_lora(model, ["0"])
    with pytest.raises(ValueError, match=r"kernel_size \(1, 3\) is not the same in every dimension"):
        fused_lora.inject_lora(model, ["1", "2"])
    assert type(model[2]) is nn.Linear, "half-injected"
    with pytest.raises(ValueError, match=r"available: nn.Linear: \['2'\]; nn.Embedding / nn.ConvNd: \['1'\]"):
        fused_lora.inject_lora(model, ["nope"])


def test_loralib_helpers_and_state_dicts_interchange(device):
    ours = injected(device, r=2, alpha=3)
    theirs = Net(lib=loralib, r=2, lora_alpha=3).to(device)
    for part in ("emb", "conv2", "head"):  # the layers loralib can run (its Conv1d/3d fail for k > 1)
        theirs_sd = getattr(theirs, part).state_dict()
        getattr(ours, part).load_state_dict(theirs_sd, strict=True)
        getattr(theirs, part).load_state_dict(getattr(ours, part).state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, in order, all layers
    for bias in ("none", "all", "lora_only"):
        assert fused_lora.lora_state_dict(ours, bias).keys() == loralib.lora_state_dict(theirs, bias).keys()
        fused_lora.mark_only_lora_as_trainable(ours, bias)
        loralib.mark_only_lora_as_trainable(theirs, bias)
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
    x = torch.randn(2, 1, 6, 5, device=device)
    torch.testing.assert_close(ours.conv2(x), theirs.conv2(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.emb(ids(device)), theirs.emb(ids(device)), rtol=1e-5, atol=1e-5)


def test_merge_lora_round_trip_every_layer(device):
    model = injected(device)
    state = copy.deepcopy(model.state_dict())
    inputs = ids(device)
    unmerged = model(inputs)
    assert fused_lora.merge_lora(model) == 5
    torch.testing.assert_close(model(inputs), unmerged, rtol=1e-5, atol=1e-5)
    assert fused_lora.unmerge_lora(model) == 5
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


class TiedLM(nn.Module):
    """The input embedding's table is the output head's weight (GPT-2, Llama-3.2-1B, Gemma)."""

    def __init__(self, device="cpu"):
        torch.manual_seed(0)
        super().__init__()
        self.emb = nn.Embedding(16, 8, device=device)
        self.head = nn.Linear(8, 16, bias=False, device=device)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("targets", [["emb"], ["emb", "head"]])
def test_tied_weights_are_not_merged(targets, device):
    """Merging ΔW into a weight another module holds too would change that module: merge_lora and
    inject_lora(merge_weights=True) refuse, before anything changes, and so does each layer's own merge()."""
    model = TiedLM(device)
    w0 = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"inject_lora\(merge_weights=True\): .*emb: held by emb, head"):
        fused_lora.inject_lora(model, targets, r=2, lora_alpha=4, merge_weights=True)
    assert type(model.emb) is nn.Embedding and type(model.head) is nn.Linear
    fused_lora.inject_lora(model, targets, r=2, lora_alpha=4)
    randomize(model)
    assert shared_weights(model) == {n: ["emb", "head"] for n in targets}
    with pytest.raises(ValueError, match=r"merge_lora: .*tied weights"):
        fused_lora.merge_lora(model)
    assert not any(m.merged for _, m in lora_layers(model)) and torch.equal(model.emb.weight, w0)
    for _, layer in lora_layers(model):  # by hand: refused too
        with pytest.raises(ValueError, match=r"merge\(\): this layer's weight is also held by .*tied weights"):
            layer.merge()
    assert fused_lora.unmerge_lora(model) == len(targets)
    assert not any(m.merged for _, m in lora_layers(model)) and torch.equal(model.emb.weight, w0)


def peft_net(r=3, alpha=5, **cfg):
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, **cfg))
    randomize(model, seed=7)
    return model.eval()


def test_adapter_saved_by_us_loads_in_peft_and_back(tmp_path, device):
    """Ours → PEFT files → PeftModel: same outputs. Back into a fresh model: same ranks, same bits. One
    convolution keeps a B of PEFT's form (rank r in the file), the others need rank r·k²."""
    ours = injected(device, r=2, alpha=3)
    with torch.no_grad():
        ours.conv1.lora_B.zero_()  # B = 0 is B'⊗I: the file's rank stays 2
    inputs = ids(device)
    expected = ours(inputs)
    fused_lora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(Net().to(device), tmp_path / "ours")
    assert_close_to_ref("PEFT on our file", theirs(inputs), expected.double(), expected)
    ranks = {n.split(".")[-1]: m.r["default"] for n, m in theirs.named_modules() if hasattr(m, "lora_A") and
             isinstance(m.r, dict)}  # fmt: skip
    assert ranks == {"emb": 2, "conv1": 2, "conv2": 2 * 9, "conv3": 2 * 4, "head": 2}

    back = Net().to(device)
    fused_lora.load_adapter(back, tmp_path / "ours")
    for n, p in ours.named_parameters():
        assert torch.equal(p, back.get_parameter(n)), n
    assert [m.r for m in (back.emb, back.conv1, back.conv2, back.conv3)] == [2, 2, 2, 2]
    fused_lora.load_adapter(back, tmp_path / "ours")  # into already-injected layers


def test_adapter_files_from_peft(tmp_path, device):
    """PEFT → its files → ours: same outputs (forward and LoRA gradients flow); ours → files again: PEFT's
    own ranks and tensors."""
    theirs = peft_net(r=3, alpha=5, rank_pattern={"conv2": 2}, alpha_pattern={"conv2": 7}, use_rslora=True)
    theirs.save_pretrained(tmp_path / "theirs")
    inputs = ids()
    expected = theirs(inputs)
    plain = Net().to(device)
    loaded = fused_lora.load_adapter(plain, tmp_path / "theirs")
    assert loaded == sorted(TARGETS)
    assert (plain.conv2.r, plain.conv2.lora_A.shape, plain.conv2.use_rslora) == (2, (6, 3), True)
    got = plain(inputs.to(device))
    assert_close_to_ref("ours on PEFT's file", got, expected.double(), expected)
    got.sum().backward()
    assert plain.conv2.lora_A.grad is not None and plain.emb.lora_A.grad is not None
    fused_lora.save_adapter(plain, tmp_path / "again")
    from safetensors.torch import load_file

    first, again = (
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"),
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
    )
    assert first.keys() == again.keys()
    for k in first:
        assert torch.equal(first[k], again[k]), k
    reloaded = peft.PeftModel.from_pretrained(Net(), tmp_path / "again")
    torch.testing.assert_close(reloaded(inputs), expected, rtol=1e-5, atol=1e-5)


def test_adapter_files_into_lora_layers_take_the_files_scaling(tmp_path, device):
    """Layers that are LoRA layers already (another lora_alpha, no rsLoRA, no dropout) take the file's
    alpha, alpha_pattern and use_rslora: the model computes PEFT's outputs, also merged. Their own dropout
    (a per-layer training setting the file's single value cannot express) stays."""
    theirs = peft_net(r=3, alpha=16, alpha_pattern={"conv2": 7}, use_rslora=True, lora_dropout=0.25)
    theirs.save_pretrained(tmp_path / "theirs")
    inputs = ids()
    expected = theirs(inputs)
    for merged in (False, True):
        ours = injected(device, r=3, alpha=1)
        if merged:
            ours.eval()
        fused_lora.load_adapter(ours, tmp_path / "theirs")
        assert (ours.conv2.lora_alpha, ours.conv2.use_rslora, ours.conv2.lora_dropout_p) == (7, True, 0.0)
        assert (ours.head.lora_alpha, ours.emb.scaling) == (16, 16 / 3**0.5)
        got = ours.eval()(inputs.to(device))
        assert_close_to_ref(f"ours on PEFT's file (merged={merged})", got, expected.double(), expected)
        fused_lora.unmerge_lora(ours)  # in eval mode: no dropout
        assert_close_to_ref("unmerged again", ours(inputs.to(device)), expected.double(), expected)


def test_conversions_peft_cannot_express(tmp_path):
    for kw in ({"groups": 2}, {"dilation": 2}, {"padding_mode": "circular", "padding": 1}):
        model = nn.Sequential(nn.Conv2d(4, 4, 3, **kw))
        fused_lora.inject_lora(model, ["0"], r=2)
        with pytest.raises(ValueError, match=r"0: PEFT's LoRA convolution cannot express"):
            fused_lora.save_adapter(model, tmp_path)
    model = Net()
    fused_lora.inject_lora(model, ["emb"], r=2)
    fused_lora.save_adapter(model, tmp_path / "emb")
    wrong = nn.Module()
    wrong.emb = nn.Linear(30, 12)
    with pytest.raises(ValueError, match=r"emb: the file holds lora_embedding_A/B for a Linear"):
        fused_lora.load_adapter(wrong, tmp_path / "emb")
    small = nn.Module()
    small.emb = nn.Embedding(29, 12)
    with pytest.raises(ValueError, match=r"emb: adapter shapes A \[2, 30\], B \[12, 2\] do not fit"):
        fused_lora.load_adapter(small, tmp_path / "emb")
    assert type(small.emb) is nn.Embedding, "a wrong file must leave the model as it was"


@pytest.mark.parametrize(("k", "dims"), [(1, 2), (2, 1), (3, 2), (3, 3)])
def test_conv_factor_conversions_are_exact(k, dims):
    """The deltas agree; each direction inverts the other exactly (bit for bit)."""
    out, cin, r = 5, 4, 3
    L = cin * k ** (dims - 1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(r * k, L, generator=g), torch.randn(out * k, r * k, generator=g)
    ours_delta = (b.double() @ a.double()).reshape(out, k * L)
    a_p, b_p = conv_to_peft(a, b, out, k)
    torch.testing.assert_close(b_p.double() @ a_p.double(), ours_delta, rtol=0, atol=1e-12)
    a2, b2 = conv_from_peft(a_p, b_p, k)
    assert torch.equal(a2, a) and torch.equal(b2, b)
    a_p, b_p = torch.randn(r, k * L, generator=g), torch.randn(out, r, generator=g)  # PEFT's own
    a3, b3 = conv_from_peft(a_p, b_p, k)
    assert a3.shape == (r * k, L)
    torch.testing.assert_close((b3.double() @ a3.double()).reshape(out, k * L), b_p.double() @ a_p.double(),
                               rtol=0, atol=1e-12)  # fmt: skip
    a4, b4 = conv_to_peft(a3, b3, out, k)
    assert torch.equal(a4, a_p) and torch.equal(b4, b_p)


def test_patch_serves_peft_embeddings_and_convolutions(device):
    """PEFT's lora.Embedding runs the fused kernel and its convolutions fused_lora's convolution path (one
    convolution with W + s·B·A): outputs and LoRA gradients by the parity rule against PEFT itself in
    float64."""
    model = peft_net().train()
    inputs = ids()

    def step(m):
        m.zero_grad(set_to_none=True)
        y = m(inputs)
        y.pow(2).sum().backward()
        return y.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    ref64, same = step(copy.deepcopy(model).double()), step(model)
    report = fused_lora.patch_peft_model(model)
    assert sorted(report.patched) == [f"base_model.model.{n}" for n in sorted(TARGETS)] and not report.not_patched
    assert {report.kinds[f"base_model.model.{n}"] for n in TARGETS} == {
        "lora.Embedding", "lora.Conv1d", "lora.Conv2d", "lora.Conv3d", "lora.Linear"
    }  # fmt: skip
    before = LAUNCHES.copy()
    got = step(model)
    launched = LAUNCHES - before
    assert launched["_lora_embedding_fwd_kernel"] == 1 and launched["_lora_embedding_bwd_kernel"] == 1, launched
    assert_close_to_ref("y", got[0], ref64[0], same[0])
    assert got[1].keys() == same[1].keys()
    for n in got[1]:
        assert_close_to_ref(n, got[1][n], ref64[1][n], same[1][n])
    assert fused_lora.unpatch_peft_model(model) == 5
    before = LAUNCHES.copy()
    step(model)
    assert LAUNCHES - before == {}


def test_patched_float64_model_goes_back_to_peft(device):
    """float64, which the kernels do not take, runs PEFT's own forward on the triton backend (the
    conftest's) instead of raising: the same outputs as unpatched, no kernel launched."""
    model = peft_net().double().to(device)
    inputs = ids(device)
    expected = model(inputs)
    report = fused_lora.patch_peft_model(model)
    assert len(report.patched) == 5
    before = LAUNCHES.copy()
    torch.testing.assert_close(model(inputs), expected, rtol=1e-12, atol=1e-12)  # convolutions: W + ΔW merged
    assert LAUNCHES - before == {}


def test_reloading_our_own_adapter_keeps_each_layers_dropout(tmp_path):
    """save_adapter writes one lora_dropout (the most common); loading the file back into the same model
    set every layer to it, losing a layer's own 0.3."""
    model = nn.Sequential(*(fused_lora.LoRALinear(8, 8, r=2, lora_alpha=4, lora_dropout=p) for p in (0.0, 0.0, 0.3)))
    fused_lora.save_adapter(model, tmp_path)
    fused_lora.load_adapter(model, tmp_path)
    assert [layer.lora_dropout_p for layer in model] == [0.0, 0.0, 0.3]
