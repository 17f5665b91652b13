"""AdaLoRA's ``SVDLinear`` and ``SVDConv2d`` (``peft.tuners.adalora``) on fused_lora's path.

AdaLoRA parametrises ΔW = B·(A⊙E)·s/(ranknum + 1e-5): A [r, in] and B [out, r] the singular vectors,
E [r, 1] the singular values that the RankAllocator masks to zero in place during training (rank
pruning), ranknum a one-element tensor (the current rank). PEFT's forward:

    SVDLinear:  y = x·Wᵀ + bias + (drop(x)·(A⊙E)ᵀ·Bᵀ)·s/(ranknum + 1e-5)
    SVDConv2d:  y = conv(x, W) + bias + conv(drop(x), (B·(A⊙E)).view(W.shape)·s/(ranknum + 1e-5))

The fused path forms A' = A ⊙ (E·s/(ranknum + 1e-5)) per step ([r, in] — tensor ops, no host read of
ranknum, so no sync per step) and passes it as the adapter with scaling 1: SVDLinear is one
:func:`fused_lora.lora_linear` call, SVDConv2d one :func:`fused_lora.conv_function.lora_conv` call (A'
viewed as the [r, C, kH, kW] kernel; with dropout in training, the factored pair on the dropped input —
the same math as PEFT's dense ΔW convolution, at r/out of its cost). Autograd takes the gradients of A,
E and B through A'. Merging, the allocator and the orthogonal regulariser are PEFT's, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..conv_function import lora_conv
from ..function import lora_linear
from .peft_convolution import conv_base_reason
from .peft_kinds import AdapterPath, LayerKind, linear_dtypes_ok, register_kind
from .peft_linear import base_weight, dropout_reason, linear_base_reason


def _adalora():
    from peft.tuners.adalora import layer as adalora_layer

    return adalora_layer


def scaled_singular_vectors(layer, adapter: str) -> torch.Tensor:
    """A ⊙ (E·s/(ranknum + 1e-5)) [r, in] in A's dtype: the adapter the fused call takes with scaling 1."""
    A, E = layer.lora_A[adapter], layer.lora_E[adapter]
    scale = E * (layer.scaling[adapter] / (layer.ranknum[adapter] + 1e-5))  # [r, 1], on the device
    return (A * scale).to(A.dtype)


def _reason(layer, adapter: str) -> str | None:
    return dropout_reason(layer, adapter)


def _linear_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    w, a, b = layer.get_base_layer().weight, layer.lora_A[adapter], layer.lora_B[adapter]
    return a.shape[0] > 0 and a.dtype == b.dtype and linear_dtypes_ok(x, w.dtype, a.dtype)


def _linear_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    A = scaled_singular_vectors(layer, adapter)
    bias = layer.get_base_layer().bias
    return lora_linear(x, base_weight(layer), A, layer.lora_B[adapter], 1.0, bias, p, dropout.training)


SVD_LINEAR = register_kind(
    LayerKind(
        name="adalora.SVDLinear",
        peft_class=lambda: _adalora().SVDLinear,
        fused_name="FusedSVDLinear",
        base_reason=linear_base_reason,
        paths=[AdapterPath("AdaLoRA", _reason, _linear_forward, _linear_servable)],
    )
)


def _conv_base_reason(layer) -> str | None:
    return conv_base_reason(layer.get_base_layer(), nn.Conv2d)


def _conv_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    w, a, b = layer.get_base_layer().weight, layer.lora_A[adapter], layer.lora_B[adapter]
    dev = x.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    return x.dim() == 4 and a.shape[0] > 0 and a.dtype == b.dtype and (autocast or x.dtype == w.dtype)


def _conv_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    base, dropout = layer.get_base_layer(), layer.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    A = scaled_singular_vectors(layer, adapter).view(-1, *base.weight.shape[1:])  # [r, C, kH, kW]
    return lora_conv(
        x, base.weight, A, layer.lora_B[adapter], 1.0, base.bias, p, dropout.training,
        stride=base.stride, padding=base.padding, dilation=base.dilation,
    )  # fmt: skip


SVD_CONV2D = register_kind(
    LayerKind(
        name="adalora.SVDConv2d",
        peft_class=lambda: _adalora().SVDConv2d,
        fused_name="FusedSVDConv2d",
        base_reason=_conv_base_reason,
        paths=[AdapterPath("AdaLoRA", _reason, _conv_forward, _conv_servable)],
    )
)
