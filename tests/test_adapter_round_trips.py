"""PEFT's adapter files both ways, where names, wrappers and dtypes made them go wrong: each module's rank
and alpha name that module only (a name that ends another one: "fc" / "head.fc", "0" / "1.0"), compiled
models (whole, per block, one layer) save and load plain names, and a 16-bit file runs in a wider model.
The bar: the model computes what ``PeftModel.from_pretrained`` computes from the same file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.integrations import inject

peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


class Suffixes(nn.Module):
    """Module names that end other module names: fc / head.fc / head.out.fc, and 0 / 1.0 / 1.2."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.head = nn.Module()
        self.head.fc = nn.Linear(6, 6)
        self.head.out = nn.Module()
        self.head.out.fc = nn.Linear(6, 6)
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)))

    def forward(self, x):
        return self.seq(self.head.out.fc(torch.relu(self.head.fc(self.fc(x)))))


def lora_modules(peft_model) -> dict[str, tuple[int, float]]:
    """{name in the base model: (r, scaling)} of a PeftModel's LoRA layers."""
    out = {}
    for name, m in peft_model.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            out[name] = (m.r["default"], m.scaling["default"])
    return out


def ours(model) -> dict[str, tuple[int, float]]:
    return {n: (m.r, m.scaling) for n, m in inject.lora_layers(model)}


SUFFIX_CASES = {
    # name: (r, lora_alpha); the odd ones out are names that end another adapted module's name
    "rank and alpha of fc": {"fc": (2, 2), "head.fc": (4, 16), "head.out.fc": (4, 16), "seq.1.0": (4, 16)},
    "alpha of head.fc": {"fc": (4, 16), "head.fc": (4, 4), "head.out.fc": (4, 16), "seq.0": (4, 16)},
    "numeric 0": {"seq.0": (3, 3), "seq.1.0": (4, 8), "seq.1.2": (4, 8), "fc": (4, 8)},
    "only fc, head.fc plain": {"fc": (2, 6), "seq.0": (4, 4), "seq.1.2": (4, 4)},
}
# the keys written: ^ + the escaped name, only for the modules whose value is not the config's
SUFFIX_KEYS = {
    "rank and alpha of fc": ({"^fc": 2}, {"^fc": 2}),
    "alpha of head.fc": ({}, {r"^head\.fc": 4}),
    "numeric 0": ({r"^seq\.0": 3}, {r"^seq\.0": 3}),
    "only fc, head.fc plain": ({"^fc": 2}, {"^fc": 6}),
}


@pytest.mark.parametrize("case", list(SUFFIX_CASES))
def test_rank_and_alpha_patterns_name_one_module(case, tmp_path):
    """Keys were re.escape(name): PEFT's rule (and ours, mirroring it) matches a key at the end of a name,
    so `fc`'s key also matched `head.fc` and `0`'s also `1.0`: a scaling of 1.0 came back 4.0, PEFT refused
    the file, and target_modules=["fc"] gave head.fc a LoRA layer in PEFT too."""
    spec = SUFFIX_CASES[case]
    src = Suffixes()
    for name, (r, alpha) in spec.items():
        parent, _, child = name.rpartition(".")
        setattr(src.get_submodule(parent), child, fused_lora.LoRALinear.from_linear(src.get_submodule(name), r, alpha))
    inject.mark_only_lora_as_trainable(src)
    randomize(src)
    x = torch.randn(5, 6)
    expected = src(x).detach()
    fused_lora.save_adapter(src, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == SUFFIX_KEYS[case]

    back = Suffixes()
    assert fused_lora.load_adapter(back, tmp_path / "ours") == sorted(spec)
    assert ours(back) == ours(src)
    torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)

    theirs = peft.PeftModel.from_pretrained(Suffixes(), tmp_path / "ours")
    assert lora_modules(theirs) == ours(src)  # the same modules, ranks and scalings; no other module
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")  # PEFT writes our keys back as they are
    again = Suffixes()
    fused_lora.load_adapter(again, tmp_path / "theirs")
    assert ours(again) == ours(src)
    torch.testing.assert_close(again(x), expected, rtol=1e-5, atol=1e-5)


def test_peft_files_with_anchored_and_suffix_keys(tmp_path):
    """Files PEFT writes with its own keys, anchored (^seq.0) or suffix rules (fc, which matches fc,
    head.fc and head.out.fc), load with the modules PEFT gives each key."""
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc", "0"], rank_pattern={"^seq\\.0": 2, "head.fc": 3},
        alpha_pattern={"fc": 5, "^seq\\.1\\.0": 1},
    )  # fmt: skip
    theirs = peft.get_peft_model(Suffixes(), cfg)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    plain = Suffixes()
    fused_lora.load_adapter(plain, tmp_path)
    assert ours(plain) == lora_modules(theirs)
    x = torch.randn(5, 6)
    torch.testing.assert_close(plain(x), theirs(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- torch.compile


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.v = nn.Linear(6, 6)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


class Stack(nn.Module):
    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def compile_blocks(model):
    """torchtitan's way: each block compiled on its own, in place in the ModuleList."""
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, backend="eager")
    return model


WRAPPINGS = {
    "whole model": lambda m: torch.compile(m, backend="eager"),
    "each block": compile_blocks,
    "one layer": lambda m: setattr(m, "head", torch.compile(m.head, backend="eager")) or m,
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_compiled_models_save_and_load_plain_names(wrapping, tmp_path):
    """save_adapter(torch.compile(model)) wrote base_model.model._orig_mod.… keys: our loader refused the
    file and PEFT loaded nothing (silently the base model). Names are the plain model's now, for a whole
    compiled model, compiled blocks and a compiled layer, and load_adapter takes compiled models too."""
    torch._dynamo.reset()
    wrap = WRAPPINGS[wrapping]
    src = wrap(Stack())
    report = fused_lora.inject_lora(src, ["q", "head"], r=2, lora_alpha=4)
    assert report.modules == ["layers.0.q", "layers.1.q", "head"]
    randomize(src)
    x = torch.randn(4, 6)
    expected = src(x).detach()
    fused_lora.save_adapter(src, tmp_path)
    keys = set(safetensors.load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in report.modules for ab in "AB"}

    theirs = peft.PeftModel.from_pretrained(Stack(), tmp_path)
    assert set(lora_modules(theirs)) == set(report.modules)
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)

    compiled = wrap(Stack())
    plain_out = compiled(x).detach()  # traced before the load: the compiled code must see the new layers
    assert fused_lora.load_adapter(compiled, tmp_path) == sorted(report.modules)
    got = compiled(x)
    assert not torch.allclose(got, plain_out)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if wrapping == "one layer":  # the LoRA layer that replaced a compiled layer is compiled the same way
        assert isinstance(compiled.head, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(compiled.head._orig_mod, fused_lora.LoRALinear)
    assert fused_lora.merge_lora(compiled) == 3 and fused_lora.unmerge_lora(compiled) == 3
    torch._dynamo.reset()


# ---------------------------------------------------------------- dtypes


class Mixed(nn.Module):
    """A linear layer, an embedding and a convolution."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.fc(h)


def peft_file(tmp_path, dtype):
    """A PEFT adapter whose tensors are `dtype` (trained in that dtype, adapters not upcast)."""
    model = peft.get_peft_model(
        Mixed().to(dtype), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "fc"]),
        autocast_adapter_dtype=False,
    )  # fmt: skip
    randomize(model)
    model.save_pretrained(tmp_path)
    assert {t.dtype for t in safetensors.load_file(tmp_path / "adapter_model.safetensors").values()} == {dtype}
    return tmp_path


@pytest.mark.parametrize(
    ("file_dtype", "model_dtype", "adapter_dtype"),
    [
        (torch.float16, torch.float32, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float16, torch.float32),
        (torch.float32, torch.float64, torch.float64),
    ],
)
def test_new_layers_take_the_models_adapter_dtype(file_dtype, model_dtype, adapter_dtype, tmp_path, device):
    """load_adapter gave new layers the file's dtype: an fp16 file in an fp32 model (or a bf16 one) raised
    TypeError on every forward, while PEFT's from_pretrained runs the file (its adapters in fp32 for a
    16-bit base, else the base's dtype). Now inject_lora's rule; the outputs are PEFT's."""
    directory = peft_file(tmp_path, file_dtype)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    plain = Mixed().to(device, model_dtype)
    fused_lora.load_adapter(plain, directory)
    assert {m.lora_A.dtype for _, m in inject.lora_layers(plain)} == {adapter_dtype}
    if model_dtype == torch.float64:  # the kernels take no float64
        with fused_lora.use_backend("reference"):
            got = plain(ids)
    else:  # bf16 under the interpreter runs the reference, with a warning
        with pytest.warns(RuntimeWarning) if model_dtype == torch.bfloat16 and device == "cpu" else _nothing():
            got = plain(ids)
    theirs = peft.PeftModel.from_pretrained(Mixed().to(device, model_dtype), directory)
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {adapter_dtype}
    want = theirs(ids)
    # float64: conv.py builds W + ΔW in fp32 whatever W's dtype (reported), so fp32's tolerance there
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[model_dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_layers_already_there_keep_their_adapter_dtype(tmp_path):
    directory = peft_file(tmp_path, torch.float16)
    # bf16 adapters on a bf16 model (from_*'s default there would be fp32; fp64 adapters on an fp32 table are
    # refused when the layer is built, as no forward takes them)
    model = Mixed().to(torch.bfloat16)
    fused_lora.inject_lora(model, ["emb", "conv", "fc"], r=2, lora_dtype=torch.bfloat16)
    fused_lora.load_adapter(model, directory)
    assert {m.lora_A.dtype for _, m in inject.lora_layers(model)} == {torch.bfloat16}
    file = safetensors.load_file(directory / "adapter_model.safetensors")
    assert torch.equal(model.fc.lora_B, file["base_model.model.fc.lora_B.weight"].to(torch.bfloat16))
