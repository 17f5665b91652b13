"""Plots from a results file, as a separate step:

    python -m fused_lora.bench.plots bench/results/<gpu>.jsonl [--out-dir bench/results]

Per results file: throughput (TFLOP/s of useful work) vs rank and time as a ratio to the cuBLAS floor
vs rank, one panel per (shape, tokens, dropout), one line per provider, for each mode. Only measured
rows (``speed_valid``) are drawn; the latest run of each point wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

STYLE = {"fused": ("tab:red", "o"), "peft": ("tab:blue", "s"), "addmm": ("tab:green", "^"), "floor": ("black", "")}


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:
        if r.get("speed_valid") and r.get("ms"):
            key = (r["shape"], r["M"], r["dropout"], r["mode"], r["provider"], r["r"], r["dtype"])
            latest[key] = r  # later lines win
    return list(latest.values())


def plot(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = sorted({(r["shape"], r["M"], r["dropout"]) for r in rows})
    modes = sorted({r["mode"] for r in rows})
    for metric, ylabel, fname in (
        ("tflops", "TFLOP/s (useful work)", "throughput"),
        ("ratio_to_floor", "time / cuBLAS floor", "ratio_to_floor"),
    ):
        for mode in modes:
            cols = min(3, len(panels))
            nrows = (len(panels) + cols - 1) // cols
            fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
            for ax, (shape, M, p) in zip(axes.flat, panels):
                series = defaultdict(list)
                for r in rows:
                    if (r["shape"], r["M"], r["dropout"], r["mode"]) == (shape, M, p, mode) and r.get(metric):
                        series[r["provider"]].append((r["r"], r[metric]))
                for prov, pts in sorted(series.items()):
                    pts.sort()
                    color, marker = STYLE.get(prov, (None, "."))
                    ax.plot(
                        [a for a, _ in pts],
                        [b for _, b in pts],
                        marker=marker,
                        color=color,
                        label=prov,
                        linestyle="--" if prov == "floor" else "-",
                    )
                ax.set_xscale("log", base=2)
                ax.set_title(f"{shape}, M={M}, p={p:g}", fontsize=9)
                ax.set_xlabel("rank r")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[len(panels) :]:
                ax.axis("off")
            gpu = rows[0].get("gpu", "")
            fig.suptitle(
                f"{fname.replace('_', ' ')} — {mode} — {gpu}, torch {rows[0].get('torch')}, "
                f"triton {rows[0].get('triton')}",
                fontsize=10,
            )
            fig.tight_layout()
            path = out_dir / f"{stem}-{fname}-{mode}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out-dir", type=Path, default=None)
    ns = ap.parse_args(argv)
    rows = load(ns.results)
    if not rows:
        print(f"{ns.results}: no measured rows (speed needs a GPU run of python -m fused_lora.bench)")
        return 1
    out_dir = ns.out_dir or ns.results.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in plot(rows, out_dir, ns.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
