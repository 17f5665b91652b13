"""What a layer keeps for backward, measured with saved_tensors_hooks (device-independent).

With dropout 0.1, the fused layer keeps x itself (the caller's tensor, not a copy), the [M, r] product
in fp32, and an 8-byte seed: no dropped copy of x, no mask, nothing [M, N]-sized. The unfused way (our
reference, PEFT's formula) keeps a dropped copy of x and the mask besides.
"""

from __future__ import annotations

import torch

import fused_lora
from fused_lora import LoRALinear


def kept_for_backward(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd saved during layer(x) whose storage is neither a parameter's nor x's."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    owned = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    owned.add(x.untyped_storage().data_ptr())
    unique = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in owned}
    return list(unique.values())


def nbytes(ts) -> int:
    return sum(t.untyped_storage().nbytes() for t in ts)


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
