"""Plots from a results file (``python -m fused_lora.bench`` draws them too, for the rows of its run):

    python -m fused_lora.bench.plots bench/results/local/<gpu>.jsonl [--out-dir DIR]

One panel per (shape, tokens, dropout), one line per provider, x = rank. It draws what the file holds:
- measured rows (a GPU run): throughput (TFLOP/s of useful work) and time / cuBLAS floor, per mode;
- modelled rows (any run): the roofline model's time per provider, per mode, titled MODELLED;
- saved-bytes rows (any run): bytes kept for backward per provider (measured on the meta device).
The latest row of each point wins.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from .options import results_file

STYLE = {"fused": ("tab:red", "o"), "peft": ("tab:blue", "s"), "addmm": ("tab:green", "^"), "floor": ("black", "")}


def load(path: Path) -> list[dict]:
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            key = (
                r["shape"],
                r["M"],
                r["dropout"],
                r["mode"],
                r["provider"],
                r["r"],
                r.get("dtype"),
                r.get("speed_valid"),
            )
            latest[key] = r  # later lines win
    return list(latest.values())


def _grid(rows: list[dict], metric: str, ylabel: str, title: str, logy: bool = False):
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["shape"], r["M"], r["dropout"]) for r in rows))  # in the run's order
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (shape, M, p) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rows:
            value = r.get(metric)
            if (r["shape"], r["M"], r["dropout"]) == (shape, M, p) and value is not None and (value > 0 or not logy):
                series[r["provider"]].append((r["r"], r[metric]))
        for prov, pts in sorted(series.items()):
            pts.sort()
            color, marker = STYLE.get(prov, (None, "."))
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker=marker, color=color, label=prov,
                    linestyle="--" if prov == "floor" else "-")  # fmt: skip
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_title(f"{shape}, M={M}, p={p:g}", fontsize=9)
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the title
    return fig


def figures(rows: list[dict]) -> list[tuple[str, object]]:
    """(file name suffix, matplotlib figure) for everything `rows` can show."""
    head = rows[0] if rows else {}
    versions = f"torch {head.get('torch')}, triton {head.get('triton')}"
    out = []
    measured = [r for r in rows if r.get("speed_valid") and r.get("ms")]
    for mode in sorted({r["mode"] for r in measured}):
        mrows = [r for r in measured if r["mode"] == mode]
        where = f"{mode} — measured on {mrows[0].get('gpu', '')}, {versions}"
        out.append((f"throughput-{mode}", _grid(mrows, "tflops", "TFLOP/s (useful work)", f"throughput — {where}")))
        out.append((f"ratio_to_floor-{mode}", _grid(mrows, "ratio_to_floor", "time / cuBLAS floor", where)))
    modelled = [r for r in rows if not r.get("speed_valid") and r.get("model_ms") is not None]
    for mode in sorted({r["mode"] for r in modelled}):
        mrows = [r for r in modelled if r["mode"] == mode]
        title = (
            f"MODELLED time — {mode} — roofline model of an {mrows[0].get('model_gpu')} (datasheet peak FLOP/s "
            f"and bandwidth), NOT a measurement"
        )
        out.append((f"modelled-time-{mode}", _grid(mrows, "model_ms", "modelled time, ms", title)))
    saved = [r for r in rows if r.get("mode") == "saved" and r.get("saved_mb") is not None]
    if saved:
        title = (
            "bytes kept for backward by one training forward — measured with autograd's saved-tensor hooks (meta "
            "device, full size; parameters and x excluded; zero is not drawn: the floor keeps nothing)"
        )
        out.append(("saved-bytes", _grid(saved, "saved_mb", "MB kept for backward", title, logy=True)))
    return out


def plot(rows: list[dict], out_dir: Path, stem: str) -> list[Path]:
    """Write every figure `rows` can show as ``<out_dir>/<stem>-<name>.png``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(rows):
        path = out_dir / f"{stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fused_lora.bench.plots", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=results_file, help="a results file (JSON lines)")
    ap.add_argument("--out-dir", type=Path, default=None, help="where the PNGs go (default: beside the results)")
    ns = ap.parse_args(argv)
    rows = load(ns.results)
    if not rows:
        print(f"{ns.results}: no rows")
        return 1
    for path in plot(rows, ns.out_dir or ns.results.parent, ns.results.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
