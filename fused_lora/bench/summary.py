"""The few lines the benchmark prints at the end: the headline case (Llama-7B attention, M = 8192,
r = 16 when the run has it), each provider side by side; everything else is in the files."""

from __future__ import annotations

REF = ("attn-7b", 8192, 16)
MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}


def headline(rows: list[dict]) -> tuple[str, int, int] | None:
    """(shape, M, r) to summarise: the reference case if present, else the run's first shape and M at
    r = 16 (or the middle rank)."""
    keys = {(r["shape"], r["M"], r["r"]) for r in rows if "shape" in r}
    if not keys:
        return None
    if REF in keys:
        return REF
    first = next(r for r in rows if "shape" in r)
    ranks = sorted(r for s, m, r in keys if (s, m) == (first["shape"], first["M"]))
    return first["shape"], first["M"], 16 if 16 in ranks else ranks[len(ranks) // 2]


def _pick(rows: list[dict], case: tuple, **key) -> dict[str, dict]:
    shape, M, r = case
    return {
        row["provider"]: row
        for row in rows
        if (row["shape"], row["M"], row["r"]) == (shape, M, r) and all(row.get(k) == v for k, v in key.items())
    }


def _case_line(rows: list[dict], case: tuple) -> str:
    row = next(r for r in rows if (r["shape"], r["M"], r["r"]) == case)
    return (
        f"headline case: {case[0]}, M={case[1]}, K={row['K']} -> N={row['N']}, r={case[2]}, {row['dtype']} "
        f"(adapters {row['adapter_dtype']})"
    )


def _mode(rows: list[dict]) -> str:
    modes = {r.get("mode") for r in rows}
    return "fwdbwd" if "fwdbwd" in modes else next(m for m in ("fwd", "bwd") if m in modes)


def offline(rows: list[dict], checks: list[dict], gpu_name: str, providers: list[str]) -> list[str]:
    """Summary of a run without a GPU: the smoke run's verdict, saved bytes, modelled times."""
    results = [c["result"] for c in checks]
    failed = [f"{c['provider']} p={c['dropout']:g}" for c in checks if c["result"] == "FAILED"]
    lines = [
        f"smoke run (interpreter, correctness only): {results.count('ok')} ok, {results.count('n/a')} n/a"
        + (f", FAILED: {', '.join(failed)}" if failed else "")
    ]
    case = headline(rows)
    if case is None:
        return lines
    lines.append(_case_line(rows, case))
    dropouts = sorted({r["dropout"] for r in rows})
    for p in dropouts:
        by = _pick(rows, case, mode="saved", dropout=p)
        cells = [
            f"{n} {by[n]['saved_mb']:.2f} MB" if by.get(n, {}).get("saved_mb") is not None else f"{n} n/a"
            for n in providers
        ]
        lines.append(f"  bytes kept for backward (measured, meta device), dropout {p:g}: " + " | ".join(cells))
    mode = _mode([r for r in rows if r.get("mode") != "saved"])
    for p in dropouts:
        by = _pick(rows, case, mode=mode, dropout=p)
        cells = [
            f"{n} {by[n]['model_ms']:.3f} ms ({by[n]['model_ratio_to_floor']:.2f}x floor)" if n in by else f"{n} n/a"
            for n in providers
        ]
        lines.append(
            f"  MODELLED {MODE_NAMES[mode]} on an {gpu_name} (roofline, not measured), dropout {p:g}: "
            + " | ".join(cells)
        )
    return lines


def measured(rows: list[dict], providers: list[str]) -> list[str]:
    """Summary of a GPU sweep: the headline case's measured times, ratios to the floor, speedups."""
    case = headline(rows)
    if case is None:
        return []
    lines = [_case_line(rows, case)]
    mode = _mode(rows)
    for p in sorted({r["dropout"] for r in rows}):
        by = _pick(rows, case, mode=mode, dropout=p)
        cells = []
        for n in providers:
            r = by.get(n, {})
            if not r.get("ms"):
                cells.append(f"{n} n/a")
                continue
            extra = [f"{r['ratio_to_floor']:.2f}x floor"] if r.get("ratio_to_floor") else []
            if n != "peft" and r.get("speedup_vs_peft"):
                extra.append(f"{r['speedup_vs_peft']:.2f}x faster than peft")
            cells.append(f"{n} {r['ms']:.3f} ms" + (f" ({', '.join(extra)})" if extra else ""))
        lines.append(f"  measured {MODE_NAMES[mode]}, dropout {p:g}: " + " | ".join(cells))
    return lines
