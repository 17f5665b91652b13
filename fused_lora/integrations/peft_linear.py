"""PEFT's ``lora.Linear`` and ``lora.Embedding`` on the fused kernels.

``lora.Linear`` (an ``nn.Linear`` base, or a subclass that keeps nn.Linear's forward such as
MultiheadAttention's ``out_proj``, or GPT-2's ``Conv1D`` with ``fan_in_fan_out``):

    y = x·Wᵀ + bias' + s·(drop(x)·Aᵀ)·Bᵀ           one call of :func:`fused_lora.lora_linear`
    bias' = bias + s·b_B   with lora_bias=True     (PEFT computes lora_B(lora_A(drop(x)))·s, b_B included)
    DoRA: y = (m/n)·(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + bias   :func:`fused_lora.dora.dora_linear` (n without B·A;
          with dropout in training, PEFT's own formula under ``dora_formula`` "peft")
    KaSA: y = x·Wᵀ + bias' + s·(drop(x)·(diag(σ)·A)ᵀ)·Bᵀ   the same call with A' = σ ⊙ A ([r, in], formed
          per step; W is the SVD-truncated weight PEFT wrote at init)

so lora_B's bias is folded into the bias the fused GEMM adds (trainable: its gradient is s·Σ dY, as
PEFT's); PEFT's merge adds s·b_B to the base bias, which the subclass leaves to PEFT. ``lora.Embedding``
(a plain ``nn.Embedding``) calls :func:`fused_lora.lora_embedding`: W[idx] + s·A[:, idx]ᵀ·Bᵀ.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..distributed import fsdp_managed
from ..dora import dora_linear, dora_norm, scale_columns
from ..embedding import lora_embedding
from ..function import lora_linear
from .peft_kinds import (
    AdapterPath,
    LayerKind,
    hooked,
    is_conv1d,
    is_plain_linear,
    is_variant,
    kernels_refuse,
    linear_dtypes_ok,
    peft_lora,
    register_kind,
    variant_name,
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
    b = getattr(layer.lora_B[adapter], "bias", None)  # BD-LoRA's BlockDiagonalLinear has none
    if b is None:
        return bias
    return b * scaling if bias is None else torch.add(bias, b, alpha=scaling)


def both(*reasons):
    """An AdapterPath reason that holds when every one of `reasons` does (the first refusal otherwise)."""

    def reason(layer, adapter: str) -> str | None:
        return next((why for r in reasons if (why := r(layer, adapter)) is not None), None)

    return reason


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


def _factor(module: nn.Module) -> torch.Tensor:
    """lora_A / lora_B's weight as a matrix: BD-LoRA's BlockDiagonalLinear as its block-diagonal matrix
    (differentiable, [out, in]; PEFT merges that same matrix)."""
    dense = getattr(module, "weight_as_blockdiagonal_matrix", None)
    return dense() if dense is not None else module.weight


def _linear_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    bias = lora_bias(layer, adapter, layer.get_base_layer().bias, scaling)
    A, B = _factor(layer.lora_A[adapter]), _factor(layer.lora_B[adapter])
    return lora_linear(x, base_weight(layer), A, B, scaling, bias, p, dropout.training)


def _dora_reason(layer, adapter: str) -> str | None:
    if variant_name(layer, adapter) != "DoraLinearVariant":
        return "not a DoRA adapter"
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        return "DoRA with lora_bias"
    if getattr(layer, "ephemeral_gpu_offload", False):
        return "DoRA with ephemeral_gpu_offload"
    return dropout_reason(layer, adapter)


def _dora_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    m, w = layer.lora_magnitude_vector[adapter].weight, layer.get_base_layer().weight
    return _linear_servable(layer, adapter, x) and m.is_floating_point() and m.device == w.device


def _dora_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    m = layer.lora_magnitude_vector[adapter].weight
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    base = layer.get_base_layer()
    return dora_linear(x, base_weight(layer), A, B, m, scaling, base.bias, p, layer.training,
                       cache_norm=not fsdp_managed(base))  # fmt: skip


def _kasa_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    """As LoRA's; not while PEFT's deferred SVD truncation (meta-device init) is pending: PEFT's forward
    applies it on the first call."""
    pending = adapter in getattr(layer, "_lora_kasa_truncation_deferred", ())
    return not pending and _linear_servable(layer, adapter, x)


def _kasa_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's KaSA: y = x·Wᵀ + bias' + s·B·(σ ⊙ A·drop(x)) — LoRA with A' = σ ⊙ A (differentiable in σ and A)."""
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    bias = lora_bias(layer, adapter, layer.get_base_layer().bias, scaling)
    A = layer.lora_A[adapter].weight
    A = (A * layer.lora_diag[adapter].unsqueeze(1)).to(A.dtype)
    return lora_linear(x, base_weight(layer), A, layer.lora_B[adapter].weight, scaling, bias, p, dropout.training)


def _lora_like(name: str, variant: str) -> AdapterPath:
    """A path for a LoRA variant whose forward is LoRA's own."""
    return AdapterPath(name, both(is_variant(variant), dropout_reason), _linear_forward, _linear_servable)


LINEAR = register_kind(
    LayerKind(
        name="lora.Linear",
        peft_class=lambda: peft_lora().Linear,
        fused_name="FusedLoraLinear",
        base_reason=linear_base_reason,
        paths=[
            AdapterPath("LoRA", _linear_reason, _linear_forward, _linear_servable),
            # variants whose forward is LoRA's: MiCA (lora_B frozen, so no dB is computed) and BD-LoRA (one
            # factor block-diagonal: its dense matrix, [r, in] or [out, r], formed per call)
            _lora_like("MiCA", "MiCALinearVariant"),
            _lora_like("BD-LoRA", "BdLoraLinearVariant"),
            # DoRA: the column scale m/n around the fused GEMM, n from the factored norm (fused_lora.dora)
            AdapterPath("DoRA", _dora_reason, _dora_forward, _dora_servable),
            # KaSA: the learned singular values σ folded into lora_A per call (σ ⊙ A, [r, in])
            AdapterPath("KaSA", both(is_variant("KasaLinearVariant"), dropout_reason), _kasa_forward, _kasa_servable),
        ],
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


def _embedding_fns(layer, adapter: str) -> str | None:
    if adapter in getattr(layer, "input_fns", {}) or adapter in getattr(layer, "output_fns", {}):
        return "embedding with input/output functions (tied adapter)"
    return None


def _embedding_reason(layer, adapter: str) -> str | None:
    return _embedding_fns(layer, adapter) or variant_reason(layer, adapter)


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


def _dora_embedding_reason(layer, adapter: str) -> str | None:
    if variant_name(layer, adapter) != "DoraEmbeddingVariant":
        return "not a DoRA adapter"
    if layer.get_base_layer().max_norm is not None:
        return "DoRA embedding with max_norm (PEFT's norm follows the lookup's renormalisation)"
    return _embedding_fns(layer, adapter)


def _dora_embedding_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    m, w = layer.lora_magnitude_vector[adapter].weight, layer.get_base_layer().weight
    return _embedding_servable(layer, adapter, x) and m.is_floating_point() and m.device == w.device


def _dora_embedding_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA embedding: y = (m/n) ⊙ (W[x] + s·A[:, x]ᵀ·Bᵀ), n_d = ‖W[:, d] + s·(Aᵀ·Bᵀ)[:, d]‖ over the
    vocabulary — the factored norm of Wᵀ [D, V] with A [r, V], B [D, r] (fused_lora.dora)."""
    emb = layer.get_base_layer()
    A, B, s = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], layer.scaling[adapter]
    m = layer.lora_magnitude_vector[adapter].weight
    n = dora_norm(emb.weight.t(), A, B, s, cache=not fsdp_managed(emb))
    return scale_columns(_embedding_forward(layer, adapter, x), m / n.to(m.dtype))


EMBEDDING = register_kind(
    LayerKind(
        name="lora.Embedding",
        peft_class=lambda: peft_lora().Embedding,
        fused_name="FusedLoraEmbedding",
        base_reason=_embedding_base_reason,
        paths=[
            AdapterPath("LoRA", _embedding_reason, _embedding_forward, _embedding_servable),
            AdapterPath(
                "MiCA",
                both(is_variant("MiCAEmbeddingVariant"), _embedding_fns),
                _embedding_forward,
                _embedding_servable,
            ),
            AdapterPath("DoRA", _dora_embedding_reason, _dora_embedding_forward, _dora_embedding_servable),
        ],
        adapters=lambda layer: list(layer.lora_embedding_A.keys()),
    )
)
