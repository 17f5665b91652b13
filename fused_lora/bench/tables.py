"""What the offline run and the GPU sweep share: the modelled columns of a row, and plain-text tables
(written to the run's tables file; the terminal gets a summary)."""

from __future__ import annotations

from pathlib import Path

import torch

from . import model
from .providers import Case

Column = tuple[str, str, str]  # (header, row key, format spec)


def modelled(case: Case, provider: str, mode: str, gpu: model.GPUSpec) -> dict:
    """The roofline model's columns for one (case, provider, mode): a limit, not a measurement."""
    e, ea = torch.finfo(case.dtype).bits // 8, torch.finfo(case.adapter_dtype).bits // 8
    ps = model.passes(provider, mode, case.M, case.K, case.N, case.r, e, ea, case.dropout > 0)
    return {
        "model_gflop": sum(p.flops for p in ps) / 1e9,
        "model_mb": sum(p.bytes for p in ps) / 1e6,
        "model_passes": len(ps),
        "model_ms": model.roofline_ms(ps, gpu),
        "model_gpu": gpu.name,
    }


def format_table(rows: list[dict], columns: list[Column]) -> str:
    """Right-aligned columns; missing values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells)


def write_tables(path: Path, header: str, sections: list[tuple[str, list[dict], list[Column]]]) -> Path:
    """One text file: a header, then each section's title and table."""
    parts = [header]
    for title, rows, columns in sections:
        parts += ["", title, format_table(rows, columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    return path
