"""``python -m fused_lora.bench`` / ``fused-lora-bench``: throughput per rank against every way people
run LoRA today, with the cuBLAS floor beside it.

On a CUDA GPU: the sweep (shapes x tokens x ranks x dropout x modes x providers), a table per shape,
rows appended to ``bench/results/<gpu>.jsonl`` (GPU, versions, date, commit), then
``python -m fused_lora.bench.plots`` draws the PNGs. Without a GPU it still runs, and says plainly that
speed needs one: a tiny smoke run through Triton's interpreter (correctness only, no speed claims), the
bytes each provider keeps for backward at full size (real autograd on the meta device), and the
modelled (roofline) table for the GPU named by --gpu-spec.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from . import model
from .providers import SHAPES, Case

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_RANKS = "1,4,8,16,32,64,128,256"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fused-lora-bench", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument(
        "--tokens", default="8192", help="M values, comma list (attn-7b also gets 2048,16384 with --llama-tokens)"
    )
    ap.add_argument("--llama-tokens", action="store_true", help="attn-7b at M = 2048, 8192, 16384")
    ap.add_argument("--ranks", default=DEFAULT_RANKS)
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument(
        "--adapter-dtype",
        default=None,
        choices=list(DTYPES),
        help="A/B dtype (default: same as --dtype; PEFT's own default under 16-bit is fp32)",
    )
    ap.add_argument("--dropout", default="0,0.1", help="lora_dropout values, comma list")
    ap.add_argument("--modes", default=",".join(model.MODES))
    ap.add_argument("--providers", default=",".join(model.PROVIDERS))
    ap.add_argument(
        "--gpu-spec",
        default=None,
        choices=list(model.GPUS),
        help="GPU for the modelled columns (default: the one present, else h100)",
    )
    ap.add_argument("--out", default=None, help="results file (JSON lines); default bench/results/<gpu>.jsonl")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    return ap.parse_args(argv)


def _split(s: str, cast=str) -> list:
    return [cast(v) for v in s.split(",") if v.strip()]


def cases(ns: argparse.Namespace, device: str) -> list[Case]:
    dtype = DTYPES[ns.dtype]
    adapter = DTYPES[ns.adapter_dtype] if ns.adapter_dtype else dtype
    out = []
    for shape in _split(ns.shapes):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
        K, N = SHAPES[shape]
        tokens = _split(ns.tokens, int)
        if ns.llama_tokens and shape == "attn-7b":
            tokens = sorted({2048, 8192, 16384, *tokens})
        for M in tokens:
            for r in _split(ns.ranks, int):
                for p in _split(ns.dropout, float):
                    out.append(Case(shape, M, K, N, r, dtype, adapter, p, device))
    return out


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


def modelled(case: Case, provider: str, mode: str, gpu: model.GPUSpec) -> dict:
    e, ea = torch.finfo(case.dtype).bits // 8, torch.finfo(case.adapter_dtype).bits // 8
    ps = model.passes(provider, mode, case.M, case.K, case.N, case.r, e, ea, case.dropout > 0)
    return {
        "model_gflop": sum(p.flops for p in ps) / 1e9,
        "model_mb": sum(p.bytes for p in ps) / 1e6,
        "model_passes": len(ps),
        "model_ms": model.roofline_ms(ps, gpu),
        "model_gpu": gpu.name,
    }


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    has_gpu = torch.cuda.is_available()
    if not has_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the smoke run
    env = environment()
    gpu = model.GPUS[ns.gpu_spec] if ns.gpu_spec else model.gpu_spec_for(env["gpu"] if has_gpu else None)
    print(
        f"fused_lora benchmark — GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}"
    )
    if has_gpu:
        from .sweep import run_sweep

        rows = run_sweep(cases(ns, "cuda"), _split(ns.providers), _split(ns.modes), gpu, env, ns.rep)
        out = Path(ns.out or f"bench/results/{_slug(env['gpu'])}.jsonl")
    else:
        from .offline import run_offline

        print(
            "\nNo CUDA GPU here: speed needs a GPU. What runs instead:\n"
            "  1. a tiny smoke run through Triton's interpreter — correctness only, NO speed claims;\n"
            "  2. the bytes each provider keeps for backward, at full size (device-independent);\n"
            f"  3. the modelled (roofline) time of every provider on an {gpu.name}.\n"
        )
        rows = run_offline(cases(ns, "meta"), _split(ns.providers), _split(ns.modes), gpu, env)
        out = Path(ns.out or "bench/results/no-gpu.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(
        f"\n{len(rows)} rows appended to {out}"
        + ("; plots: python -m fused_lora.bench.plots " + str(out) if has_gpu else "")
    )
    return 0


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec); missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


if __name__ == "__main__":
    sys.exit(main())
