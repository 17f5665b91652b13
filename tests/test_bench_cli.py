"""The main job as a newcomer meets it: bad flags are one-line argparse errors naming the flag and what it
takes, --help gives every default, the default run writes only into a folder git ignores, and without a
GPU the plots step draws the modelled times and the saved bytes, labelled as such."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fused_lora.bench import cli, options, plots
from fused_lora.bench.model import PROVIDERS

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--shapes", "attn-7b", "--ranks", "16", "--dropout", "0.1", "--providers", "fused,peft", "--modes", "fwdbwd"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--providers", "bogus"],
            f"argument --providers: unknown provider 'bogus'; choose from {', '.join(PROVIDERS)}",
        ),
        (["--modes", "xyz"], "argument --modes: unknown mode 'xyz'; choose from fwd, bwd, fwdbwd"),
        (["--ranks", "0"], "argument --ranks: 0 is not a valid rank; ranks are integers >= 1"),
        (["--ranks", "4,x"], "argument --ranks: 'x' is not a rank; ranks are integers >= 1"),
        (["--dropout", "1.5"], "argument --dropout: 1.5 is not a valid dropout; dropout is in [0, 1)"),
        (["--dropout", "nan"], "argument --dropout: nan is not a valid dropout"),
        (["--shapes", "attn-7b,attn-13b"], "argument --shapes: unknown shape 'attn-13b'; choose from attn-7b, "),
        (["--tokens", "8k"], "argument --tokens: '8k' is not a token count; token counts (M) are integers >= 1"),
        (["--tokens", ","], "argument --tokens: an empty list"),
        (["--rep", "0"], "argument --rep: 0 must be >= 1"),
        (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8' (choose from "),
    ],
)
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_help_gives_every_flag_and_its_default():
    ap = options.parser()
    text = ap.format_help()
    flags = [a for a in ap._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == 16
    blocks = text.split("\n  -")
    for action in flags:
        block = next(b for b in blocks if b.startswith(action.option_strings[0][1:]))
        assert "default" in " ".join(block.split()), f"{action.option_strings[0]} has no default in --help"
    assert "(default: 1,4,8,16,32,64,128,256; 16 for the decoder case)" in " ".join(text.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU main job (with a GPU, cli.main measures)")
def test_default_run_writes_only_into_the_ignored_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*QUICK, "--no-plots", "--no-progress"]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["bench/results/local/no-gpu-tables.txt", "bench/results/local/no-gpu.jsonl"]
    assert "results:      bench/results/local/no-gpu.jsonl\n              (4 rows" in capsys.readouterr().out


def test_the_results_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    probe = f"{options.RESULTS_DIR}/anything.jsonl"
    assert subprocess.run(["git", "check-ignore", "-q", probe], cwd=REPO).returncode == 0, f"{probe} is not ignored"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU main job (with a GPU, cli.main measures)")
def test_without_a_gpu_the_plots_show_modelled_time_and_saved_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.jsonl"
    argv = ["--shapes", "attn-7b", "--ranks", "4,16", "--dropout", "0,0.1", "--modes", "fwdbwd", "--out", str(out)]
    assert cli.main([*argv, "--no-plots", "--no-progress"]) == 0
    rows = plots.load(out)
    assert not any(r["speed_valid"] for r in rows)
    titles = {name: " ".join(fig._suptitle.get_text().split()) for name, fig in plots.figures(rows)}  # unwrapped
    assert sorted(titles) == ["modelled-time-fwdbwd", "saved-bytes"]
    assert (
        titles["modelled-time-fwdbwd"].startswith("MODELLED time")
        and "NOT a measurement" in titles["modelled-time-fwdbwd"]
    )
    assert "measured with autograd's saved-tensor hooks" in titles["saved-bytes"]
    assert plots.main([str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["run-modelled-time-fwdbwd.png", "run-saved-bytes.png"]
    with pytest.raises(SystemExit):
        plots.main([str(tmp_path / "missing.jsonl")])
    assert json.loads(out.read_text().splitlines()[0])["gpu"] == "none"


def test_the_main_job_runs_as_a_newcomer_starts_it(tmp_path):
    """`python -m fused_lora.bench` in a fresh process with TRITON_INTERPRET unset (as a user starts it,
    unlike this test session): it sets the interpreter itself before the kernels are imported, so the
    smoke run goes through the interpreter. Importing fused_lora must not import triton first (it did,
    through torch._dynamo, and every kernel helper came out compiled instead of interpreted)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    light = subprocess.run(
        [sys.executable, "-c", "import sys, fused_lora; print('triton' in sys.modules)"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert light.stdout.strip() == "False", light.stderr[-2000:]
    if torch.cuda.is_available():
        pytest.skip("with a GPU the main job measures, which is not this test's business")
    out = tmp_path / "rows.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "fused_lora.bench", "--shapes", "attn-7b", "--ranks", "16", "--dropout", "0.1",
         "--no-plots", "--no-progress", "--out", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "FAILED" not in run.stdout and out.exists()
