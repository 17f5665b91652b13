"""PEFT's ``lora.Linear`` and ``lora.Embedding`` on the fused kernels.

``lora.Linear`` (an ``nn.Linear`` base, or a subclass that keeps nn.Linear's forward such as
MultiheadAttention's ``out_proj``, or GPT-2's ``Conv1D`` with ``fan_in_fan_out``):

    y = x·Wᵀ + bias' + s·(drop(x)·Aᵀ)·Bᵀ           one call of :func:`fused_lora.lora_linear`
    bias' = bias + s·b_B   with lora_bias=True     (PEFT computes lora_B(lora_A(drop(x)))·s, b_B included)

so lora_B's bias is folded into the bias the fused GEMM adds (trainable: its gradient is s·Σ dY, as
PEFT's); PEFT's merge adds s·b_B to the base bias, which the subclass leaves to PEFT. ``lora.Embedding``
(a plain ``nn.Embedding``) calls :func:`fused_lora.lora_embedding`: W[idx] + s·A[:, idx]ᵀ·Bᵀ.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..embedding import lora_embedding
from ..function import lora_linear
from .peft_kinds import (
    AdapterPath,
    LayerKind,
    hooked,
    is_conv1d,
    is_plain_linear,
    kernels_refuse,
    linear_dtypes_ok,
    peft_lora,
    register_kind,
    variant_reason,
)


def base_weight(layer) -> torch.Tensor:
    """The base weight as [out, in]: GPT-2's Conv1D stores [in, out] (a transposed view, no copy)."""
    w = layer.get_base_layer().weight
    return w.t() if layer.fan_in_fan_out else w


def dropout_reason(layer, adapter: str) -> str | None:
    dropout = layer.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"custom lora_dropout module ({type(dropout).__name__})"
    return None


def lora_bias(layer, adapter: str, bias: torch.Tensor | None, scaling) -> torch.Tensor | None:
    """bias + s·b_B when the adapter has lora_bias (differentiable in both), else bias."""
    b = layer.lora_B[adapter].bias if isinstance(layer.lora_B[adapter], nn.Module) else None
    if b is None:
        return bias
    return b * scaling if bias is None else torch.add(bias, b, alpha=scaling)


def linear_base_reason(layer) -> str | None:
    base = layer.get_base_layer()
    if not (is_plain_linear(base) or is_conv1d(base)) or not base.weight.is_floating_point():
        return f"quantized or custom base layer ({type(base).__name__})"
    if hooked(base):
        return "base layer has forward hooks (e.g. accelerate offloading)"  # we read its weight directly
    if layer.fan_in_fan_out != is_conv1d(base):
        return f"fan_in_fan_out={layer.fan_in_fan_out} on a {type(base).__name__} base"
    return None


def _linear_reason(layer, adapter: str) -> str | None:
    return variant_reason(layer, adapter) or dropout_reason(layer, adapter)


def _linear_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    w, a = layer.get_base_layer().weight, layer.lora_A[adapter].weight
    return a.dtype == layer.lora_B[adapter].weight.dtype and linear_dtypes_ok(x, w.dtype, a.dtype)


def _linear_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    bias = lora_bias(layer, adapter, layer.get_base_layer().bias, scaling)
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return lora_linear(x, base_weight(layer), A, B, scaling, bias, p, dropout.training)


LINEAR = register_kind(
    LayerKind(
        name="lora.Linear",
        peft_class=lambda: peft_lora().Linear,
        fused_name="FusedLoraLinear",
        base_reason=linear_base_reason,
        paths=[AdapterPath("LoRA", _linear_reason, _linear_forward, _linear_servable)],
    )
)


# ---------------------------------------------------------------- lora.Embedding


def _embedding_base_reason(layer) -> str | None:
    base = layer.get_base_layer()
    if type(base) is not nn.Embedding or not base.weight.is_floating_point():
        return f"custom embedding base layer ({type(base).__name__})"  # e.g. a scaled embedding
    if hooked(base):
        return "base layer has forward hooks (e.g. accelerate offloading)"
    if base.sparse:
        return "sparse embedding"
    if getattr(layer, "tp_layer", None) is not None:
        return "tensor-parallel embedding"
    return None


def _embedding_reason(layer, adapter: str) -> str | None:
    if adapter in getattr(layer, "input_fns", {}) or adapter in getattr(layer, "output_fns", {}):
        return "embedding with input/output functions (tied adapter)"
    return variant_reason(layer, adapter)


def _embedding_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    a_dtype, weight = layer.lora_embedding_A[adapter].dtype, layer.get_base_layer().weight
    return a_dtype in (weight.dtype, torch.float32) and not kernels_refuse(weight.device, weight.dtype)


def _embedding_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    emb = layer.get_base_layer()
    A, B = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter]
    return lora_embedding(
        x, emb.weight, A, B, layer.scaling[adapter], emb.padding_idx, emb.max_norm, emb.norm_type,
        emb.scale_grad_by_freq, emb.sparse,
    )  # fmt: skip


EMBEDDING = register_kind(
    LayerKind(
        name="lora.Embedding",
        peft_class=lambda: peft_lora().Embedding,
        fused_name="FusedLoraEmbedding",
        base_reason=_embedding_base_reason,
        paths=[AdapterPath("LoRA", _embedding_reason, _embedding_forward, _embedding_servable)],
        adapters=lambda layer: list(layer.lora_embedding_A.keys()),
    )
)
