"""load_adapter / inject_lora that fail change nothing, and files PEFT computes something else with are
refused: after every refusal (a sparse embedding, a lazy convolution, a shape, a missing module, a bad
config value, ...) and every failure midway, the model is exactly as it was (modules, parameters,
requires_grad flags, state_dict, merges) and the right file then loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.integrations import adapter_io, inject

peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def lora_modules(peft_model) -> set[str]:
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---------------------------------------------------------------- a failure changes nothing


class Target(nn.Module):
    """Every kind of layer LoRA wraps, and one it does not (norm). Sorted names: conv, emb, fc1, fc2."""

    def __init__(self, seed=0, sparse=False, lazy=False, out=4):
        torch.manual_seed(seed)
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.emb = nn.Embedding(20, 6, sparse=sparse)
        self.conv = nn.LazyConv1d(6, 3, padding=1) if lazy else nn.Conv1d(6, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, out)

    def forward(self, ids):
        h = self.conv(self.fc1(self.emb(ids)).transpose(1, 2)).transpose(1, 2)
        return self.fc2(self.norm(h))


TARGETS = ["conv", "emb", "fc1", "fc2"]


def snapshot(model: nn.Module) -> dict:
    """Everything a failed change must leave as it was."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.dtype) for n, p in model.named_parameters()],
        "state": {k: v if is_lazy(v) else v.detach().clone() for k, v in model.state_dict().items()},
        "settings": [
            (getattr(m, "lora_alpha", None), getattr(m, "use_rslora", None), getattr(m, "merged", None))
            for m in model.modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("modules", "params", "settings"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert after["state"][k] is v if is_lazy(v) else torch.equal(after["state"][k], v), k


def is_lazy(t) -> bool:
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


@pytest.fixture
def good_file(tmp_path):
    src = Target(seed=1)
    fused_lora.inject_lora(src, TARGETS, r=2, lora_alpha=4)
    randomize(src)
    fused_lora.save_adapter(src, tmp_path / "good")
    return tmp_path / "good"


def edited(directory, tmp_path, config=None, tensors=None):
    """A copy of the adapter in `directory` with config entries replaced and tensors edited."""
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg.update(config or {})
    state = safetensors.load_file(directory / "adapter_model.safetensors")
    if tensors:
        state = tensors(state)
    out = tmp_path / "edited"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    safetensors.save_file(state, out / "adapter_model.safetensors")
    return out


def rename(old, new):
    return lambda state: {k.replace(f".{old}.", f".{new}."): v for k, v in state.items()}


def fail_on_call(monkeypatch, module, name, n):
    """Make module.name raise on its n-th call (the earlier calls do their work)."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError(f"{name} failed on call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


LOAD_FAILURES = {
    "sparse embedding": (dict(sparse=True), {}, None, ValueError, r"emb: an nn.Embedding with sparse=True"),
    "lazy convolution": (dict(lazy=True), {}, None, ValueError, r"conv \(LazyConv1d\) has uninitialised"),
    "shape": (dict(out=5), {}, None, ValueError, r"fc2: adapter shapes"),
    "missing module": ({}, {}, rename("fc2", "extra"), ValueError, r"does not have: \['extra'\]"),
    "not a LoRA target": ({}, {}, rename("fc2", "norm"), TypeError, r"norm is named by the adapter file but is a"),
    "alpha": ({}, {"lora_alpha": "4"}, None, ValueError, r"lora_alpha must be a real number"),
    "dropout": ({}, {"lora_dropout": 1.5}, None, ValueError, r"dropout_p must be in \[0, 1\)"),
    "rank": ({}, {"r": 3}, None, ValueError, r"rank 2, its config gives this module r=3"),
    "integer tensors": ({}, {}, lambda s: {k: v.long() for k, v in s.items()}, ValueError, r"floating point"),
}


@pytest.mark.parametrize("case", list(LOAD_FAILURES))
def test_a_refused_load_leaves_the_model_as_it_was(case, good_file, tmp_path):
    """A target that cannot take LoRA (a sparse embedding) was refused after earlier modules had been
    replaced and frozen, and the retry then failed. Now every check comes first: after each refusal the
    model is exactly as it was, and the right file then loads."""
    model_kw, config, tensors, error, match = LOAD_FAILURES[case]
    model = Target(**model_kw)
    before = snapshot(model)
    directory = edited(good_file, tmp_path, config, tensors) if config or tensors else good_file
    with pytest.raises(error, match=match):
        fused_lora.load_adapter(model, directory)
    assert_unchanged(model, before)
    if not model_kw:
        assert fused_lora.load_adapter(model, good_file) == TARGETS


@pytest.mark.parametrize(("step", "call"), [("wrap_module", 3), ("copy_full_into", 5)])
def test_a_load_that_fails_midway_is_undone(step, call, good_file, monkeypatch):
    """Should building a layer or copying an adapter still fail, what was done is undone."""
    model = Target()
    before = snapshot(model)
    fail_on_call(monkeypatch, adapter_io, step, call)
    with pytest.raises(RuntimeError, match="failed on call"):
        fused_lora.load_adapter(model, good_file)
    assert_unchanged(model, before)


@pytest.mark.parametrize("merged", [False, True])
def test_a_load_into_lora_layers_that_fails_midway_is_undone(merged, good_file, monkeypatch):
    """Into layers that are LoRA layers already (merged or not): their adapters, scalings, merges and W
    come back bit for bit."""
    model = Target()
    fused_lora.inject_lora(model, TARGETS, r=2, lora_alpha=1, use_rslora=True)
    randomize(model, seed=5)
    if merged:
        fused_lora.merge_lora(model)
    before = snapshot(model)
    fail_on_call(monkeypatch, adapter_io, "copy_full_into", 6)
    with pytest.raises(RuntimeError, match="failed on call"):
        fused_lora.load_adapter(model, good_file)
    assert_unchanged(model, before)


INJECT_FAILURES = {
    "sparse embedding": (dict(sparse=True), {}, ValueError, r"emb: an nn.Embedding with sparse=True"),
    "lazy convolution": (dict(lazy=True), {}, ValueError, r"conv \(LazyConv1d\) has uninitialised"),
    "alpha": ({}, dict(lora_alpha="8"), TypeError, r"lora_alpha must be a real number"),
    "alpha nan": ({}, dict(lora_alpha=float("nan")), ValueError, r"lora_alpha must be finite"),
    "dropout": ({}, dict(lora_dropout=1.0), ValueError, r"dropout_p must be in"),
    "rank": ({}, dict(r=-1), ValueError, r"r must be >= 0"),
    "use_rslora": ({}, dict(use_rslora="no"), TypeError, r"use_rslora must be a bool"),
}


@pytest.mark.parametrize("case", list(INJECT_FAILURES))
def test_a_refused_inject_leaves_the_model_as_it_was(case):
    """inject_lora froze the weights of the layers it had built before a later target was refused (a
    sparse embedding, a lazy convolution), and took a lora_alpha of "8" that failed only at the first
    forward."""
    model_kw, kw, error, match = INJECT_FAILURES[case]
    model = Target(**model_kw)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fused_lora.inject_lora(model, ["fc1", "fc2", "emb", "conv"], **kw)
    assert_unchanged(model, before)


def test_an_inject_that_fails_midway_is_undone(monkeypatch):
    model = Target()
    before = snapshot(model)
    fail_on_call(monkeypatch, inject, "wrap_module", 3)
    with pytest.raises(RuntimeError, match="failed on call"):
        fused_lora.inject_lora(model, TARGETS)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- files PEFT computes something else with

REFUSED_CONFIGS = {
    "use_dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "alora_invocation_tokens": {"alora_invocation_tokens": [5, 6]},
    "kasa_config": {"kasa_config": {"x": 1}},
    "use_bdlora": {"use_bdlora": {"nblocks": 2}},
    "layer_replication": {"layer_replication": [[0, 1]]},
    "target_parameters": {"target_parameters": ["fc1.weight"]},
    "init_lora_weights='pissa'": {"init_lora_weights": "pissa"},
    "init_lora_weights='pissa_niter_4'": {"init_lora_weights": "pissa_niter_4"},
    "init_lora_weights='olora'": {"init_lora_weights": "olora"},
    "init_lora_weights='loftq'": {"init_lora_weights": "loftq"},
    "init_lora_weights='corda'": {"init_lora_weights": "corda"},
    "init_lora_weights='lora_ga'": {"init_lora_weights": "lora_ga"},
    "init_lora_weights='something_new'": {"init_lora_weights": "something_new"},
    "settings unknown": {"use_something_new": True},
    "peft_type": {"peft_type": "LOHA"},
    "lora_alpha": {"lora_alpha": float("nan")},
    "lora_alpha=true": {"lora_alpha": True},
    "use_rslora": {"use_rslora": "false"},
    "r": {"r": 0},
    "rank_pattern": {"rank_pattern": {"fc2": 3}},
    "alpha_pattern": {"alpha_pattern": {"(": 2}},
}


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS))
def test_settings_that_change_what_peft_computes_are_refused(case, good_file, tmp_path):
    """These files loaded as plain LoRA: a silently different model from the one PEFT builds from them
    (DoRA, aLoRA, KaSA, ... ; a PiSSA / OLoRA / LoftQ / CorDA / LoRA-GA init PEFT re-runs on load, changing
    W; a NaN alpha; "false" read as true), or one PEFT refuses (a rank that is not the tensors')."""
    config = REFUSED_CONFIGS[case]
    model = Target()
    before = snapshot(model)
    with pytest.raises(ValueError, match=case.split("=")[0]):
        fused_lora.load_adapter(model, edited(good_file, tmp_path, config))
    assert_unchanged(model, before)


def test_a_pissa_file_is_refused_because_peft_changes_the_base_weight(tmp_path):
    """PEFT's from_pretrained runs PiSSA's initialisation again (W ← W − s·B₀A₀), then loads the trained
    adapters: loaded as plain LoRA into the original W, the model computed something else."""
    base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    w0 = base[0].weight.detach().clone()
    trained = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa")
    )
    trained.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not torch.equal(theirs.base_model.model[0].base_layer.weight, w0)  # PEFT changed W
    plain = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa': PEFT runs this initialisation again"):
        fused_lora.load_adapter(plain, tmp_path)
    assert torch.equal(plain[0].weight, w0) and type(plain[0]) is nn.Linear


def test_a_valid_file_is_not_refused_for_a_module_it_does_not_name(tmp_path):
    """load_adapter checked the file's names with inject_lora's suffix rule: a file for `0` was refused
    because `1.0`, which the file does not name, is a LayerNorm."""
    src = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.LayerNorm(6)))
    fused_lora.inject_lora(src, "0", r=2)  # a regular expression: the whole name
    randomize(src)
    fused_lora.save_adapter(src, tmp_path)
    plain = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.LayerNorm(6)))
    assert fused_lora.load_adapter(plain, tmp_path) == ["0"]
    theirs = peft.PeftModel.from_pretrained(nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.LayerNorm(6))), tmp_path)
    assert lora_modules(theirs) == {"0"}
