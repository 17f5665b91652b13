"""The end-to-end example runs: inject or patch, train, save, reload, same outputs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

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


def test_example_runs_on_one_cpu_thread_and_restores_the_count(monkeypatch):
    """Threads make this tiny model several times slower on busy cores: one by default, then restored."""
    if torch.cuda.is_available():
        pytest.skip("the thread count applies on the CPU only")
    seen = []
    monkeypatch.setattr(finetune_tiny, "run", lambda ns, device: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert finetune_tiny.main([]) == 0
        assert finetune_tiny.main(["--threads", "2"]) == 0
        assert seen == [1, 2] and torch.get_num_threads() == 2
        with pytest.raises(SystemExit):
            finetune_tiny.main(["--threads", "0"])
    finally:
        torch.set_num_threads(before)


def test_example_names_only_an_adapter_folder_that_stays(tmp_path, capsys):
    """The adapter goes to a temporary folder deleted at exit unless --out names one: the script must not
    print a path that no longer exists once it returns, and --out's folder is kept and named."""
    argv = ["--steps", "1", "--batch", "1", "--no-progress", "--rank", "2"]
    with fused_lora.use_backend("reference"):
        assert finetune_tiny.main(argv) == 0
        out = capsys.readouterr().out
        assert "adapter saved to a temporary folder, deleted at exit (--out DIR keeps it)" in out, out
        for path in re.findall(r"(/\S+)", out):
            assert Path(path.rstrip(":,")).exists(), f"{path} is printed but gone"
        assert finetune_tiny.main([*argv, "--out", str(tmp_path / "kept")]) == 0
    assert f"adapter saved to {tmp_path / 'kept'}: [" in capsys.readouterr().out
    assert (tmp_path / "kept" / "adapter_config.json").exists()
