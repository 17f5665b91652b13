"""What the benchmark can say without a GPU: a smoke run through the interpreter (correctness, no speed),
the bytes kept for backward at full size (meta device, real autograd), and the modelled times."""

from __future__ import annotations

import itertools
import math

import torch

import fused_lora

from . import model
from .measure import cuda_attention, cuda_dropout, nbytes, saved_for_backward
from .progress import bar
from .providers import Case, NotApplicable, build, make_weights
from .suite import LINEAR, Suite
from .tables import Column

SMOKE = [Case("smoke", 48, 40, 56, 8, torch.float32, torch.float32, p, "cpu") for p in (0.0, 0.1)]

SMOKE_COLUMNS: list[Column] = [
    ("p", "dropout", "g"),
    ("provider", "provider", "s"),
    ("result", "result", "s"),
    ("detail", "detail", "s"),
]
MEMORY_COLUMNS: list[Column] = [
    ("shape", "shape", "s"),
    ("M", "M", "d"),
    ("K", "K", "d"),
    ("N", "N", "d"),
    ("r", "r", "d"),
    ("p", "dropout", "g"),
    ("provider", "provider", "s"),
    ("saved MB", "saved_mb", ".2f"),
    ("note", "note", "s"),
]
MODEL_COLUMNS: list[Column] = [
    ("shape", "shape", "s"),
    ("M", "M", "d"),
    ("r", "r", "d"),
    ("p", "dropout", "g"),
    ("mode", "mode", "s"),
    ("provider", "provider", "s"),
    ("GFLOP", "model_gflop", ".1f"),
    ("MB moved", "model_mb", ".0f"),
    ("passes", "model_passes", "d"),
    ("model ms", "model_ms", ".3f"),
    ("x floor", "model_ratio_to_floor", ".3f"),
    ("vs peft", "model_speedup_vs_peft", ".2f"),
    ("vs addmm", "model_speedup_vs_addmm", ".2f"),
]


def smoke(providers: list[str]) -> list[dict]:
    """Every provider, forward + backward, on a tiny case on the CPU (fused through the interpreter),
    checked against the fp64 reference on the same weights (the dropout cases only for finiteness)."""
    out = []
    for case in SMOKE:
        w = make_weights(case)
        ref = fused_lora.reference.lora_linear(
            w["x"].double(), w["W"].double(), w["A"].double(), w["B"].double(), case.alpha / case.r
        )
        for name in providers:
            row = {"dropout": case.dropout, "provider": name}
            try:
                prov = build(name, case, w)
            except (NotApplicable, ImportError) as e:
                out.append({**row, "result": "n/a", "detail": str(e)})
                continue
            expected = prov.expected() if hasattr(prov, "expected") else ref  # 4-bit providers: their own W
            y = prov.forward()
            prov.backward()
            ok = bool(torch.isfinite(y).all() and torch.isfinite(prov.x.grad).all())
            detail = "forward+backward ran, finite"
            if case.dropout == 0 and name != "floor":
                err = (y.double() - expected).abs().max().item()
                ok = ok and err < 1e-3
                detail = f"max |y - fp64 reference| = {err:.2e}"
            out.append({**row, "result": "ok" if ok else "FAILED", "detail": f"{detail} ({prov.impl})"})
    return out


def memory_rows(cases: list[Case], providers: list[str], env: dict, progress: bool = True,
                suite: Suite = LINEAR) -> list[dict]:  # fmt: skip
    """Bytes kept for backward by one training forward, at full size, on the meta device, with dropout
    and attention dispatched as on CUDA (:func:`cuda_dropout`: a bool mask, not the CPU's mask in the
    activation dtype; :func:`cuda_attention`: flash attention's q, k, v, output and logsumexp, not the
    math path's scores)."""
    unique = list({(c.shape, c.M, c.r, c.dropout): c for c in cases}.values())
    rows = []
    pbar = bar(len(unique) * len(providers), "bytes kept for backward", progress)
    for case in unique:
        w = suite.make_weights(case)
        for name in providers:
            row = {**env, **case.fields(), "provider": name, "mode": "saved", "speed_valid": False}
            try:
                prov = suite.build(name, case, w)
            except NotApplicable as e:
                rows.append({**row, "note": f"n/a: {e}"})
            else:
                kept = [*prov.module.parameters(), prov.x, *getattr(prov, "state", ())]  # state: a 4-bit W's scales
                with cuda_dropout(), cuda_attention():  # what a GPU run keeps (dropout's mask: bool)
                    saved = saved_for_backward(prov.forward, kept)
                rows.append(
                    {
                        **row,
                        "saved_mb": nbytes(saved) / 1e6,
                        "note": prov.impl,
                        "saved_shapes": [list(t.shape) for t in saved],
                    }
                )
            pbar.update()
    pbar.close()
    return rows


def model_rows(cases: list[Case], providers: list[str], modes: list[str], gpu: model.GPUSpec, env: dict,
               suite: Suite = LINEAR):  # fmt: skip
    """The roofline model of every (case, mode, provider), with ratios to the floor and speedups."""
    rows = []
    for case, mode in itertools.product(cases, modes):
        group = {
            name: {
                **env,
                **case.fields(),
                "provider": name,
                "mode": mode,
                "speed_valid": False,
                **suite.modelled(case, name, mode, gpu),
            }
            for name in providers
        }
        if case.dropout > 0 and "addmm" in group:
            group["addmm"]["note"] = "n/a with dropout"
        ms = {n: r["model_ms"] for n, r in group.items() if not r.get("note")}
        for r in group.values():
            if r.get("note"):
                continue
            r["model_ratio_to_floor"] = r["model_ms"] / ms["floor"] if "floor" in ms else math.nan
            r["model_speedup_vs_peft"] = ms["peft"] / r["model_ms"] if "peft" in ms else math.nan
            r["model_speedup_vs_addmm"] = ms["addmm"] / r["model_ms"] if "addmm" in ms else None
        rows += [r for r in group.values() if not r.get("note")]
    return rows


def run_offline(cases, providers, modes, gpu: model.GPUSpec, env: dict, progress: bool = True):
    """(rows for the results file, smoke rows, table sections for the tables file)."""
    checks = smoke(providers)
    mem = memory_rows(cases, providers, env, progress)
    mod = model_rows(cases, providers, modes, gpu, env)
    sections = [
        ("1. smoke run (CPU; fused = Triton interpreter): correctness only, no speed claims", checks,
         SMOKE_COLUMNS),
        ("2. bytes kept for backward by one training forward (measured: real autograd on the meta device, "
         "full size, dropout dispatched as on CUDA (a bool mask); parameters and x itself excluded)", mem,
         MEMORY_COLUMNS),
        (f"3. MODELLED time on an {gpu.name} ({gpu.tflops:g} TFLOP/s, {gpu.tbps:g} TB/s): sum over each "
         f"provider's passes of max(FLOPs/peak, bytes/bandwidth) — a limit, not a measurement", mod,
         MODEL_COLUMNS),
    ]  # fmt: skip
    return mem + mod, checks, sections
