"""patch_peft_model in the corners PEFT users reach: the printed form, adapters added after patching,
and a patched model pickled and loaded in a new process."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import pytest
import torch

import fused_lora
from fused_lora.kernels import LAUNCHES

from models import batch, peft_model, randomize_lora

peft = pytest.importorskip("peft")


def test_patched_layers_print_as_peft_does():
    """PEFT's repr tests expect "lora.Linear(...)"; patching changes no line of the model's repr."""
    model = peft_model()
    before = repr(model)
    fused_lora.patch_peft_model(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__qualname__ == "FusedLoraLinear" and type(layer).__name__ == "Linear"  # PEFT's name
    assert repr(layer).startswith("lora.Linear(")
    assert repr(model) == before


def test_adapters_added_after_patching_run_fused(caplog, tmp_path, device):
    """add_adapter / load_adapter on new target modules: the new lora.Linear layers are patched too."""
    model = peft_model(device, target_modules=["q_proj"])
    assert len(fused_lora.patch_peft_model(model).patched) == 2
    with caplog.at_level(logging.INFO, logger="fused_lora"):
        model.add_adapter("mlp", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"]))
    assert "after inject_adapter" in caplog.text and "2 PEFT LoRA layers patched" in caplog.text
    up = model.base_model.model.model.layers[1].mlp.up_proj
    assert type(up).__qualname__ == "FusedLoraLinear"
    randomize_lora(model, seed=4)
    model.set_adapter("mlp")
    ref = copy.deepcopy(model)
    fused_lora.unpatch_peft_model(ref)
    inputs = batch(device)
    before = LAUNCHES.copy()
    got = model(**inputs).logits
    assert (LAUNCHES - before)["_shrink_kernel"] == 2, "the new layers must run the kernels"
    torch.testing.assert_close(got, ref(**inputs).logits, rtol=1e-4, atol=1e-4)

    other = peft_model(target_modules=["down_proj"])  # a saved adapter on yet other modules
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="down")
    assert type(model.base_model.model.model.layers[0].mlp.down_proj).__qualname__ == "FusedLoraLinear"

    assert fused_lora.unpatch_peft_model(model) == 6
    assert "inject_adapter" not in model.base_model.__dict__  # PEFT's own method again
    model.add_adapter("after", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    assert type(model.base_model.model.model.layers[0].self_attn.k_proj).__qualname__ == "Linear"


LOAD = """
import sys, torch
model = torch.load(sys.argv[1], weights_only=False)  # nothing imported by hand: pickle finds the classes
classes = sorted({type(m).__qualname__ for m in model.modules() if type(m).__module__.startswith("fused_lora")})
with torch.no_grad():
    logits = model(input_ids=torch.load(sys.argv[2])).logits
torch.save({"classes": classes, "logits": logits}, sys.argv[3])
"""


def test_pickled_patched_model_loads_in_a_new_process(tmp_path):
    model = peft_model()
    fused_lora.patch_peft_model(model)
    ids = batch()["input_ids"]
    with torch.no_grad(), fused_lora.use_backend("reference"):  # what the CPU runs in the new process
        expected = model(input_ids=ids).logits
    torch.save(model, tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    assert "import fused_lora" not in LOAD
    run = subprocess.run(
        [sys.executable, "-c", LOAD, *(str(tmp_path / n) for n in ("model.pt", "ids.pt", "out.pt"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["classes"] == ["FusedLoraLinear"]
    torch.testing.assert_close(out["logits"], expected)
