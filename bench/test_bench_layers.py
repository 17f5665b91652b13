"""pytest-benchmark suite for loralib's other layers: the fused Embedding and the LoRA convolutions.

    pytest bench/test_bench_layers.py --benchmark-only [--benchmark-json out.json]

Embedding, providers side by side: ``fused`` (fused_lora.Embedding: one kernel each way), ``peft``
(PEFT's / loralib's formula, F.embedding(idx, W) + F.embedding(idx, Aᵀ)·Bᵀ·s in plain PyTorch, as
``fused_lora.reference_layers`` writes it), ``floor`` (a bare F.embedding: the layer with no adapter).
Conv2d: ``fused`` (fused_lora.Conv2d) against ``loralib`` (loralib.Conv2d, same weights).

On a CUDA GPU: a Llama-3 table (128256 x 4096, bf16, fp32 adapters, r = 16, 8192 tokens of real-text-like
repetition) and a ResNet-like convolution. Without one: tiny cases through the interpreter, grouped as
"interpreter-smoke" — they prove the suite runs; their times say nothing about speed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_lora
from fused_lora import reference_layers

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
V, D, T, R = (128256, 4096, 8192, 16) if GPU else (97, 40, 50, 4)
TABLE = torch.bfloat16 if GPU else torch.float32


def _embedding_step(provider: str):
    torch.manual_seed(0)
    layer = fused_lora.Embedding(V, D, r=R, lora_alpha=2 * R, device=DEV, dtype=TABLE, lora_dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_A, std=0.02)
    idx = (torch.rand(T) ** 3 * V).long().to(DEV)  # skewed to low ids, many repeats, as real text has
    args = (layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    if provider == "fused":
        return lambda: layer(idx), layer
    if provider == "peft":
        return lambda: reference_layers.lora_embedding(idx, *args), layer
    layer.weight.requires_grad_(True)  # the floor: the plain lookup, its table trainable instead
    return lambda: F.embedding(idx, layer.weight), layer


def _bench(benchmark, step, trainable, mode: str, group: str, **info):
    def run():
        y = step()
        if mode == "fwdbwd":
            y.float().sum().backward()
        if GPU:
            torch.cuda.synchronize()
        for p in trainable.parameters():
            p.grad = None

    benchmark.group = group
    benchmark.extra_info.update(speed_valid=GPU, gpu=torch.cuda.get_device_name() if GPU else "none (interpreter)",
                                **info)  # fmt: skip
    with fused_lora.use_backend("triton"):
        benchmark.pedantic(run, rounds=20 if GPU else 2, warmup_rounds=3 if GPU else 1)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["fused", "peft", "floor"])
def test_embedding(benchmark, provider, mode):
    step, layer = _embedding_step(provider)
    name = "embedding" if GPU else "interpreter-smoke embedding"
    _bench(benchmark, step, layer, mode, f"{name} V={V} D={D} T={T} r={R} {mode}", provider=provider)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("provider", ["fused", "loralib"])
def test_conv2d(benchmark, provider, mode):
    loralib = pytest.importorskip("loralib")
    c, hw, batch = (512, 14, 32) if GPU else (8, 9, 2)
    torch.manual_seed(0)
    ours = fused_lora.Conv2d(c, c, 3, r=R, lora_alpha=2 * R, padding=1, device=DEV)
    torch.nn.init.normal_(ours.lora_B, std=0.02)
    layer = ours
    if provider == "loralib":
        layer = loralib.Conv2d(c, c, 3, r=R, lora_alpha=2 * R, padding=1).to(DEV)
        layer.load_state_dict(ours.state_dict())
    x = torch.randn(batch, c, hw, hw, device=DEV)
    name = "conv2d" if GPU else "interpreter-smoke conv2d"
    _bench(benchmark, lambda: layer(x), layer, mode, f"{name} {c}->{c} k3 {hw}x{hw} b{batch} r={R} {mode}",
           provider=provider)  # fmt: skip
