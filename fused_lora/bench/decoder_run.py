"""The decoder-layer case's runs, ``python -m fused_lora.bench --case decoder`` (the layer and its
providers: fused_lora/bench/decoder.py).

On a CUDA GPU: per provider and mode, the step's time (median, p20, p80), the ratio to the floor and the
speedup over PEFT, the peak memory of a training step and the bytes kept for backward (sweep.measure_case,
this case's suite). Without one: a smoke run of every provider on a tiny layer on the CPU (ours through
Triton's interpreter) that checks fused, hybrid, auto and PEFT against an fp64 run of PEFT's layer on the
same weights; the bytes each provider keeps at full size (meta device, dropout and attention dispatched
as on CUDA); and the roofline model of the layer (model.decoder_passes), labelled as modelled.
"""

from __future__ import annotations

import dataclasses

import torch

from . import model, offline
from .decoder import TINY, DecoderCase, NotApplicable, build, make_case, make_weights
from .progress import bar
from .suite import Suite
from .sweep import measure_case
from .tables import Column

SMOKE_TOKENS, SMOKE_SEQ, SMOKE_RANK = 18, 9, 5  # 2 sequences of 9, r = 5: small, odd, not a power of two
SMOKE_TOLERANCE = 1e-4  # max |y - y64| / max |y64| for an fp32 layer (the rounding of a few fp32 GEMMs)


def flops(case: DecoderCase, provider: str, mode: str) -> float:
    return model.decoder_flops(provider, mode, case.dims, case.r)


def modelled(case: DecoderCase, provider: str, mode: str, gpu: model.GPUSpec) -> dict:
    """The roofline model's columns for the whole layer: a limit, not a measurement."""
    e, ea = torch.finfo(case.dtype).bits // 8, torch.finfo(case.adapter_dtype).bits // 8
    ps = model.decoder_passes(provider, mode, case.dims, case.r, e, ea, case.dropout > 0)
    return {
        "model_gflop": sum(p.flops for p in ps) / 1e9,
        "model_mb": sum(p.bytes for p in ps) / 1e6,
        "model_passes": len(ps),
        "model_ms": model.roofline_ms(ps, gpu),
        "model_gpu": gpu.name,
    }


SUITE = Suite(make_weights, build, flops, modelled)

COLUMNS: list[Column] = [
    ("M", "M", "d"),
    ("batch", "batch", "d"),
    ("seq", "seq", "d"),
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
    ("peak MB", "peak_mb", ".0f"),
    ("saved MB", "saved_mb", ".1f"),
    ("model ms", "model_ms", ".3f"),
    ("note", "note", "s"),
]
MEMORY_COLUMNS: list[Column] = [c for c in offline.MEMORY_COLUMNS if c[0] not in ("K", "N")]
MODEL_COLUMNS: list[Column] = [c for c in offline.MODEL_COLUMNS if c[0] != "vs addmm"]


def cases(tokens: list[int], seq: int, ranks: list[int], dtype: torch.dtype, adapter_dtype: torch.dtype,
          dropouts: list[float], device: str) -> list[DecoderCase]:  # fmt: skip
    return [make_case(M, seq, r, dtype, adapter_dtype, p, device) for M in tokens for r in ranks for p in dropouts]


def run_measured(cases: list[DecoderCase], providers: list[str], modes: list[str], gpu: model.GPUSpec, env: dict,
                 rep: int, progress: bool = True, sink=None):  # fmt: skip
    """(rows, table sections); `sink` gets each case's rows as soon as they are measured (a run stopped
    by a timeout keeps them)."""
    pbar = bar(len(cases) * len(providers), "measuring", progress)
    rows: list[dict] = []
    for case in cases:
        pbar.set_postfix_str(f"decoder M={case.M} r={case.r} p={case.dropout:g}")
        case_rows = measure_case(case, providers, modes, gpu, env, rep, pbar, suite=SUITE)
        if sink is not None:
            sink(case_rows)
        rows += case_rows
    pbar.close()
    return rows, [(f"== {_title(cases[0])} ==", rows, COLUMNS)]


def _title(case: DecoderCase) -> str:
    f = case.fields()
    return (f"{case.shape}: {case.describe()}; LoRA on q, k, v, o, gate, up, down; {f['dtype']} "
            f"(adapters {f['adapter_dtype']})")  # fmt: skip


def in_float64(case: DecoderCase, w: dict) -> tuple[DecoderCase, dict]:
    """The same case and weights in float64 (the smoke run's reference)."""
    f64 = dataclasses.replace(case, dtype=torch.float64, adapter_dtype=torch.float64)
    cast = lambda v: {k: cast(t) for k, t in v.items()} if isinstance(v, dict) else v.double()
    return f64, {k: cast(v) for k, v in w.items()}


def _smoke_case(p: float) -> DecoderCase:
    return make_case(SMOKE_TOKENS, SMOKE_SEQ, SMOKE_RANK, torch.float32, torch.float32, p, "cpu", dims=TINY,
                     shape="decoder-tiny")  # fmt: skip


def smoke(providers: list[str]) -> list[dict]:
    """Every provider, forward + backward, on a tiny fp32 layer on the CPU (ours through the interpreter);
    without dropout each LoRA provider's y is checked against PEFT's layer run in fp64 on the same weights
    (with dropout, and for the floor, which has no adapter, forward and backward must only be finite)."""
    out = []
    for p in (0.0, 0.1):
        case = _smoke_case(p)
        w = make_weights(case)
        ref = None
        if p == 0:
            try:
                ref = build("peft", *in_float64(case, w)).forward().detach()
            except (NotApplicable, ImportError):
                ref = None
        for name in providers:
            row = {"dropout": p, "provider": name}
            try:
                prov = build(name, case, w)
            except (NotApplicable, ImportError) as e:
                out.append({**row, "result": "n/a", "detail": str(e)})
                continue
            y = prov.forward()
            prov.backward()
            ok = bool(torch.isfinite(y).all() and torch.isfinite(prov.x.grad).all())
            detail = "forward+backward ran, finite"
            if p == 0 and name != "floor":
                if ref is None:
                    detail += "; no fp64 reference (needs peft)"
                else:
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    ok = ok and err < SMOKE_TOLERANCE
                    detail = f"max |y - y64(peft)| / max |y64| = {err:.1e}"
            out.append({**row, "result": "ok" if ok else "FAILED", "detail": f"{detail} ({prov.impl})"})
    return out


def run_offline(cases: list[DecoderCase], providers: list[str], modes: list[str], gpu: model.GPUSpec, env: dict,
                progress: bool = True):  # fmt: skip
    """(rows for the results file, smoke rows, table sections for the tables file)."""
    checks = smoke(providers)
    mem = offline.memory_rows(cases, providers, env, progress, suite=SUITE)
    mod = offline.model_rows(cases, providers, modes, gpu, env, suite=SUITE)
    title = _title(cases[0])
    sections = [
        (f"1. smoke run (CPU, fp32, a tiny {_smoke_case(0.0).describe()}, {SMOKE_TOKENS} tokens, r = {SMOKE_RANK}; "
         "fused, hybrid, auto = Triton interpreter): correctness only, no speed claims", checks,
         offline.SMOKE_COLUMNS),
        (f"2. bytes kept for backward by one training forward of the layer ({title}; measured: real autograd on "
         "the meta device, full size, dropout and attention dispatched as on CUDA (a bool mask; flash "
         "attention's q, k, v, output, logsumexp); parameters, x and the rotary cos/sin excluded)", mem,
         MEMORY_COLUMNS),
        (f"3. MODELLED time of the layer on an {gpu.name} ({gpu.tflops:g} TFLOP/s, {gpu.tbps:g} TB/s): each "
         "projection as its provider's passes, the rest of the layer (attention, norms, rotary, SiLU·up, "
         "residuals) the same for every provider at its fewest bytes — a limit, not a measurement", mod,
         MODEL_COLUMNS),
    ]  # fmt: skip
    return mem + mod, checks, sections
