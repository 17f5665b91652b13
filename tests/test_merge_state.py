"""A merged LoRALinear carries what restores W bit for bit wherever its state goes: copy.deepcopy,
pickle (torch.save of the module), and its state_dict loaded into a fresh layer. And load_state_dict
never leaves a layer half merged: the weight it holds always matches its `merged` flag."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from fused_lora import LoRALinear, reference


def merged_layer(dtype=torch.bfloat16, fan_in_fan_out=False, merge_weights=True):
    """A layer whose merge loses precision in many elements (bf16 W), merged by eval()."""
    layer = LoRALinear(64, 48, r=4, lora_alpha=8, dtype=dtype, fan_in_fan_out=fan_in_fan_out,
                       merge_weights=merge_weights)  # fmt: skip
    nn.init.normal_(layer.lora_B, std=0.05)
    w0 = layer.weight.detach().clone()
    layer.eval() if merge_weights else layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    return layer, w0


def _torch_round_trip(layer):
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _torch_round_trip,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_copies_of_a_merged_layer_unmerge_exactly(how, fan_in_fan_out):
    layer, w0 = merged_layer(fan_in_fan_out=fan_in_fan_out)
    twin = COPIES[how](layer)
    assert twin.merged
    twin.train()
    changed = (twin.weight != w0).sum().item()
    assert changed == 0, f"{changed} weight elements differ after unmerging a {how} of a merged layer"
    layer.train()  # the original is untouched by its copy and still round-trips
    assert torch.equal(layer.weight, w0)


def test_state_dict_of_a_merged_layer_loads_merged_and_unmerges_exactly():
    layer, w0 = merged_layer()
    state = layer.state_dict()
    fresh = LoRALinear(64, 48, r=4, lora_alpha=8, dtype=torch.bfloat16)  # training mode, unmerged
    fresh.load_state_dict(state, strict=True)
    # A training-mode layer with merge_weights follows its mode: it unmerges what it loaded, exactly.
    assert not fresh.merged and torch.equal(fresh.weight, w0)
    assert torch.equal(fresh.lora_B, layer.lora_B)
    fresh.eval()
    assert torch.equal(fresh.weight, layer.weight)

    evaluating = LoRALinear(64, 48, r=4, lora_alpha=8, dtype=torch.bfloat16).eval()
    evaluating.load_state_dict(state)  # an eval-mode layer stays merged, and still round-trips
    assert evaluating.merged and torch.equal(evaluating.weight, layer.weight)
    evaluating.train()
    assert torch.equal(evaluating.weight, w0)


def test_explicitly_merged_state_stays_merged():
    layer, w0 = merged_layer(merge_weights=False)
    fresh = LoRALinear(64, 48, r=4, lora_alpha=8, dtype=torch.bfloat16, merge_weights=False)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged and torch.equal(fresh.weight, layer.weight)
    fresh.unmerge()
    assert torch.equal(fresh.weight, w0)


def test_unmerged_state_loaded_into_a_merged_layer():
    """An eval-mode (merged) model loading a training checkpoint: the loaded W is the base weight, the
    layer re-merges it with the loaded adapters instead of running the base weight alone."""
    src = LoRALinear(64, 48, r=4, lora_alpha=8, dtype=torch.bfloat16)
    nn.init.normal_(src.lora_B, std=0.05)
    state = {k: v.clone() for k, v in src.state_dict().items()}  # unmerged (src merges below)
    target, _ = merged_layer()  # other weights, merged
    target.load_state_dict(state)
    assert target.merged
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    src.eval()
    torch.testing.assert_close(target(x), src(x))
    target.train()
    assert torch.equal(target.weight, state["weight"])


def test_adapters_only_load_into_a_merged_layer():
    """lora_state_dict-style loads (no weight) into a merged layer: W keeps its base, the new adapters
    are merged in place of the old ones."""
    layer, w0 = merged_layer()
    new_b = torch.randn_like(layer.lora_B) * 0.05
    missing, unexpected = layer.load_state_dict({"lora_B": new_b}, strict=False)
    assert "weight" in missing and not unexpected
    assert layer.merged
    layer.train()
    assert torch.equal(layer.weight, w0) and torch.equal(layer.lora_B, new_b)


def test_changed_adapters_skip_the_record():
    """If A or B change while merged, the record no longer applies: unmerge subtracts the current delta
    (as loralib does) and applies no stale fix; its state_dict says merged, with an empty record."""
    layer, _ = merged_layer()
    with torch.no_grad():
        layer.lora_B.mul_(2.0)
    state = layer.state_dict()
    assert state["unmerge_index"].numel() == 0 and state["unmerge_value"].numel() == 0
    merged = layer.weight.detach().clone()
    layer.train()
    plain = (merged.float() - reference.merge_delta(layer.lora_A, layer.lora_B, layer.scaling)).to(merged.dtype)
    assert torch.equal(layer.weight, plain)


def test_unmerged_state_dict_is_unchanged():
    """An unmerged layer's state_dict has exactly loralib's keys (strict interchange holds)."""
    layer = LoRALinear(8, 6, r=2)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    layer.eval()
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B", "unmerge_index", "unmerge_value"]


def test_load_adapter_into_a_merged_model(tmp_path):
    """load_adapter into layers merged by eval(): the new adapters are merged into the base W, not
    copied beside a W merged with the old ones."""
    pytest.importorskip("safetensors")
    import fused_lora

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    src, dst = copy.deepcopy(base), copy.deepcopy(base)
    fused_lora.inject_lora(src, ["0", "2"], r=4, merge_weights=True)
    for m in (src[0], src[2]):
        nn.init.normal_(m.lora_B, std=0.3)
    fused_lora.save_adapter(src, tmp_path)
    fused_lora.inject_lora(dst, ["0", "2"], r=4, merge_weights=True)
    dst.eval()  # merged, with B = 0
    fused_lora.load_adapter(dst, tmp_path)
    src.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(dst(x), src(x))
    dst.train()
    assert torch.equal(dst[0].weight, base[0].weight) and torch.equal(dst[2].weight, base[2].weight)
