"""``python -m fused_lora.bench`` / ``fused-lora-bench``: the main job (flags: fused_lora.bench.options,
or ``--help``).

On a CUDA GPU: the measured sweep. Without one: the smoke run, the saved-bytes table and the modelled
table. ``--case decoder`` does the same for a whole Llama-3-8B decoder layer (fused_lora/bench/decoder.py).
Either way the terminal gets a progress bar and a short summary; the rows are appended to the results
file (JSON lines, with GPU, versions, date and commit in each), the full tables and the plots are written
beside it. By default that is ``bench/results/local/``, which git ignores.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from . import model, summary
from .options import DTYPES, RESULTS_DIR, parse_args
from .providers import SHAPES, Case
from .tables import write_tables

TORCH_DTYPES = dict(zip(DTYPES, (torch.bfloat16, torch.float16, torch.float32)))


def cases(ns, device: str) -> list[Case]:
    dtype = TORCH_DTYPES[ns.dtype]
    adapter = TORCH_DTYPES[ns.adapter_dtype] if ns.adapter_dtype else dtype
    out = []
    for shape in ns.shapes:
        K, N = SHAPES[shape]
        tokens = ns.tokens
        if ns.llama_tokens and shape == "attn-7b":
            tokens = sorted({2048, 8192, 16384, *tokens})
        for M in tokens:
            for r in ns.ranks:
                for p in ns.dropout:
                    out.append(Case(shape, M, K, N, r, dtype, adapter, p, device))
    return out


def decoder_cases(ns, device: str) -> list:
    from .decoder_run import cases as make

    dtype = TORCH_DTYPES[ns.dtype]
    return make(ns.tokens, ns.seq_len, ns.ranks, dtype, TORCH_DTYPES[ns.adapter_dtype], ns.dropout, device)


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "gpu": gpu or "none",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit or "unknown",
    }


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _append(rows: list[dict], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _plots(rows: list[dict], out: Path) -> list[str]:
    try:
        from .plots import plot

        return [str(p) for p in plot(rows, out.parent, out.stem)]
    except ImportError as e:
        return [f"none ({e.name} is not installed: pip install 'fused_lora[bench]')"]


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the smoke run
    env = environment()
    gpu = model.GPUS[ns.gpu_spec] if ns.gpu_spec else model.gpu_spec_for(env["gpu"] if has_gpu else None)
    progress = not ns.no_progress
    print(f"fused_lora benchmark — GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, ", end="")
    print(f"commit {env['commit']}")
    decoder = ns.case == "decoder"
    suffix = "-decoder" if decoder else ""
    if has_gpu:
        out = Path(ns.out or f"{RESULTS_DIR}/{_slug(env['gpu'])}{suffix}.jsonl")
        sink = lambda case_rows: _append(case_rows, out)
        if decoder:
            from .decoder_run import run_measured

            rows, sections = run_measured(decoder_cases(ns, "cuda"), ns.providers, ns.modes, gpu, env, ns.rep, progress,
                                          sink)  # fmt: skip
        else:
            from .sweep import run_sweep

            rows, sections = run_sweep(cases(ns, "cuda"), ns.providers, ns.modes, gpu, env, ns.rep, progress, sink)
        lines = summary.measured(rows, ns.providers, memory=decoder)
        kind = "measured"
    else:
        what = (
            "a smoke run of a tiny decoder layer on the CPU (ours through Triton's interpreter, fused and PEFT "
            "checked against fp64 on the same weights; NO speed claims), the bytes each provider keeps for "
            "backward at full size (Llama-3-8B's layer), and the MODELLED (roofline) time of the layer"
            if decoder
            else "a smoke run through Triton's interpreter (correctness only, NO speed claims), the bytes each "
            "provider keeps for backward at full size, and the MODELLED (roofline) time of every provider"
        )
        print(textwrap.fill(f"No CUDA GPU here: speed needs one. Running instead: {what} on an {gpu.name}.", width=100))
        out = Path(ns.out or f"{RESULTS_DIR}/no-gpu{suffix}.jsonl")
        if decoder:
            from .decoder_run import run_offline as offline_run

            run_cases = decoder_cases(ns, "meta")
        else:
            from .offline import run_offline as offline_run

            run_cases = cases(ns, "meta")
        rows, checks, sections = offline_run(run_cases, ns.providers, ns.modes, gpu, env, progress)
        lines = summary.offline(rows, checks, gpu.name, ns.providers)
        kind = "saved bytes and modelled times"
        _append(rows, out)
    header = f"fused_lora benchmark, {env['date']}: GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}"
    tables = write_tables(out.with_name(out.stem + "-tables.txt"), header, sections)
    plots = [] if ns.no_plots else _plots(rows, out)
    print("\n".join(["", *lines, ""]))
    print(f"full tables:  {tables}")
    print(f"results:      {out}\n              ({len(rows)} rows of {kind} appended, JSON lines)")
    if plots:
        print("plots:        " + "\n              ".join(plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
