"""pytest-benchmark suite: a whole decoder layer with LoRA on its seven projections, every provider
(fused_lora/bench/decoder.py says what each is), forward and forward+backward, dropout 0 and 0.1.

    pytest bench/test_bench_decoder.py --benchmark-only [--benchmark-json out.json]

On a CUDA GPU: Llama-3-8B's layer, 4 x 2048 tokens (M = 8192), r = 16, bf16 weights with fp32 adapters,
each call synchronised. Without one: the tiny layer of the smoke run through the interpreter, grouped as
"interpreter-smoke" — it proves the suite runs; its times say nothing about speed. The table with ratios,
peak memory and saved bytes is ``python -m fused_lora.bench --case decoder``.
"""

from __future__ import annotations

import pytest
import torch

from fused_lora.bench import decoder

pytest.importorskip("transformers")
pytest.importorskip("peft")

GPU = torch.cuda.is_available()


def _case(dropout: float) -> decoder.DecoderCase:
    if GPU:
        return decoder.make_case(8192, 2048, 16, torch.bfloat16, torch.float32, dropout, "cuda")
    return decoder.make_case(18, 9, 5, torch.float32, torch.float32, dropout, "cpu", dims=decoder.TINY,
                             shape="interpreter-smoke decoder")  # fmt: skip


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", decoder.PROVIDERS)
def test_decoder_layer(benchmark, provider, mode, dropout):
    case = _case(dropout)
    prov = decoder.build(provider, case, decoder.make_weights(case))
    step = {"fwd": prov.forward, "fwdbwd": prov.fwdbwd}[mode]

    def run():
        step()
        if GPU:
            torch.cuda.synchronize()
        for t in prov.trainable():
            t.grad = None

    benchmark.group = f"{case.shape} M={case.M} r={case.r} p={dropout:g} {mode}"
    benchmark.extra_info.update(
        provider=provider,
        impl=prov.impl,
        M=case.M,
        batch=case.batch,
        seq=case.seq,
        hidden=case.hidden,
        r=case.r,
        dtype=str(case.dtype),
        adapter_dtype=str(case.adapter_dtype),
        speed_valid=GPU,
        gpu=torch.cuda.get_device_name() if GPU else "none (interpreter)",
    )
    benchmark.pedantic(run, rounds=20 if GPU else 2, warmup_rounds=3 if GPU else 1)
