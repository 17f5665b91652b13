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
    if row.get("case_text"):  # a case with more to it than K -> N (the decoder layer): two lines
        return f"headline case: {row['case_text']}\n  r={case[2]}, {row['dtype']} (adapters {row['adapter_dtype']})"
    return (
        f"headline case: {case[0]}, M={case[1]}, K={row['K']} -> N={row['N']}, r={case[2]}, {row['dtype']} "
        f"(adapters {row['adapter_dtype']})"
    )


def _mode(rows: list[dict]) -> str:
    modes = {r.get("mode") for r in rows}
    return "fwdbwd" if "fwdbwd" in modes else next(m for m in ("fwd", "bwd") if m in modes)


def _table(title: str, providers: list[str], dropouts: list[float], cell) -> list[str]:
    """A title, then one line per provider with a column per dropout: short lines (a terminal's width),
    where one line per dropout listing every provider ran to 300 characters."""
    cells = {(n, p): cell(n, p) for n in providers for p in dropouts}
    width = {p: max(len(f"p={p:g}"), *(len(cells[n, p]) for n in providers)) for p in dropouts}
    name_w = max(len("provider"), *(len(n) for n in providers))
    head = "    " + "provider".ljust(name_w) + "".join("  " + f"p={p:g}".rjust(width[p]) for p in dropouts)
    body = ["    " + n.ljust(name_w) + "".join("  " + cells[n, p].rjust(width[p]) for p in dropouts) for n in providers]
    return [f"  {title}:", head, *body]


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
    saved = {p: _pick(rows, case, mode="saved", dropout=p) for p in dropouts}

    def saved_cell(n: str, p: float) -> str:
        mb = saved[p].get(n, {}).get("saved_mb")
        return "n/a" if mb is None else f"{mb:.2f}"

    title = "bytes kept for backward, MB (measured: meta device, dropout's mask stored as on CUDA)"
    lines += _table(title, providers, dropouts, saved_cell)
    mode = _mode([r for r in rows if r.get("mode") != "saved"])
    timed = {p: _pick(rows, case, mode=mode, dropout=p) for p in dropouts}

    def model_cell(n: str, p: float) -> str:
        r = timed[p].get(n)
        return "n/a" if r is None else f"{r['model_ms']:.3f} ({r['model_ratio_to_floor']:.2f}x)"

    title = f"MODELLED {MODE_NAMES[mode]} on an {gpu_name}, ms (x floor): a roofline, not measured"
    return lines + _table(title, providers, dropouts, model_cell)


def measured(rows: list[dict], providers: list[str], memory: bool = False) -> list[str]:
    """Summary of a GPU sweep: the headline case's measured times, ratios to the floor, speedups; with
    `memory`, also its peak memory per training step and bytes kept for backward."""
    case = headline(rows)
    if case is None:
        return []
    mode = _mode(rows)
    dropouts = sorted({r["dropout"] for r in rows})
    by = {p: _pick(rows, case, mode=mode, dropout=p) for p in dropouts}

    def cell(n: str, p: float) -> str:
        r = by[p].get(n, {})
        if not r.get("ms"):
            return "n/a"
        extra = [f"{r['ratio_to_floor']:.2f}x"] if r.get("ratio_to_floor") else []
        if n != "peft" and r.get("speedup_vs_peft"):
            extra.append(f"{r['speedup_vs_peft']:.2f}x peft")
        return f"{r['ms']:.3f}" + (f" ({', '.join(extra)})" if extra else "")

    title = f"measured {MODE_NAMES[mode]}, ms (x floor, x faster than peft)"
    lines = [_case_line(rows, case), *_table(title, providers, dropouts, cell)]
    if memory:

        def mem_cell(n: str, p: float) -> str:
            r = by[p].get(n, {})
            return "n/a" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f} / {r['saved_mb']:.0f}"

        lines += _table("measured peak MB of a training step / MB kept for backward", providers, dropouts, mem_cell)
    return lines
