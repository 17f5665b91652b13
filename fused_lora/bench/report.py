"""Write docs/benchmarks.md from results files: the issue's targets, then ratio to the floor per rank.

    python -m fused_lora.bench.report bench/results/local/<gpu>.jsonl [more files] [--out docs/benchmarks.md]

Measured rows (``speed_valid``) are used where present; otherwise the modelled (roofline) columns, and
the page says so at the top of every table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import results_file

REF = {"shape": "attn-7b", "M": 8192, "r": 16}
PROVIDERS = ("fused", "peft", "addmm", "floor")


def load(paths: list[Path]) -> list[dict]:
    latest: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                key = (r["shape"], r["M"], r["r"], r["dropout"], r["mode"], r["provider"], r.get("speed_valid"))
                latest[key] = r
    return list(latest.values())


def _time(rows: list[dict], measured: bool, **key) -> float | None:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()) and bool(r.get("speed_valid")) == measured:
            return r.get("ms") if measured else r.get("model_ms")
    return None


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def targets(rows: list[dict], measured: bool) -> list[str]:
    t = lambda prov, mode, p: _time(rows, measured, provider=prov, mode=mode, dropout=p, **REF)
    checks = []

    def check(name, value, goal, ok):
        checks.append(
            f"| {name} | {_fmt(value)} | {goal} | {'-' if value is None else ('met' if ok(value) else 'MISSED')} |"
        )

    f, fl = t("fused", "fwd", 0.0), t("floor", "fwd", 0.0)
    check("forward: fused / floor", f / fl if f and fl else None, "<= 1.05", lambda v: v <= 1.05)
    f, fl = t("fused", "fwdbwd", 0.0), t("floor", "fwdbwd", 0.0)
    check("forward+backward: fused / floor", f / fl if f and fl else None, "<= 1.10", lambda v: v <= 1.10)
    f, pe = t("fused", "fwdbwd", 0.1), t("peft", "fwdbwd", 0.1)
    check("forward+backward, dropout 0.1: peft / fused", pe / f if f and pe else None, ">= 1.4", lambda v: v >= 1.4)
    for r in (1, 4, 8, 16, 32, 64):
        key = {**REF, "r": r}
        f = _time(rows, measured, provider="fused", mode="fwdbwd", dropout=0.0, **key)
        a = _time(rows, measured, provider="addmm", mode="fwdbwd", dropout=0.0, **key)
        check(f"forward+backward r={r}: addmm / fused", a / f if f and a else None, ">= 1.1", lambda v: v >= 1.1)
    return ["| target (M=8192, K=N=4096, bf16) | value | goal | |", "|---|---|---|---|", *checks]


def ratio_tables(rows: list[dict], measured: bool, mode: str) -> list[str]:
    out = []
    cases = sorted({(r["shape"], r["M"], r["K"], r["N"], r["dropout"]) for r in rows if r["mode"] == mode})
    ranks = sorted({r["r"] for r in rows if r["mode"] == mode})
    for shape, M, K, N, p in cases:
        out += [
            f"\n**{shape}** (M={M}, K={K}, N={N}), dropout {p:g} — time / floor, {mode}\n",
            "| provider | " + " | ".join(f"r={r}" for r in ranks) + " |",
            "|---" * (len(ranks) + 1) + "|",
        ]
        for prov in PROVIDERS[:3]:
            cells = []
            for r in ranks:
                key = {"shape": shape, "M": M, "dropout": p, "mode": mode, "r": r}
                v, fl = _time(rows, measured, provider=prov, **key), _time(rows, measured, provider="floor", **key)
                cells.append(_fmt(v / fl if v and fl else None))
            out.append(f"| {prov} | " + " | ".join(cells) + " |")
    return out


def saved_table(rows: list[dict]) -> list[str]:
    saved = [r for r in rows if r.get("mode") == "saved" and r["shape"] == REF["shape"] and r["M"] == REF["M"]]
    ranks = sorted({r["r"] for r in saved})
    out = [
        "| provider | dropout | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|---" + "|---" * len(ranks) + "|",
    ]
    for prov in PROVIDERS:
        for p in sorted({r["dropout"] for r in saved}):
            cells = [
                next(
                    (
                        _fmt(r.get("saved_mb"), ".2f")
                        for r in saved
                        if r["provider"] == prov and r["dropout"] == p and r["r"] == rk
                    ),
                    "-",
                )
                for rk in ranks
            ]
            out.append(f"| {prov} | {p:g} | " + " | ".join(cells) + " |")
    return out


WHY = (
    "Where a target is missed, why and what would close it (docs/design.md §3–4): the forward's extra cost "
    "is the shrink pass, one more read of x (67 MB, 20 µs on an H100, +6–8 % of the GEMM) that the design "
    "accepts because the backward needs xa anyway; overlapping that memory-bound pass with the compute-bound "
    "GEMM (programmatic dependent launch, `griddepcontrol.wait` before the epilogue) would bring the forward "
    "to ≈ 1.01× and the step to ≈ 1.07×. The step adds the backward's dY/x pass (40 µs). Dropout costs "
    "integer ALU for the Philox draws (three times per step), not bytes; 16-bit draws would halve it."
)


def render(rows: list[dict]) -> str:
    measured = any(r.get("speed_valid") for r in rows)
    src = [r for r in rows if bool(r.get("speed_valid")) == measured] or rows
    head = src[0]
    if measured:
        where = (
            f"Measured on **{head['gpu']}**, torch {head['torch']}, triton {head['triton']}, "
            f"{head['date']}, commit {head['commit']}."
        )
    else:
        where = (
            f"**Not measured: no GPU was available.** Every time below is the roofline model "
            f"(`fused_lora/bench/model.py`) for an {head.get('model_gpu', 'H100 SXM')}: the sum over each "
            f"provider's passes of max(FLOPs / peak, bytes / bandwidth). Real kernels run below these "
            f"limits (cuBLAS reaches ~80 % of the datasheet peak); the ratios are what the design can at "
            f"best deliver. Run `bash scripts/bench.sh` on a GPU and regenerate this page."
        )
    lines = [
        "# Benchmarks",
        "",
        where,
        "",
        "Providers: **fused** (ours), **peft** (PEFT's `lora.Linear`), **addmm** (Unsloth's cuBLAS chain, "
        "no dropout), **floor** (the bare cuBLAS base GEMM). Regenerate with "
        "`python -m fused_lora.bench.report <results files>`.",
        "",
        "## The issue's targets",
        "",
        *targets(rows, measured),
        "",
        WHY,
        "",
        "## Bytes kept for backward (MB; M=8192, K=N=4096, bf16)",
        "",
        "Measured with `saved_tensors_hooks` on real autograd (meta device when no GPU), parameters and x "
        "itself excluded. fused keeps xa in fp32 (twice PEFT's bf16 [M, r] at p = 0, a fraction of a MB at "
        "r = 16); with dropout PEFT keeps a dropped copy of x and its mask — the mask counts 2 bytes per "
        "element on the meta device and 1 byte on CUDA (native dropout's bool mask), so ~101 MB there.",
        "",
        *saved_table(rows),
        "",
        "## Time relative to the floor, per rank",
    ]
    for mode in ("fwd", "fwdbwd"):
        lines += ratio_tables(src, measured, mode)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_lora.bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=results_file, nargs="+", help="results files (JSON lines), later ones win")
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="the page (default: %(default)s)")
    ns = ap.parse_args(argv)
    rows = load(ns.results)
    if not rows:
        print("no rows in", ns.results)
        return 1
    ns.out.write_text(render(rows))
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
