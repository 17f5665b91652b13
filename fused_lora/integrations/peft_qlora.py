"""PEFT's QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``, LoRA on a bitsandbytes ``Linear4bit``) on the
fused path: :func:`fused_lora.integrations.patch_peft_model` swaps its class for :class:`FusedLoraLinear4bit`,
whose forward runs :func:`fused_lora.lora_linear` on the 4-bit weight (dequantised by our kernel into the
shared scratch before each GEMM, the LoRA term in the GEMM's epilogue) whenever it can serve the call, and
hands every other call to PEFT's own forward: several active adapters, ``adapter_names=`` mixed batches,
merged or disabled adapters, DoRA and other variants, ``lora_bias``, extra arguments, adapter dtypes the
kernels do not take, and a weight bitsandbytes has repacked into its CPU-only inference layout
(``quant_state.packing_format_for_cpu``, which its eval-mode CPU forward creates). Parameters,
``state_dict``, ``save_pretrained``, adapter switching and ``disable_adapter()`` are PEFT's, unchanged.

The result follows PEFT's layer: the base product in bitsandbytes' compute dtype (fp32/bf16 inputs
compute in their own dtype, fp16 ones in the base layer's ``compute_dtype`` when set), the output in x's
dtype. The LoRA term is rounded once with the base product (PEFT rounds it apart, then adds).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..function import lora_linear
from ..qlora import compute_dtype_for
from ..quant import QuantizedWeight
from ..validation import KERNEL_DTYPES

_FUSED_4BIT: type | None = None


def peft_linear4bit() -> type | None:
    """PEFT's ``lora.bnb.Linear4bit``, or None when peft or bitsandbytes is missing (PEFT defines the class
    only when bitsandbytes is importable)."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def fused_linear4bit_class() -> type | None:
    """PEFT's Linear4bit with the fused forward (made once; importable by name from this module)."""
    global _FUSED_4BIT
    base = peft_linear4bit()
    if _FUSED_4BIT is None and base is not None:

        class FusedLoraLinear4bit(base):
            """PEFT's lora.bnb.Linear4bit, running the fused kernels whenever they can serve the call."""

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                adapter = servable_adapter(self, x, args, kwargs)
                if adapter is None:
                    return super().forward(x, *args, **kwargs)
                base_layer = self.get_base_layer()
                dt = compute_dtype_for(x.dtype, getattr(base_layer, "compute_dtype", None))
                dropout = self.lora_dropout[adapter]
                p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                bias = base_layer.bias
                if bias is not None and bias.dtype not in (dt, torch.float32):
                    bias = bias.to(dt)
                y = lora_linear(
                    x.to(dt),
                    QuantizedWeight.from_bnb(base_layer.weight),
                    self.lora_A[adapter].weight,
                    self.lora_B[adapter].weight,
                    self.scaling[adapter],
                    bias,
                    p,
                    dropout.training,
                )
                return y.to(x.dtype)

        FusedLoraLinear4bit.__module__, FusedLoraLinear4bit.__qualname__ = __name__, "FusedLoraLinear4bit"
        globals()["FusedLoraLinear4bit"] = _FUSED_4BIT = FusedLoraLinear4bit
    return _FUSED_4BIT


def classes() -> dict[type, type]:
    """{PEFT's class: our patched class} for the layer kinds this module serves (empty without bitsandbytes)."""
    fused = fused_linear4bit_class()
    return {peft_linear4bit(): fused} if fused is not None else {}


def static_reason(layer) -> str | None:
    """Why this PEFT Linear4bit can never run fused (None if it can, call by call)."""
    base = layer.get_base_layer()
    if base._forward_pre_hooks or base._forward_hooks or hasattr(base, "_hf_hook"):
        return "base layer has forward hooks (e.g. accelerate offloading)"
    if any(getattr(layer, "use_dora", {}).values()) or getattr(layer, "lora_variant", None):
        return "DoRA / LoRA variant"
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias"
    return None


def servable_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter this call can run fused, or None (then PEFT's forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if (
        adapter not in layer.lora_A
        or getattr(layer, "use_dora", {}).get(adapter)
        or adapter in getattr(layer, "lora_variant", {})
        or getattr(layer, "lora_bias", {}).get(adapter)
    ):
        return None
    qs = getattr(layer.get_base_layer().weight, "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False) or len(qs.shape) != 2:
        return None
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return None  # PEFT's forward: its autocast handling of the adapters is its own
    dt = compute_dtype_for(x.dtype, getattr(layer.get_base_layer(), "compute_dtype", None))
    if dt not in KERNEL_DTYPES or layer.lora_A[adapter].weight.dtype not in (dt, torch.float32):
        return None
    return adapter


def __getattr__(name: str):
    """``FusedLoraLinear4bit`` on first access (pickle looks classes up by module and name)."""
    if name == "FusedLoraLinear4bit":
        cls = fused_linear4bit_class()
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
