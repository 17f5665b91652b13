"""The end-to-end example runs: inject or patch, train, save, reload, same outputs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import fused_lora

pytest.importorskip("transformers")
pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_tiny


@pytest.mark.parametrize("peft", [False, True], ids=["inject", "peft"])
def test_example_trains_and_reloads(peft, capsys):
    argv = ["--steps", "60", "--no-progress"] + (["--peft"] if peft else [])
    with fused_lora.use_backend("reference"):
        assert finetune_tiny.main(argv) == 0
    out = capsys.readouterr().out
    first, last = map(float, re.search(r"loss: ([\d.]+) over the first 10 steps -> ([\d.]+)", out).groups())
    assert last < 0.6 * first, out


def test_example_runs_on_the_kernels(capsys):
    """A few steps with the Triton backend (the interpreter here, the GPU elsewhere): it runs unchanged."""
    assert finetune_tiny.main(["--steps", "2", "--batch", "1", "--no-progress", "--rank", "4"]) == 0
    assert "max |logits difference| = 0.00e+00" in capsys.readouterr().out
