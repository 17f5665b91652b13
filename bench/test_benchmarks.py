"""pytest-benchmark suite: every provider, mode and dropout at the reference shape.

    pytest bench/ --benchmark-only [--benchmark-json out.json]

On a CUDA GPU: M=8192, K=N=4096, r=16, bf16 (the issue's reference problem), each call synchronised.
Without one: a tiny fp32 case through the interpreter, grouped as "interpreter-smoke" — it proves the
suite runs; its times say nothing about speed. The full sweep with tables, results file and plots is
``python -m fused_lora.bench``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fused_lora.bench import model
from fused_lora.bench.providers import Case, NotApplicable, build, make_weights

GPU = torch.cuda.is_available()
CASE = (
    Case("attn-7b", 8192, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, 0.0, "cuda")
    if GPU
    else Case("interpreter-smoke", 64, 96, 80, 8, torch.float32, torch.float32, 0.0, "cpu")
)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", model.MODES)
@pytest.mark.parametrize("provider", model.PROVIDERS)
def test_lora_layer(benchmark, provider, mode, dropout):
    case = replace(CASE, dropout=dropout)
    try:
        prov = build(provider, case, make_weights(case))
    except NotApplicable as e:
        pytest.skip(f"{provider}: {e}")
    if mode == "bwd":
        prov.forward()
    step = {"fwd": prov.forward, "bwd": prov.backward, "fwdbwd": prov.fwdbwd}[mode]

    def run():
        step()
        if GPU:
            torch.cuda.synchronize()
        for t in prov.trainable():
            t.grad = None

    benchmark.group = f"{case.shape} r={case.r} p={dropout:g} {mode}"
    benchmark.extra_info.update(
        provider=provider,
        impl=prov.impl,
        M=case.M,
        K=case.K,
        N=case.N,
        r=case.r,
        dtype=str(case.dtype),
        speed_valid=GPU,
        gpu=torch.cuda.get_device_name() if GPU else "none (interpreter)",
    )
    benchmark.pedantic(run, rounds=20 if GPU else 2, warmup_rounds=3 if GPU else 1)
