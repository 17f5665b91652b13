"""inject_lora / loralib helpers / merge on plain models, patch_peft_model on PEFT models, and PEFT's
adapter files, on a tiny Llama built from LlamaConfig (no download). The kernels really run (the
interpreter in CI): launch counts are checked."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.kernels import LAUNCHES

from helpers import assert_close_to_ref
from models import batch, peft_model, randomize_lora, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


# ---------------------------------------------------------------- plain models (inject_lora)


def test_inject_wraps_without_copy_and_freezes(device):
    model = tiny_llama(device)
    q = model.model.layers[0].self_attn.q_proj
    inputs = batch(device)
    before = model(**inputs).logits
    report = fused_lora.inject_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert len(report.modules) == 4 and "model.layers.0.self_attn.q_proj" in report.modules
    new_q = model.model.layers[0].self_attn.q_proj
    assert isinstance(new_q, fused_lora.LoRALinear) and new_q.weight is q.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert report.trainable_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert "trainable parameters" in str(report)
    torch.testing.assert_close(model(**inputs).logits, before)  # B = 0 at start


def test_target_forms_and_errors():
    model = tiny_llama()
    names = fused_lora.integrations.inject.find_targets
    assert len(names(model, r".*\.mlp\.(up|down)_proj")) == 4
    all_linear = names(model, "all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear
    assert len(names(model, "all-linear", exclude_modules=["o_proj"])) == 12
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module; available: nn.Linear: \["):
        fused_lora.inject_lora(model, ["q_proj", "qproj"])
    with pytest.raises(TypeError, match=r"is a LlamaRMSNorm, not an nn\.Linear"):
        fused_lora.inject_lora(model, ["input_layernorm"])
    assert not any(isinstance(m, fused_lora.LoRALinear) for m in model.modules()), "half-injected"
    fused_lora.inject_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already"):
        fused_lora.inject_lora(model, ["v_proj"])


def test_loralib_helpers_and_state_dicts_interchange(device):
    loralib = pytest.importorskip("loralib")
    ours = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    fused_lora.inject_lora(ours, ["0", "2"], r=3, lora_alpha=6)
    theirs = nn.Sequential(
        loralib.Linear(12, 10, r=3, lora_alpha=6), nn.ReLU(), loralib.Linear(10, 6, r=3, lora_alpha=6)
    )
    loralib.mark_only_lora_as_trainable(theirs)
    randomize_lora(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.to(device)
    theirs.to(device)
    x = torch.randn(5, 12, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for bias in ("none", "all", "lora_only"):
        assert fused_lora.lora_state_dict(ours, bias).keys() == loralib.lora_state_dict(theirs, bias).keys()
        fused_lora.mark_only_lora_as_trainable(ours, bias)
        loralib.mark_only_lora_as_trainable(theirs, bias)
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(ValueError, match="bias must be one of"):
        fused_lora.lora_state_dict(ours, "some")


def test_merge_unmerge_model_round_trip(device):
    model = tiny_llama(device)
    fused_lora.inject_lora(model, "all-linear", r=4)
    randomize_lora(model)
    state = copy.deepcopy(model.state_dict())
    inputs = batch(device)
    unmerged = model(**inputs).logits
    assert fused_lora.merge_lora(model) == 14
    merged = model(**inputs).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    assert fused_lora.unmerge_lora(model) == 14
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------- PEFT models


def test_patched_peft_matches_peft(device):
    """Loss and every LoRA gradient of the patched model equal PEFT's own, by the parity rule against
    the same model run unpatched in float64."""
    model = peft_model(device)
    inputs = batch(device)
    ref64 = loss_and_grads(copy.deepcopy(model).double(), inputs)
    same = loss_and_grads(model, inputs)
    keys_before = list(model.state_dict())
    report = fused_lora.patch_peft_model(model)
    assert len(report.patched) == 14 and not report.not_patched
    before = LAUNCHES.copy()
    got = loss_and_grads(model, inputs)
    launched = LAUNCHES - before
    assert launched["_shrink_kernel"] == 14 and launched["_lora_grad_kernel"] == 14, launched
    assert_close_to_ref("loss", got[0], ref64[0], same[0])
    assert got[1].keys() == same[1].keys() and len(got[1]) == 28
    for n in got[1]:
        assert_close_to_ref(n, got[1][n], ref64[1][n], same[1][n])
    assert list(model.state_dict()) == keys_before

    again = fused_lora.patch_peft_model(model)
    assert not again.patched and len(again.already_patched) == 14
    assert fused_lora.unpatch_peft_model(model) == 14
    before = LAUNCHES.copy()
    loss_and_grads(model, inputs)
    assert LAUNCHES - before == {}, "unpatched layers must run PEFT's forward"


def test_peft_features_keep_working(device, tmp_path):
    """Adapter switching, mixed-adapter batches, merging, disabling and save/load, while patched."""
    model = peft_model(device)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.0))
    randomize_lora(model, seed=5)
    model.eval()  # PEFT takes adapter_names only in eval mode
    inputs = batch(device)
    ref = copy.deepcopy(model)

    fused_lora.patch_peft_model(model)
    for adapter in ("second", "default"):
        model.set_adapter(adapter)
        ref.set_adapter(adapter)
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-4)
    names = ["default", "second"]
    mixed = {"input_ids": inputs["input_ids"], "adapter_names": names}
    torch.testing.assert_close(model(**mixed).logits, ref(**mixed).logits, rtol=1e-4, atol=1e-4)
    with model.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-4)
    model.unmerge_adapter()

    model.save_pretrained(tmp_path / "saved")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(device), tmp_path / "saved")
    torch.testing.assert_close(loaded(**inputs).logits, ref(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_unservable_layers_are_reported(device, caplog):
    model = peft_model(device, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=False)
    dora = peft_model(device, target_modules=["q_proj"], use_dora=True)
    with caplog.at_level(logging.INFO, logger="fused_lora"):
        report = fused_lora.patch_peft_model(model)
    assert len(report.patched) == 5 and "base_model.model.model.embed_tokens" in report.patched  # lora.Embedding too
    assert "5 PEFT LoRA layers patched, 0 already patched, 0 left on PEFT's forward (none)" in caplog.text
    emb = peft_model(device, target_modules=["embed_tokens"])
    emb.base_model.model.model.embed_tokens.base_layer.sparse = True
    report = fused_lora.patch_peft_model(emb)
    assert report.not_patched == {"base_model.model.model.embed_tokens": "sparse embedding"}
    report = fused_lora.patch_peft_model(dora)  # DoRA lora.Linear: its own fused path (fused_lora.dora)
    assert len(report.patched) == 2 and not report.not_patched
    hooked = peft_model(device, target_modules=["q_proj"])
    hooked.base_model.model.model.layers[0].self_attn.q_proj.base_layer.register_forward_pre_hook(lambda m, a: None)
    report = fused_lora.patch_peft_model(hooked)
    assert len(report.patched) == 1 and "forward hooks" in next(iter(report.not_patched.values()))
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fused_lora.patch_peft_model(tiny_llama(device))


# ---------------------------------------------------------------- PEFT's adapter files


def test_adapter_saved_by_us_loads_in_peft_and_back(device, tmp_path):
    ours = tiny_llama(device)
    fused_lora.inject_lora(ours, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    randomize_lora(ours)
    inputs = batch(device)
    expected = ours(**inputs).logits
    fused_lora.save_adapter(ours, tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(tiny_llama(device), tmp_path / "ours")
    torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=1e-4, atol=1e-4)

    theirs.save_pretrained(tmp_path / "theirs")
    back = tiny_llama(device)
    loaded = fused_lora.load_adapter(back, tmp_path / "theirs")
    assert len(loaded) == 6
    torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    fused_lora.load_adapter(back, tmp_path / "ours")  # into already-injected layers


def test_adapter_files_from_peft_with_rank_patterns(device, tmp_path):
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "up_proj"],
        lora_dropout=0.0,
        rank_pattern={"up_proj": 2},
        alpha_pattern={"up_proj": 3},
    )
    model = peft.get_peft_model(tiny_llama(device), cfg)
    randomize_lora(model)
    model.save_pretrained(tmp_path / "p")
    inputs = batch(device)
    plain = tiny_llama(device)
    fused_lora.load_adapter(plain, tmp_path / "p")
    up = plain.model.layers[1].mlp.up_proj
    assert up.r == 2 and up.lora_alpha == 3 and plain.model.layers[1].self_attn.q_proj.r == 4
    torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)
    fused_lora.save_adapter(plain, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama(device), tmp_path / "again")
    torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_layers_without_adapters_are_skipped(tmp_path):
    """r = 0 layers and a MergedLinear with no group enabled (loralib's plain layers) have nothing to
    save: save_adapter writes the others, load_adapter does not ask the file for them."""
    from safetensors.torch import load_file

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({
            "merged": fused_lora.MergedLinear(8, 24, r=4, enable_lora=[False] * 3),
            "plain": fused_lora.LoRALinear(8, 24, r=0),
            "emb": fused_lora.Embedding(10, 8, r=0),
            "b": fused_lora.LoRALinear(8, 8, r=2),
        })  # fmt: skip

    src = model()
    nn.init.normal_(src.b.lora_B)
    fused_lora.save_adapter(src, tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.b.lora_A.weight",
        "base_model.model.b.lora_B.weight",
    }
    dst = model()
    assert fused_lora.load_adapter(dst, tmp_path) == ["b"]
    assert torch.equal(dst.b.lora_B, src.b.lora_B)
    with pytest.raises(ValueError, match=r"no LoRALinear, Embedding or Conv1d/2d/3d layers with adapters"):
        fused_lora.save_adapter(nn.Sequential(fused_lora.LoRALinear(8, 8, r=0)), tmp_path / "none")


def test_adapter_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        fused_lora.save_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        fused_lora.load_adapter(tiny_llama(), tmp_path)
    model = tiny_llama()
    fused_lora.inject_lora(model, ["q_proj"], r=4)
    fused_lora.save_adapter(model, tmp_path / "a")
    other = tiny_llama()
    fused_lora.inject_lora(other, ["v_proj"], r=4)
    with pytest.raises(ValueError, match="do not match the adapter"):
        fused_lora.load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize("merge_weights", [False, True])
def test_parametrized_targets_are_refused_clearly(merge_weights):
    """A weight_norm'd Linear gave torch's 'cannot assign FloatTensor as parameter' (merge_weights=False) or
    a bare KeyError (True)."""
    from torch.nn.utils import parametrizations, parametrize

    model = nn.Module()
    model.proj = parametrizations.weight_norm(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"proj is parametrized.*remove_parametrizations"):
        fused_lora.inject_lora(model, ["proj"], r=2, merge_weights=merge_weights)
    assert parametrize.is_parametrized(model.proj) and not isinstance(model.proj, fused_lora.LoRALinear)  # untouched
