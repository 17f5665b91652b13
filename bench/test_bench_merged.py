"""pytest-benchmark suite for fused q/k/v: MergedLinear against loralib's and against PEFT's three layers.

    pytest bench/test_bench_merged.py --benchmark-only [--benchmark-json out.json]

One projection 4096 -> 3·4096 with adapters on enable_lora = [True, False, True] (q and v, the LoRA paper's
choice) and [True, True, True], bf16, fp32 adapters, r = 16, 8192 tokens, forward and forward+backward:

    fused    fused_lora.MergedLinear: one shrink for every group, each output tile adding only its own
             group's low-rank product in the GEMM's epilogue
    loralib  loralib.MergedLinear: ΔW [N, K] rebuilt with a grouped conv1d on every call, then x·ΔWᵀ —
             a second full GEMM
    peft     three nn.Linear(4096, 4096) (q, k, v) each wrapped in PEFT's lora.Linear where enabled, run
             one after another on the same x (how PEFT adapts Llama's separate projections)
    floor    the bare fused projection x·Wᵀ through cuBLAS

Without a GPU: a tiny case through the interpreter, grouped as "interpreter-smoke" — it proves the suite
runs; its times say nothing about speed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fused_lora

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
M, K, G, R = (8192, 4096, 4096, 16) if GPU else (24, 40, 16, 4)
DTYPE = torch.bfloat16 if GPU else torch.float32
ENABLES = {"q,v": [True, False, True], "q,k,v": [True, True, True]}


def _layers(provider: str, enable: list[bool]):
    torch.manual_seed(0)
    ours = fused_lora.MergedLinear(K, 3 * G, r=R, lora_alpha=2 * R, enable_lora=enable, device=DEV, dtype=DTYPE,
                                   lora_dtype=torch.float32)  # fmt: skip
    nn.init.normal_(ours.lora_B, std=0.02)
    if provider == "fused":
        return ours, ours
    if provider == "floor":
        ours.weight.requires_grad_(False)
        return (lambda x: nn.functional.linear(x, ours.weight, ours.bias)), None
    if provider == "loralib":
        loralib = pytest.importorskip("loralib")
        theirs = loralib.MergedLinear(K, 3 * G, r=R, lora_alpha=2 * R, enable_lora=enable).to(DEV)
        theirs.load_state_dict(ours.state_dict())
        theirs.weight.data = theirs.weight.data.to(DTYPE)
        theirs.bias.data = theirs.bias.data.to(DTYPE)
        return (lambda x: theirs(x.float()) if torch.float32 != DTYPE else theirs(x)), theirs
    pytest.importorskip("peft")
    from fused_lora.bench.providers import Case, _peft_linear

    case = Case("qkv", M, K, G, R, DTYPE, torch.float32, 0.0, DEV)
    parts = nn.ModuleList()
    for q, on in enumerate(enable):
        base = nn.Linear(K, G, device=DEV, dtype=DTYPE)
        base.weight.data.copy_(ours.weight[q * G : (q + 1) * G])
        base.weight.requires_grad_(False)
        parts.append(_peft_linear(base, case).to(DEV) if on else base)
    return (lambda x: torch.cat([p(x) for p in parts], dim=-1)), parts


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("enable", list(ENABLES))
@pytest.mark.parametrize("provider", ["fused", "loralib", "peft", "floor"])
def test_qkv(benchmark, provider, enable, mode):
    step, trainable = _layers(provider, ENABLES[enable])
    x = torch.randn(M, K, device=DEV, dtype=DTYPE, requires_grad=True)

    def run():
        y = step(x)
        if mode == "fwdbwd":
            y.float().sum().backward()
        if GPU:
            torch.cuda.synchronize()
        x.grad = None
        for p in trainable.parameters() if trainable is not None else ():
            p.grad = None

    name = "qkv" if GPU else "interpreter-smoke qkv"
    benchmark.group = f"{name} {K}->3x{G} {enable} r={R} M={M} {mode}"
    benchmark.extra_info.update(provider=provider, speed_valid=GPU,
                                gpu=torch.cuda.get_device_name() if GPU else "none (interpreter)")  # fmt: skip
    with fused_lora.use_backend("triton"):
        benchmark.pedantic(run, rounds=20 if GPU else 2, warmup_rounds=3 if GPU else 1)
