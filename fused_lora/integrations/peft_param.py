"""PEFT's ``lora.ParamWrapper`` (``target_parameters``: LoRA on a bare ``nn.Parameter``).

PEFT registers a parametrization W → W + s·B·A (or, for a 3-D expert stack, one ``baddbmm``) around
every forward of the module that owns the parameter, and removes it after. Where that module is an
``nn.Linear`` and the parameter its 2-D ``weight``, the module's forward is known — y = x·(W + ΔW)ᵀ + bias —
and the fused path is one :func:`fused_lora.lora_linear` call, with no parametrization.

Left on PEFT's forward, with the reason: a parameter read by a module's own forward (a custom layer,
MoE experts with 3-D weights — their grouped products are code we do not see; PEFT's fold is already one
``baddbmm``), a ``bias``, and nested wrappers (several parameters of one module targeted).
"""

from __future__ import annotations

import torch

from ..function import lora_linear
from .peft_kinds import (
    AdapterPath,
    LayerKind,
    hooked,
    is_plain_linear,
    linear_dtypes_ok,
    peft_lora,
    register_kind,
    variant_reason,
)


def _base_reason(layer) -> str | None:
    base = layer.base_layer
    if isinstance(base, peft_lora().ParamWrapper):
        return "nested ParamWrapper (several parameters of one module targeted)"
    param = layer.get_param()
    if param.dim() == 3:
        return f"3-D parameter {layer.parameter_name!r} ({layer.num_experts} experts) read by its module's own forward"
    if not is_plain_linear(base):
        return f"parameter {layer.parameter_name!r} read by the forward of a {type(base).__name__}"
    if layer.parameter_name != "weight":
        return f"nn.Linear's {layer.parameter_name!r} targeted (only its weight has a fused path)"
    if hooked(base) or not param.is_floating_point():
        return "base layer has forward hooks, or a quantized weight"
    return None


def _reason(layer, adapter: str) -> str | None:
    return variant_reason(layer, adapter)


def _servable(layer, adapter: str, x: torch.Tensor) -> bool:
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return a.dtype == b.dtype and linear_dtypes_ok(x, layer.get_param().dtype, a.dtype)


def _forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    base = layer.base_layer
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return lora_linear(x, base.weight, A, B, layer.scaling[adapter], base.bias, 0.0, False)


PARAM_WRAPPER = register_kind(
    LayerKind(
        name="lora.ParamWrapper",
        peft_class=lambda: peft_lora().ParamWrapper,
        fused_name="FusedLoraParamWrapper",
        base_reason=_base_reason,
        paths=[AdapterPath("LoRA", _reason, _forward, _servable)],
    )
)
