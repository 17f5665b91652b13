"""The QLoRA benchmark providers (opt-in): the smoke run checks each against the fp64 reference on its own
dequantised weight (the dequantisation alone against the reference dequantiser), and at full size (meta
device) ours keeps for backward what the 16-bit fused layer keeps: no weight-sized tensor."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import fused_lora
from fused_lora.bench import offline
from fused_lora.bench.providers import Case


def test_smoke_of_the_qlora_providers():
    rows = offline.smoke(["qlora", "peft-qlora", "dequant"])
    bad = [r for r in rows if r["result"] == "FAILED"]
    assert not bad, bad
    assert {r["provider"] for r in rows if r["result"] == "ok"} >= {"qlora", "dequant"}


def test_qlora_keeps_what_the_16_bit_layer_keeps_at_full_size():
    case = Case("mlp-up-8b", 8192, 4096, 14336, 16, torch.bfloat16, torch.float32, 0.1, "meta")
    rows = {r["provider"]: r for r in offline.memory_rows([case], ["fused", "qlora"], {}, progress=False)}
    assert rows["qlora"]["saved_mb"] == rows["fused"]["saved_mb"] < 1.0, rows


@pytest.mark.integration
@pytest.mark.parametrize("peft", [False, True], ids=["inject", "peft"])
def test_example_4bit_trains_and_reloads(peft, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import finetune_tiny

    argv = ["--4bit", "--steps", "40", "--no-progress"] + (["--peft"] if peft else [])
    with fused_lora.use_backend("reference"):
        assert finetune_tiny.main(argv) == 0
    out = capsys.readouterr().out
    first, last = map(float, re.search(r"loss: ([\d.]+) over the first 10 steps -> ([\d.]+)", out).groups())
    assert last < 0.6 * first, out


def test_example_4bit_without_bitsandbytes_is_a_clear_error(monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    pytest.importorskip("transformers")
    import importlib.util

    import finetune_tiny

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(SystemExit):
        finetune_tiny.main(["--4bit"])
    assert "needs bitsandbytes" in capsys.readouterr().err
