"""The measured sweep, on a CUDA GPU: time, throughput, peak memory and saved bytes per provider."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from . import model
from .measure import nbytes, peak_bytes, saved_for_backward, time_ms
from .progress import bar
from .providers import Case, NotApplicable
from .suite import LINEAR, Suite
from .tables import Column

COLUMNS: list[Column] = [
    ("M", "M", "d"),
    ("r", "r", "d"),
    ("p", "dropout", "g"),
    ("mode", "mode", "s"),
    ("provider", "provider", "s"),
    ("ms", "ms", ".3f"),
    ("p20", "ms_p20", ".3f"),
    ("p80", "ms_p80", ".3f"),
    ("TFLOP/s", "tflops", ".0f"),
    ("x floor", "ratio_to_floor", ".3f"),
    ("vs peft", "speedup_vs_peft", ".2f"),
    ("vs addmm", "speedup_vs_addmm", ".2f"),
    ("peak MB", "peak_mb", ".0f"),
    ("saved MB", "saved_mb", ".1f"),
    ("model ms", "model_ms", ".3f"),
    ("note", "note", "s"),
]


def measure_case(
    case: Case,
    providers: list[str],
    modes: list[str],
    gpu: model.GPUSpec,
    env: dict,
    rep: int,
    progress=None,
    suite: Suite = LINEAR,
) -> list[dict]:
    """Rows for every (provider, mode) of one case: time (median, p20, p80), TFLOP/s, peak memory of a
    training step, bytes kept for backward, the modelled time. `suite`: the kind of case (suite.py)."""
    weights = suite.make_weights(case)
    rows = []
    for name in providers:
        base = {
            **env,
            **case.fields(),
            "provider": name,
            "speed_valid": True,
        }
        try:
            prov = suite.build(name, case, weights)
        except NotApplicable as e:
            rows += [{**base, "mode": m, "note": f"n/a: {e}", **suite.modelled(case, name, m, gpu)} for m in modes]
            if progress is not None:
                progress.update()
            continue
        exclude = [*prov.module.parameters(), prov.x, *getattr(prov, "state", ())]  # state: a 4-bit W's scales
        saved = nbytes(saved_for_backward(prov.forward, exclude))  # also leaves prov.y for "bwd"
        peak = peak_bytes(prov.fwdbwd, torch.device(case.device))
        for mode in modes:
            fn = {"fwd": prov.forward, "bwd": prov.backward, "fwdbwd": prov.fwdbwd}[mode]
            med, p20, p80 = time_ms(fn, grad_to_none=prov.trainable(), rep=rep)
            flops = suite.flops(case, name, mode)
            rows.append(
                {
                    **base,
                    "mode": mode,
                    "impl": prov.impl,
                    "ms": med,
                    "ms_p20": p20,
                    "ms_p80": p80,
                    "tflops": flops / (med * 1e-3) / 1e12,
                    "tokens_per_s": case.M / (med * 1e-3),
                    "peak_mb": peak / 1e6,
                    "saved_mb": saved / 1e6,
                    "note": "",
                    **suite.modelled(case, name, mode, gpu),
                }
            )
        del prov
        torch.cuda.empty_cache()
        if progress is not None:
            progress.update()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio_to_floor, speedup_vs_peft, speedup_vs_addmm within each (case, mode), where measured."""
    key = lambda r: (r["shape"], r["M"], r["r"], r["dropout"], r["mode"])
    for _, group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        by = {r["provider"]: r.get("ms") for r in group}
        for r in group:
            ms = r.get("ms")
            r["ratio_to_floor"] = ms / by["floor"] if ms and by.get("floor") else None
            r["speedup_vs_peft"] = by["peft"] / ms if ms and by.get("peft") else None
            r["speedup_vs_addmm"] = by["addmm"] / ms if ms and by.get("addmm") else None


def run_sweep(
    cases: list[Case],
    providers: list[str],
    modes: list[str],
    gpu: model.GPUSpec,
    env: dict,
    rep: int,
    progress: bool = True,
    sink: Callable[[list[dict]], None] | None = None,
) -> tuple[list[dict], list[tuple[str, list[dict], list[Column]]]]:
    """(rows, one table section per shape for the tables file); `sink` gets each case's rows as soon as
    they are measured."""
    pbar = bar(len(cases) * len(providers), "measuring", progress)
    rows: list[dict] = []
    sections = []
    for (name, K, N), group in itertools.groupby(cases, key=lambda c: (c.shape, c.K, c.N)):
        shape_rows = []
        for case in group:
            pbar.set_postfix_str(f"{name} M={case.M} r={case.r} p={case.dropout:g}")
            case_rows = measure_case(case, providers, modes, gpu, env, rep, pbar)
            if sink is not None:  # written as each case ends: a run stopped by a timeout keeps its rows
                sink(case_rows)
            shape_rows += case_rows
        rows += shape_rows
        head = shape_rows[0]
        sections.append((f"== {name}: K={K} -> N={N}, {head['dtype']} (adapters {head['adapter_dtype']}) ==",
                         shape_rows, COLUMNS))  # fmt: skip
    pbar.close()
    return rows, sections
