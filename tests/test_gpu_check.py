"""scripts/gpu_check.sh without a GPU: it stops at once and says why, its quick stage's plan keeps the
order and the 8-minute budget with commands whose flags parse, and the warm-up that compiles the tuner's
configurations in parallel forces every configuration of every table (run here through the interpreter)."""

from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_lora.bench import options, warm
from fused_lora.bench.providers import Case

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "QUICK_"))}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**environ, "OUT": str(tmp_path / "out"), **env},
                          capture_output=True, text=True, timeout=180)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_without_a_gpu_every_stage_stops_at_once_and_says_why(tmp_path):
    for stage in ("quick", "tests", "bench"):
        run = gpu_check(tmp_path, stage, PYTHON=sys.executable)
        assert run.returncode == 3, run.stdout + run.stderr
        assert "no CUDA GPU visible to" in run.stderr and "these checks need one" in run.stderr
    run = gpu_check(tmp_path, "quick", PYTHON=str(tmp_path / "no-such-python"))
    assert run.returncode == 3 and "cannot import torch" in run.stderr, run.stderr


def test_unknown_stages_get_the_usage(tmp_path):
    run = gpu_check(tmp_path, "bogus")
    assert run.returncode == 2 and run.stderr.startswith("usage: bash scripts/gpu_check.sh quick|tests|")
    run = gpu_check(tmp_path, "all")
    assert run.returncode == 2 and "one stage per call (quick: 8 min)" in run.stderr


def _plan(tmp_path, **env) -> tuple[list[tuple[str, int, list[str]]], str]:
    """([(stage, timeout, command)], the dry run's output)"""
    run = gpu_check(tmp_path, "quick", GPU_CHECK_DRY_RUN="1", **env)
    assert run.returncode == 0, run.stdout + run.stderr
    plan = []
    for line in run.stdout.splitlines():
        if line.startswith("would run ["):
            head, command = line.split("]: ", 1)
            name, timeout = head.removeprefix("would run [").split(", ")[:2]
            plan.append((name, int(timeout.removeprefix("timeout ").removesuffix("s")), shlex.split(command)))
    return plan, run.stdout


def test_quick_plans_the_stages_in_order_within_eight_minutes(tmp_path):
    plan, out = _plan(tmp_path)
    names = [name for name, _, _ in plan]
    assert names == ["tests-bf16", "tests-rest", "warm", "bench"], out  # decoder: if time remains
    assert "decoder: SKIPPED" in out, "the worst case (every stage at its timeout) leaves it no time"
    worst = sum(t for _, t, _ in plan)
    assert worst <= 440 and worst + 10 + 15 < 480  # + timeout's kill grace + the prologue
    cmd = {name: c for name, _, c in plan}
    assert cmd["tests-bf16"][cmd["tests-bf16"].index("-k") + 1] == "bf16"
    assert cmd["tests-rest"][cmd["tests-rest"].index("-k") + 1] == "not bf16"
    assert "-m" in cmd["tests-bf16"] and "gpu" in cmd["tests-bf16"] and "FUSED_LORA_AUTOTUNE=0" in cmd["tests-bf16"]
    bench = options.parse_args(cmd["bench"][cmd["bench"].index("fused_lora.bench") + 1 :])
    assert (bench.shapes, bench.tokens, bench.ranks, bench.dtype, bench.adapter_dtype, bench.dropout) == (
        ["attn-7b"], [8192], [16], "bf16", "fp32", [0.0, 0.1])  # fmt: skip
    assert bench.providers == ["fused", "fused-tma", "hybrid", "peft", "addmm", "floor"]
    assert bench.modes == ["fwd", "fwdbwd"] and bench.out.endswith("/out/bench.jsonl")
    ns = warm.parser().parse_args(cmd["warm"][cmd["warm"].index("fused_lora.bench.warm") + 1 :])
    assert (ns.shapes, ns.tokens, ns.ranks, ns.dtype, ns.adapter_dtype, ns.dropout) == (
        bench.shapes, bench.tokens, bench.ranks, bench.dtype, bench.adapter_dtype, bench.dropout)  # fmt: skip
    # with a larger budget the decoder case is planned too, and its flags parse
    plan, _ = _plan(tmp_path, QUICK_BUDGET="800")
    decoder = next(c for name, _, c in plan if name == "decoder")
    dec = options.parse_args(decoder[decoder.index("fused_lora.bench") + 1 :])
    assert (dec.case, dec.tokens, dec.seq_len, dec.adapter_dtype, dec.providers) == (
        "decoder", [8192], 2048, "fp32", ["fused", "hybrid", "auto", "peft", "floor"])  # fmt: skip
    assert dec.out.endswith("/out/decoder.jsonl")


def test_a_short_budget_skips_stages_and_says_so(tmp_path):
    plan, out = _plan(tmp_path, QUICK_BUDGET="300")
    assert [name for name, _, _ in plan] == ["tests-bf16", "warm", "bench"]
    assert "tests-rest: SKIPPED (not enough of QUICK_BUDGET=300s left" in out
    assert sum(t for _, t, _ in plan) <= 300
    # the dry run's plan is the worst case on a simulated clock, whatever this machine's start took (CI,
    # loaded: a second gone before the first stage once skipped warm); bash takes SECONDS from the env
    slow, _ = _plan(tmp_path, QUICK_BUDGET="300", SECONDS="30")
    assert slow == plan


def test_warm_workers_launch_every_configuration_of_every_table(monkeypatch):
    """Worker i puts entry i of each table first; over all workers every entry of every table is launched
    (under the interpreter the tables are the interpreter's two-entry ones; on a GPU the shipped ones), also
    by kernels launched from another thread (autograd runs a CUDA backward on one of its own), and the
    tables are back in their order afterwards."""
    import threading

    from fused_lora.kernels import configs, tuning

    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "0")
    picked = collections.defaultdict(set)
    elsewhere = collections.defaultdict(set)
    original = tuning.Choices.pick

    def spy(self, key, candidates, bench, device):
        choice = original(self, key, candidates, bench, device)
        (picked if threading.current_thread() is threading.main_thread() else elsewhere)[self.name].add(choice)
        return choice

    monkeypatch.setattr(tuning.Choices, "pick", spy)
    cases = [Case("tiny", 24, 40, 36, 5, torch.float32, torch.float32, p, "cpu") for p in (0.0, 0.1)]
    names = warm.table_names()
    for i in range(warm.workers_needed()):
        assert warm.run_worker(i, cases) == {t: names[t][i % len(names[t])] for t in warm.TABLES}
    for table in warm.TABLES:
        assert picked[table] == set(names[table]), table
    assert warm.table_names() == names, "the tables are restored"
    with warm.rotated(1) as first:
        thread = threading.Thread(target=lambda: _fwdbwd(cases[1]))
        thread.start()
        thread.join()
    assert {t: elsewhere[t] for t in warm.TABLES} == {t: {first[t]} for t in warm.TABLES}
    with monkeypatch.context() as m:
        m.setenv("FUSED_LORA_AUTOTUNE", "1")
        with pytest.raises(RuntimeError, match="FUSED_LORA_AUTOTUNE=0"):
            warm.run_worker(0, cases)
    shipped = (configs.GEMM, configs.SHRINK, configs.GRAD, configs.LOW_RANK)
    assert max(map(len, shipped)) == 14, "gpu_check.sh's budget counts 14 warm workers"


def _fwdbwd(case):
    from fused_lora.bench.providers import build, make_weights

    w = make_weights(case)
    for provider in ("fused-tma", "hybrid"):
        build(provider, case, w).fwdbwd()
