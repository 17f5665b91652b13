"""Plots from a results file (``python -m fused_lora.bench`` draws them too, for the rows of its run):

    python -m fused_lora.bench.plots bench/results/local/<gpu>.jsonl [--out-dir DIR]

One panel per (shape, tokens, dropout) — a row per (shape, tokens), a column per dropout, at most
MAX_ROWS rows per figure (more go to further files: <name>-1.png, <name>-2.png, ...) — one line per
provider (its own colour, marker and line style: curves that coincide stay visible), x = rank, the
legend below the panels. It draws what the file holds:
- measured rows (a GPU run): throughput (TFLOP/s of useful work) and time / cuBLAS floor, per mode;
- modelled rows (any run): the roofline model's time per provider, per mode, titled MODELLED;
- saved-bytes rows (any run): bytes kept for backward per provider (measured on the meta device).
The latest row of each point wins.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

from .options import results_file

# One look per provider: colour, marker and line all differ, so that providers whose curves coincide (the
# fused variants in the model) stay visible: dashed and dotted lines over a solid one, hollow markers of
# growing size around a filled one.
STYLE = {
    "fused": dict(color="tab:red", marker="o", linestyle="-", markersize=5, fillstyle="full"),
    "fused-tma": dict(color="tab:orange", marker="D", linestyle="--", markersize=8, fillstyle="none"),
    "fused-ptr": dict(color="tab:purple", marker="s", linestyle=":", markersize=11, fillstyle="none"),
    "hybrid": dict(color="tab:brown", marker="v", linestyle="-.", markersize=7, fillstyle="full"),
    "peft": dict(color="tab:blue", marker="^", linestyle="-", markersize=6, fillstyle="full"),
    "addmm": dict(color="tab:green", marker="x", linestyle="--", markersize=7, fillstyle="full"),
    "floor": dict(color="black", marker="", linestyle=(0, (6, 2)), markersize=0, fillstyle="full"),
}
_SPARE = ["tab:pink", "tab:olive", "tab:cyan", "tab:gray"]  # providers the table above does not name
MAX_ROWS = 3  # panel rows per figure: more cases go to further files (<name>-1.png, <name>-2.png, ...)


def style(provider: str, others: list[str] | None = None) -> dict:
    """matplotlib line keywords for a provider; an unknown one gets a spare colour (by its rank among
    `others`, the unknown providers of the figure) and a dash-dot line."""
    if provider in STYLE:
        return dict(STYLE[provider])
    k = (others or [provider]).index(provider) if provider in (others or []) else 0
    return dict(color=_SPARE[k % len(_SPARE)], marker="P", linestyle="-.", markersize=7, fillstyle="full")


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


def layout(rows: list[dict]) -> tuple[list[list[list[tuple | None]]], int]:
    """Pages of panels: (pages, columns); a page is rows of (shape, M, dropout) or None (an empty cell).
    With 2 or 3 dropout values, each row is one (shape, M) and each column one dropout; otherwise the
    panels fill 3 columns. At most MAX_ROWS rows per page, pages split evenly."""
    panels = list(dict.fromkeys((r["shape"], r["M"], r["dropout"]) for r in rows))  # in the run's order
    dropouts = sorted({p for _, _, p in panels})
    if 2 <= len(dropouts) <= 3:
        cases = list(dict.fromkeys((shape, M) for shape, M, _ in panels))
        have = set(panels)
        grid = [[(shape, M, p) if (shape, M, p) in have else None for p in dropouts] for shape, M in cases]
        cols = len(dropouts)
    else:
        cols = min(3, len(panels))
        grid = [
            [*panels[i : i + cols], *[None] * (cols - len(panels[i : i + cols]))] for i in range(0, len(panels), cols)
        ]
    pages = max(1, math.ceil(len(grid) / MAX_ROWS))
    per_page = math.ceil(len(grid) / pages) if grid else 0
    return [grid[i : i + per_page] for i in range(0, len(grid), per_page)] or [[]], cols


def _grid(rows: list[dict], metric: str, ylabel: str, title: str, logy: bool = False) -> list:
    """One figure per page of panels (see :func:`layout`), one line per provider, x = rank, a shared
    legend below the panels (never over the data)."""
    import matplotlib.pyplot as plt

    pages, cols = layout(rows)
    unknown = sorted({r["provider"] for r in rows} - set(STYLE))
    order = [*STYLE, *unknown]
    figs = []
    for k, page in enumerate(pages):
        nrows = max(1, len(page))
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.3 * nrows + 1.1), squeeze=False)
        handles = {}
        for ax, panel in zip(axes.flat, [cell for line in page for cell in line]):
            if panel is None:
                ax.axis("off")
                continue
            series = defaultdict(list)
            for r in rows:
                value = r.get(metric)
                if (r["shape"], r["M"], r["dropout"]) == panel and value is not None and (value > 0 or not logy):
                    series[r["provider"]].append((r["r"], value))
            for prov in sorted(series, key=order.index):
                pts = sorted(series[prov])
                (line,) = ax.plot([a for a, _ in pts], [b for _, b in pts], label=prov, linewidth=1.6,
                                  **style(prov, unknown))  # fmt: skip
                handles.setdefault(prov, line)
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            shape, M, p = panel
            ax.set_title(f"{shape}, M={M}, p={p:g}", fontsize=9)
            ax.set_xlabel("rank r")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        part = f" ({k + 1}/{len(pages)})" if len(pages) > 1 else ""
        text = textwrap.fill(title + part, width=int(fig.get_figwidth() * 13))  # ~13 characters an inch
        fig.suptitle(text, fontsize=10)
        names = sorted(handles, key=order.index)
        legend_h = 0.5 / fig.get_figheight()
        fig.legend([handles[n] for n in names], names, loc="lower center", ncol=len(names), fontsize=8,
                   frameon=False, bbox_to_anchor=(0.5, 0.0))  # fmt: skip
        title_h = (0.15 + 0.18 * (text.count("\n") + 1)) / fig.get_figheight()
        fig.tight_layout(rect=(0, legend_h, 1, 1 - title_h))  # room for the legend and the title
        figs.append(fig)
    return figs


def _named(name: str, figs: list) -> list[tuple[str, object]]:
    """<name> for a single figure, <name>-1, <name>-2, ... for pages."""
    return [(name, figs[0])] if len(figs) == 1 else [(f"{name}-{k + 1}", f) for k, f in enumerate(figs)]


def figures(rows: list[dict]) -> list[tuple[str, object]]:
    """(file name suffix, matplotlib figure) for everything `rows` can show."""
    head = rows[0] if rows else {}
    versions = f"torch {head.get('torch')}, triton {head.get('triton')}"
    out = []
    measured = [r for r in rows if r.get("speed_valid") and r.get("ms")]
    for mode in sorted({r["mode"] for r in measured}):
        mrows = [r for r in measured if r["mode"] == mode]
        where = f"{mode} — measured on {mrows[0].get('gpu', '')}, {versions}"
        out += _named(f"throughput-{mode}", _grid(mrows, "tflops", "TFLOP/s (useful work)", f"throughput — {where}"))
        out += _named(f"ratio_to_floor-{mode}", _grid(mrows, "ratio_to_floor", "time / cuBLAS floor", where))
    modelled = [r for r in rows if not r.get("speed_valid") and r.get("model_ms") is not None]
    for mode in sorted({r["mode"] for r in modelled}):
        mrows = [r for r in modelled if r["mode"] == mode]
        title = (
            f"MODELLED time — {mode} — roofline model of an {mrows[0].get('model_gpu')} (datasheet peak FLOP/s "
            f"and bandwidth), NOT a measurement"
        )
        out += _named(f"modelled-time-{mode}", _grid(mrows, "model_ms", "modelled time, ms", title))
    saved = [r for r in rows if r.get("mode") == "saved" and r.get("saved_mb") is not None]
    if saved:
        title = (
            "bytes kept for backward by one training forward — measured with autograd's saved-tensor hooks (meta "
            "device, full size, dropout's mask as CUDA stores it; parameters and x excluded; zero is not drawn: "
            "the floor keeps nothing)"
        )
        out += _named("saved-bytes", _grid(saved, "saved_mb", "MB kept for backward", title, logy=True))
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
