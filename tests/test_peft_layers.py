"""patch_peft_model on every PEFT layer kind, against PEFT's own layer: forward and the gradients of x and of
every trainable parameter (by the parity rule against PEFT in float64), merge / unmerge, save / load,
adapter switching and disable_adapter — convolutions, lora_bias, AdaLoRA, MultiheadAttention, ParamWrapper."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.kernels import LAUNCHES

from helpers import assert_close_to_ref, host_syncs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class Net(nn.Module):
    """1-D, 2-D and 3-D convolutions (odd channels, strides, paddings, one 1×1), a linear and a GPT-2 Conv1D."""

    def __init__(self, bias=True):
        super().__init__()
        self.c1 = nn.Conv1d(3, 5, 3, stride=2, padding=1, bias=bias)
        self.c2 = nn.Conv2d(5, 7, (3, 2), padding=(1, 0), bias=bias)
        self.c2b = nn.Conv2d(7, 6, 1, bias=bias)
        self.c3 = nn.Conv3d(1, 4, 2, padding=1, bias=bias)
        self.lin = nn.Linear(6, 9, bias=bias)
        self.gpt = transformers.pytorch_utils.Conv1D(5, 9)

    def forward(self, x):  # x [b, 3, 11]
        h = self.c1(x)  # [b, 5, 6]
        img = self.c2b(self.c2(h.unsqueeze(-1).expand(-1, -1, -1, 3)))  # [b, 6, 6, 2]
        vol = self.c3(img[:, :1].unsqueeze(1))  # [b, 4, 7, 7, 3]
        z = self.lin(img.mean((2, 3))) + vol.mean((1, 2, 3, 4)).unsqueeze(-1)
        return self.gpt(z[..., :9])


CONVS = ["c1", "c2", "c2b", "c3"]


def peft_net(targets, seed=0, bias=True, **cfg):
    torch.manual_seed(seed)
    fan = {"fan_in_fan_out": True} if targets == ["gpt"] else {}
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets, init_lora_weights=False, **fan, **cfg)
    return peft.get_peft_model(Net(bias), config)


def step(model, x):
    """Output, dx and the gradient of every trainable parameter, for loss = Σ y·w (a fixed weighting)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    w = torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view(y.shape)
    (y * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


def assert_matches_peft(model, ref, x, seed=None):
    """The patched `model` against PEFT's own (`ref`, unpatched) and PEFT in float64."""
    ref64 = copy.deepcopy(ref).double()
    outs = []
    for m, inp in ((model, x), (ref, x), (ref64, x.double())):
        if seed is not None:
            torch.manual_seed(seed)  # the same dropout mask: the fused path draws it as PEFT does
        outs.append(step(m, inp))
    (got, gx, gg), (same, sx, sg), (r64, rx, rg) = outs
    assert_close_to_ref("y", got, r64, same)
    assert_close_to_ref("dx", gx, rx, sx)
    assert gg.keys() == sg.keys() == rg.keys() and gg
    for n in gg:
        assert gg[n] is not None, n
        assert_close_to_ref(n, gg[n], rg[n], sg[n])


def lora_A_calls(model) -> list[int]:
    """Counts lora_A module calls: PEFT's forward makes them, the fused convolution path does not."""
    calls = [0]
    for n, m in model.named_modules():
        if n.endswith("lora_A.default"):
            m.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_convolutions_match_peft(bias, lora_bias):
    """lora.Conv1d / Conv2d (a (3, 2) kernel, a 1×1) / Conv3d: one convolution with W + s·B·A, forward and
    gradients (x, A, B, and lora_B's bias) as PEFT's; PEFT's lora_A is never called."""
    model = peft_net(CONVS, bias=bias, lora_bias=lora_bias).train()
    ref = copy.deepcopy(model)
    report = fused_lora.patch_peft_model(model)
    assert len(report.patched) == 4 and not report.not_patched
    assert {report.kinds[n] for n in report.patched} == {"lora.Conv1d", "lora.Conv2d", "lora.Conv3d"}
    calls = lora_A_calls(model)
    x = torch.randn(2, 3, 11)
    assert_matches_peft(model, ref, x)
    assert calls[0] == 0, "the patched convolutions must not run PEFT's lora_A"
    if lora_bias:
        assert any("lora_B.default.bias" in n for n, _ in model.named_parameters())


def test_convolution_dropout_draws_peft_mask():
    """With lora_dropout in training the low-rank path runs on the dropped input with the same draw as
    PEFT's (the same mask for the same seed); in eval, the merged convolution, equal to PEFT's."""
    model = peft_net(CONVS, lora_dropout=0.3, lora_bias=True).train()
    ref = copy.deepcopy(model)
    fused_lora.patch_peft_model(model)
    x = torch.randn(2, 3, 11)
    assert_matches_peft(model, ref, x, seed=11)
    model.eval(), ref.eval()
    calls = lora_A_calls(model)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert calls[0] == 0


def test_conv_merge_save_switch_disable(tmp_path):
    """Merging is PEFT's (lora_bias into the base bias), save / load, a second adapter, disable_adapter."""
    model = peft_net(CONVS, lora_bias=True).eval()
    model.add_adapter("two", peft.LoraConfig(r=2, target_modules=["c2", "c3"], init_lora_weights=False))
    ref = copy.deepcopy(model)
    fused_lora.patch_peft_model(model)
    x = torch.randn(2, 3, 11)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for adapter in ("two", "default"):
        model.set_adapter(adapter), ref.set_adapter(adapter)
        close(model(x), ref(x))
    with model.disable_adapter(), ref.disable_adapter():
        close(model(x), ref(x))
    bias_before = model.base_model.model.c2.base_layer.bias.clone()
    model.merge_adapter()
    assert not torch.equal(model.base_model.model.c2.base_layer.bias, bias_before)  # s·b_B merged, as PEFT
    close(model(x), ref(x))
    model.unmerge_adapter()
    close(model.base_model.model.c2.base_layer.bias, bias_before)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path)
    assert len(fused_lora.patch_peft_model(loaded).patched) == 4
    close(loaded(x), ref(x))


def test_unservable_convolutions_are_reported():
    """Dilated and reflect-padded convolutions stay on PEFT's forward, each with its reason."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.dilated = nn.Conv2d(4, 4, 3, dilation=2, padding=2)
            self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")

        def forward(self, x):
            return self.reflect(self.dilated(x))

    model = peft.get_peft_model(Odd(), peft.LoraConfig(r=2, target_modules=["dilated", "reflect"]))
    report = fused_lora.patch_peft_model(model)
    assert not report.patched
    why = {n.split(".")[-1]: r for n, r in report.not_patched.items()}
    assert "dilated" in why["dilated"] and "reflect" in why["reflect"]
    text = str(report)
    assert "left on PEFT's forward: 1 x lora.Conv2d: dilated convolution" in text, text


class Grouped(nn.Module):
    """Grouped convolutions: a depthwise Conv1d, a Conv2d in 2 groups (odd kernel, padding), a Conv3d in 3."""

    def __init__(self, bias=True):
        super().__init__()
        self.g1 = nn.Conv1d(6, 6, 3, padding=1, groups=6, bias=bias)
        self.g2 = nn.Conv2d(6, 10, (3, 2), stride=(1, 2), padding=(1, 0), groups=2, bias=bias)
        self.g3 = nn.Conv3d(10, 6, 2, padding=1, groups=2, bias=bias)

    def forward(self, x):  # x [b, 6, 8]
        h = self.g1(x)  # [b, 6, 8]
        img = self.g2(h.unsqueeze(-1).expand(-1, -1, -1, 4))  # [b, 10, 8, 2]
        return self.g3(img.unsqueeze(-1))  # [b, 6, 9, 3, 2]


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("bias, lora_bias", [(True, False), (False, False), (True, True)])
def test_grouped_convolutions_match_peft(use_dora, bias, lora_bias):
    """Grouped lora.Conv1d / 2d / 3d (PEFT's dense lora_A and grouped 1×1 lora_B; r = 6, a multiple of
    every groups) run lora_conv's grouped case, DoRA with PEFT's grouped norm: y and the gradients of x, A,
    B, lora_B's bias and the magnitude as PEFT's; PEFT's lora_A is never called."""
    if use_dora and lora_bias:
        pytest.skip("PEFT's DoRA takes no lora_bias")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=6, lora_alpha=5, target_modules=["g1", "g2", "g3"], init_lora_weights=False,
                             use_dora=use_dora, lora_bias=lora_bias)  # fmt: skip
    model = peft.get_peft_model(Grouped(bias), config).train()
    ref = copy.deepcopy(model)
    report = fused_lora.patch_peft_model(model)
    assert len(report.patched) == 3 and not report.not_patched, report
    calls = lora_A_calls(model)
    assert_matches_peft(model, ref, torch.randn(2, 6, 8))
    assert calls[0] == 0, "the patched convolutions must not run PEFT's lora_A"


@pytest.mark.parametrize("use_dora", [False, True])
def test_grouped_convolution_dropout_and_eval(use_dora, tmp_path):
    """Grouped with lora_dropout: in training the dropped input feeds lora_A with PEFT's draw (same seed,
    same mask: LoRA matches PEFT; DoRA's 'fused' formula equals PEFT's in eval); in eval, as PEFT's; saved
    and loaded, patched again, as PEFT's; merging refused as PEFT refuses it (groups > 1)."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=6, target_modules=["g1", "g2", "g3"], init_lora_weights=False, lora_dropout=0.4,
                             use_dora=use_dora)  # fmt: skip
    model = peft.get_peft_model(Grouped(), config).train()
    ref = copy.deepcopy(model)
    fused_lora.patch_peft_model(model)
    x = torch.randn(2, 6, 8)
    if not use_dora:
        assert_matches_peft(model, ref, x, seed=3)
    model.eval(), ref.eval()
    calls = lora_A_calls(model)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert calls[0] == 0
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)  # the same base weights
    loaded = peft.PeftModel.from_pretrained(Grouped(), tmp_path).eval()
    assert len(fused_lora.patch_peft_model(loaded).patched) == 3
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()


@pytest.mark.parametrize("use_dora", [False, True])
def test_grouped_convolutions_bf16_model_fp32_adapters(use_dora):
    """A bf16 model (PEFT keeps the adapters in fp32): the low-rank path in fp32, added to the bf16 base
    output, as PEFT's promotion does; y and the gradients by the parity rule."""
    torch.manual_seed(2)
    config = peft.LoraConfig(r=6, target_modules=["g1", "g2", "g3"], init_lora_weights=False, use_dora=use_dora)
    model = peft.get_peft_model(Grouped().to(torch.bfloat16), config).train()
    assert model.base_model.model.g2.lora_A.default.weight.dtype == torch.float32
    ref = copy.deepcopy(model)
    assert len(fused_lora.patch_peft_model(model).patched) == 3
    calls = lora_A_calls(model)
    assert_matches_peft(model, ref, torch.randn(2, 6, 8, dtype=torch.bfloat16))
    assert calls[0] == 0


def test_grouped_lora_conv_checks_shapes():
    """lora_conv with groups names the argument and the shapes it wants."""
    from fused_lora.conv_function import lora_conv

    x, w, A = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(4, 4, 3, 3)
    with pytest.raises(ValueError, match=r"lora_B \[6, 4\] must be \[out, r/groups\] = \[6, 2\]"):
        lora_conv(x, w, A, torch.randn(6, 4), 1.0, groups=2)
    with pytest.raises(ValueError, match="rank 3 must be a multiple of groups = 2"):
        lora_conv(x, w, torch.randn(3, 4, 3, 3), torch.randn(6, 1), 1.0, groups=2)
    with pytest.raises(ValueError, match="groups must be an int >= 1 dividing out = 6"):
        lora_conv(x, w, A, torch.randn(6, 2), 1.0, groups=4)
    with pytest.raises(ValueError, match=r"x \[1, 4, 5, 5\] must be \[batch, 6, ...\]"):
        lora_conv(x, w, A, torch.randn(6, 1), 1.0, groups=3)


@pytest.mark.parametrize("target", [["lin"], ["gpt"]])
def test_lora_bias_linear_matches_peft(target, tmp_path):
    """lora_bias on lora.Linear (nn.Linear, and GPT-2's Conv1D with fan_in_fan_out): s·b_B folded into the
    fused GEMM's bias, its gradient as PEFT's; the kernels run; merge adds s·b_B to the base bias."""
    model = peft_net(target, lora_bias=True).train()
    ref = copy.deepcopy(model)
    assert len(fused_lora.patch_peft_model(model).patched) == 1
    before = LAUNCHES.copy()
    assert_matches_peft(model, ref, torch.randn(2, 3, 11))
    assert (LAUNCHES - before)["_shrink_kernel"] == 1
    model.eval(), ref.eval()
    layer = model.base_model.model.get_submodule(target[0])
    b0 = layer.base_layer.bias.clone()
    model.merge_adapter()
    s = layer.scaling["default"]
    torch.testing.assert_close(layer.base_layer.bias, b0 + s * layer.lora_B["default"].bias.detach())
    x = torch.randn(2, 3, 11)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_patched_layers_repr_is_peft():
    """Every patched kind prints exactly as PEFT's layer (PEFT's TestLayerRepr checks these forms)."""
    emb = nn.Sequential(nn.Embedding(10, 4))
    models = [peft_net([*CONVS, "lin"]), peft.get_peft_model(emb, peft.LoraConfig(target_modules=["0"]))]
    for model in models:
        expected = {n: repr(m) for n, m in model.named_modules()}
        fused_lora.patch_peft_model(model)
        assert {n: repr(m) for n, m in model.named_modules()} == expected
    assert repr(models[1].base_model.model[0]).startswith("lora.Embedding(")


# ---------------------------------------------------------------- AdaLoRA


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(11, 13)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.lin1 = nn.Linear(13, 5)

    def forward(self, x):  # x [b, 11]
        h = self.lin0(x)
        img = self.conv(h.view(-1, 1, 1, 13)).mean(1).flatten(1)  # [b, 13]
        return self.lin1(torch.relu(h + img))


def adalora_model(seed=0, **cfg):
    torch.manual_seed(seed)
    config = peft.AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=8, lora_alpha=6,
        target_modules=["lin0", "conv", "lin1"], **cfg,
    )  # fmt: skip
    model = peft.get_peft_model(Small(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()  # AdaLoRA starts E at zero: make the adapters count
    return model


def test_adalora_matches_peft():
    """SVDLinear / SVDConv2d: A⊙E·s/(ranknum + 1e-5) passed as the adapter; y and the gradients of x, A, B
    and E as PEFT's; the kernels run for the linears; a step reads nothing back (ranknum stays a tensor)."""
    model = adalora_model().train()
    ref = copy.deepcopy(model)
    report = fused_lora.patch_peft_model(model)
    assert sorted(report.kinds[n] for n in report.patched) == ["adalora.SVDConv2d", *["adalora.SVDLinear"] * 2]
    x = torch.randn(3, 11)
    before = LAUNCHES.copy()
    assert_matches_peft(model, ref, x)
    assert (LAUNCHES - before)["_shrink_kernel"] == 2
    layer = model.base_model.model.lin0
    assert host_syncs(lambda: layer(x).sum().backward()) == []


def test_adalora_rank_allocation_as_peft():
    """A few training steps with AdaLoRA's RankAllocator (update_and_allocate masks E to the budget):
    patched and unpatched prune the same singular values and train to the same parameters."""
    runs = []
    for patch in (False, True):
        model = adalora_model().train()
        if patch:
            fused_lora.patch_peft_model(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(5)
        for i in range(6):
            x = torch.randn(4, 11, generator=g)
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(i)
            opt.zero_grad()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    plain, fused = runs
    masked = [n for n in plain if "lora_E" in n and (plain[n] == 0).any()]
    assert masked, "the allocator should have pruned some singular values"
    for n in plain:
        assert torch.equal(plain[n] == 0, fused[n] == 0) if "lora_E" in n else True, n
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- MultiheadAttention, ParamWrapper


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2, batch_first=True)
        self.lin = nn.Linear(10, 3)

    def forward(self, x):  # x [b, t, 10]; self-attention, then attention of x over its reversed self
        y, _ = self.mha(x, x, x)
        z, _ = self.mha(y, x.flip(1), x.flip(1), need_weights=False)
        return self.lin(z)


def test_multihead_attention_matches_peft(tmp_path):
    """lora.MultiheadAttention: merged weights formed per call (no merge/unmerge of the module's parameters),
    y and gradients as PEFT's (its doubled out_proj ΔW included), merging, save / load, disable_adapter."""
    from fused_lora.integrations.peft_mha import out_proj_delta_count

    torch.manual_seed(0)
    model = peft.get_peft_model(Attn(), peft.LoraConfig(r=3, target_modules=["mha"], init_lora_weights=False))
    ref = copy.deepcopy(model)
    report = fused_lora.patch_peft_model(model)
    assert {report.kinds[n] for n in report.patched} == {"lora.MultiheadAttention", "lora.Linear"}
    assert out_proj_delta_count() == 2  # what PEFT 0.21.2 does
    mha, merges = model.base_model.model.mha, []
    mha.merge = lambda *a, **k: merges.append(a)  # PEFT's forward merges and unmerges per call; ours never
    x = torch.randn(2, 5, 10)
    assert_matches_peft(model, ref, x)
    assert merges == []
    del mha.merge
    model.eval(), ref.eval()
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with model.disable_adapter(), ref.disable_adapter():
        close(model(x), ref(x))
    model.merge_adapter()
    close(model(x), ref(x))
    model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Attn(), tmp_path)
    fused_lora.patch_peft_model(loaded)
    close(loaded(x), ref(x))


class UsesParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return x @ self.weight


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 6, 4))

    def forward(self, x):
        return torch.einsum("bi,eio->bo", x, self.weight)


class Params(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.custom, self.experts = nn.Linear(7, 6), UsesParam(), Experts()

    def forward(self, x):
        h = self.lin(x)
        return self.custom(h) + self.experts(h)


def test_param_wrapper():
    """target_parameters: an nn.Linear's weight runs the kernels (y = x·(W + ΔW)ᵀ + b, no parametrization),
    gradients as PEFT's; a weight read by a module's own forward, 2-D or 3-D, is reported with the reason."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_parameters=["lin.weight", "custom.weight", "experts.weight"])
    model = peft.get_peft_model(Params(), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ref = copy.deepcopy(model)
    report = fused_lora.patch_peft_model(model)
    assert [n.split(".")[-1] for n in report.patched] == ["lin"]
    why = {n.split(".")[-1]: r for n, r in report.not_patched.items()}
    assert "UsesParam" in why["custom"] and "3-D" in why["experts"], why
    before = LAUNCHES.copy()
    assert_matches_peft(model, ref, torch.randn(3, 7))
    assert (LAUNCHES - before)["_shrink_kernel"] == 1
    assert not model.base_model.model.lin.base_layer.__dict__.get("parametrizations")


# ---------------------------------------------------------------- the registry, pickling, the report


def test_a_registered_path_serves_a_variant():
    """The plug-in point for DoRA (issue 18): a path registered first on lora.Linear serves the adapters it
    accepts — the layer is then patched and its calls reach the path; without it the layer is reported."""
    from fused_lora.integrations.peft_kinds import AdapterPath, register_path
    from fused_lora.integrations.peft_linear import LINEAR

    def make():
        torch.manual_seed(0)
        return peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["lin"], use_dora=True))

    ours = next(p for p in LINEAR.paths if p.name == "DoRA")  # fused_lora's own DoRA path, set aside here
    LINEAR.paths.remove(ours)
    calls = []

    def forward(layer, adapter, x):
        calls.append(adapter)
        return type(layer).__mro__[1].forward(layer, x)  # PEFT's DoRA forward, standing in for a fused one

    dora = lambda layer, adapter: None if layer.use_dora.get(adapter) else "not DoRA"
    path = AdapterPath("DoRA", dora, forward)
    try:
        assert fused_lora.patch_peft_model(make()).not_patched == {"base_model.model.lin": "DoRA / LoRA variant"}
        register_path("lora.Linear", path, first=True)
        model = make()
        ref = copy.deepcopy(model)
        assert fused_lora.patch_peft_model(model).patched == ["base_model.model.lin"]
        x = torch.randn(2, 3, 11)
        torch.testing.assert_close(model(x), ref(x))
        assert calls == ["default"]
    finally:
        if path in LINEAR.paths:
            LINEAR.paths.remove(path)
        LINEAR.paths.append(ours)


def test_patched_models_pickle_and_report(tmp_path):
    """Every new fused class pickles by name (torch.save / load), and the report lists kinds and reasons."""
    import pickle

    model = peft_net([*CONVS, "lin"], lora_bias=True).eval()
    report = fused_lora.patch_peft_model(model)
    text = str(report)
    assert "on fused_lora's path: 1 x lora.Conv1d, 2 x lora.Conv2d, 1 x lora.Conv3d, 1 x lora.Linear" in text, text
    back = pickle.loads(pickle.dumps(model))
    names = sorted({type(m).__qualname__ for m in back.modules() if type(m).__module__.startswith("fused_lora")})
    assert names == ["FusedLoraConv1d", "FusedLoraConv2d", "FusedLoraConv3d", "FusedLoraLinear"]
    x = torch.randn(2, 3, 11)
    torch.testing.assert_close(back(x), model(x))
    attn = peft.get_peft_model(Attn(), peft.LoraConfig(target_modules=["mha"]))
    fused_lora.patch_peft_model(attn)
    ada = adalora_model()
    fused_lora.patch_peft_model(ada)
    for m in (attn, ada):
        torch.save(m, tmp_path / "m.pt")
        assert type(torch.load(tmp_path / "m.pt", weights_only=False)) is type(m)


def test_patched_convolution_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces a patched convolution (lora_conv's autograd Function) with no
    graph break; forward and gradients equal eager's."""
    model = peft_net(["c1"], lora_bias=True).train()
    fused_lora.patch_peft_model(model)
    x = torch.randn(2, 3, 11)
    eager = step(model, x)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(compiled[0], eager[0])
    grads = {n.removeprefix("_orig_mod."): g for n, g in compiled[2].items()}
    assert grads.keys() == eager[2].keys()
    for n in eager[2]:
        torch.testing.assert_close(grads[n], eager[2][n], msg=n)


@pytest.mark.parametrize("variant", ["mica", "bdlora_a", "bdlora_b"])
def test_lora_like_variants_match_peft(variant):
    """MiCA (lora_B frozen) and BD-LoRA (a block-diagonal lora_A or lora_B) forward as LoRA does: they run
    the kernels, y and the gradients of x and of the trainable factors as PEFT's."""
    from peft.tuners.lora.config import BdLoraConfig

    torch.manual_seed(0)
    cfg = {
        "mica": {"init_lora_weights": "mica"},
        "bdlora_a": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["lin"], nblocks=3, match_strict=False)},
        "bdlora_b": {"use_bdlora": BdLoraConfig(target_modules_bd_b=["lin"], nblocks=3, match_strict=False)},
    }[variant]
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=3, target_modules=["lin"], **cfg)).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.normal_()
    ref = copy.deepcopy(model)
    assert fused_lora.patch_peft_model(model).patched == ["base_model.model.lin"]
    before = LAUNCHES.copy()
    assert_matches_peft(model, ref, torch.randn(2, 3, 11))
    assert (LAUNCHES - before)["_shrink_kernel"] == 1


@pytest.mark.parametrize("lora_bias, dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_kasa_matches_peft(lora_bias, dropout, tmp_path):
    """KaSA (a learned σ between A and B; W truncated by PEFT at init) runs the kernels with A' = σ ⊙ A: y
    and the gradients of x, A, B, σ (and lora_B's bias) as PEFT's at p = 0; with dropout, eval equals PEFT's;
    merge / unmerge and save / load are PEFT's."""
    from peft.tuners.lora.config import KasaConfig

    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, target_modules=["lin"], kasa_config=KasaConfig(), lora_bias=lora_bias,
                             lora_dropout=dropout)  # fmt: skip
    model = peft.get_peft_model(Net(), config).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ref = copy.deepcopy(model)
    assert fused_lora.patch_peft_model(model).patched == ["base_model.model.lin"]
    x = torch.randn(2, 3, 11)
    before = LAUNCHES.copy()
    if dropout == 0.0:
        assert_matches_peft(model, ref, x)
        assert any("lora_diag" in n for n in step(model, x)[2])
    else:
        step(model, x)
    assert (LAUNCHES - before)["_shrink_kernel"] >= 1
    model.eval(), ref.eval()
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    close(model(x), ref(x))
    model.merge_adapter(), ref.merge_adapter()
    close(model(x), ref(x))
    model.unmerge_adapter(), ref.unmerge_adapter()
    close(model(x), ref(x))
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path)  # KaSA truncates the fresh W as it did the first
    assert fused_lora.patch_peft_model(loaded).patched == ["base_model.model.lin"]
    close(loaded(x), ref(x))
