"""What a layer keeps for backward, measured with saved_tensors_hooks (device-independent).

With dropout 0.1, the fused layer keeps x itself (the caller's tensor, not a copy), the [M, r] product
in fp32, and an 8-byte seed: no dropped copy of x, no mask, nothing [M, N]-sized. The unfused way (our
reference, PEFT's formula) keeps a dropped copy of x and the mask besides.
"""

from __future__ import annotations

import torch

import fused_lora
from fused_lora import LoRALinear
from fused_lora.bench.measure import nbytes, saved_for_backward


def kept_for_backward(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """What autograd saved during layer(x) beyond the parameters and x itself."""
    return saved_for_backward(lambda: layer(x), [*layer.parameters(), x])


def test_fused_keeps_only_x_and_the_rank_product(device):
    M, K, N, r = 96, 80, 72, 8
    layer = LoRALinear(K, N, r=r, lora_dropout=0.1, device=device)
    x = torch.randn(2, M // 2, K, device=device, requires_grad=True)
    extra = kept_for_backward(layer, x)
    shapes = sorted(tuple(t.shape) for t in extra)
    assert shapes == [(1,), (M, r)], shapes  # the seed and xa
    assert nbytes(extra) == M * r * 4 + 8

    with fused_lora.use_backend("reference"):
        unfused = kept_for_backward(layer, x)
    assert nbytes(unfused) >= M * K * x.element_size(), "the unfused path keeps a dropped copy of x"
    assert nbytes(extra) < nbytes(unfused) / 5


def test_meta_device_traces_the_real_function_at_full_size():
    """On the meta device the fused Function saves exactly what it saves on a GPU, at any size, for free."""
    M, K, N, r = 8192, 4096, 4096, 16
    layer = LoRALinear(K, N, r=r, lora_dropout=0.1, device="meta", dtype=torch.bfloat16)
    x = torch.empty(M, K, device="meta", dtype=torch.bfloat16, requires_grad=True)
    extra = kept_for_backward(layer, x)
    assert sorted(tuple(t.shape) for t in extra) == [(1,), (M, r)]
    y = layer(x)
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and layer.lora_A.grad.shape == layer.lora_A.shape
