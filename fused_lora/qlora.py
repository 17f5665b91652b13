"""``LoRALinear4bit``: LoRA on a 4-bit base weight (QLoRA), on the fused kernels.

    layer = LoRALinear4bit.from_linear4bit(bnb_layer, r=16, lora_alpha=32, lora_dropout=0.05)
    y = layer(x)     # y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ, W dequantised from bitsandbytes' NF4/FP4 storage

W stays in bitsandbytes' storage (the wrapped layer's ``Params4bit`` is shared, not copied; its
``quant_state`` is read at every call, so moving the model keeps working). Each forward dequantises W into
a scratch buffer shared by every 4-bit layer (fused_lora/qlora_scratch.py) and runs the fused GEMM with the
LoRA epilogue; the backward dequantises again for dX. Saved for backward: x, xa, the dropout seed (and the
packed weight, a parameter): never a 16-bit copy of W.

Compute dtype, as bitsandbytes' ``Linear4bit``: fp32 and bf16 inputs compute in their own dtype; fp16
inputs in the layer's ``compute_dtype`` if one is set (then the output is cast back to fp16), else in fp16.
Adapters are fp32 by default (PEFT's default for QLoRA), or 16-bit (``lora_dtype``).

Merging ΔW into a 4-bit weight is refused (``merge()`` raises): it would requantise W + ΔW, rounding
most of ΔW away (the LoRA update is far below one NF4 step of a block), and could not be undone exactly.
To deploy merged weights, load the base model in 16 bits, ``load_adapter`` the saved adapter and
``merge_lora`` there (exact).

The state_dict holds what bitsandbytes' ``Linear4bit`` writes (``weight`` and its quant_state entries,
``bias``) plus ``lora_A`` / ``lora_B``; ``load_state_dict`` loads the adapters and the bias, and checks
that the 4-bit weight entries, if present, are the ones the layer holds (a 4-bit weight is not reloaded
in place: build the layer from a loaded bitsandbytes model).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .function import lora_linear
from .quant import QuantizedWeight
from .validation import check_dropout, check_rank

__all__ = ["MERGE_4BIT_REFUSED", "LoRALinear4bit", "compute_dtype_for", "is_linear4bit"]


def compute_dtype_for(x_dtype: torch.dtype, layer_compute_dtype: torch.dtype | None) -> torch.dtype:
    """bitsandbytes' Linear4bit rule: fp32 and bf16 inputs compute in their own dtype, fp16 inputs in the
    layer's compute_dtype when one is set (else in fp16)."""
    if x_dtype == torch.float16 and layer_compute_dtype is not None:
        return layer_compute_dtype
    return x_dtype


def is_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (by class name and module, so bitsandbytes is never imported here)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class LoRALinear4bit(nn.Linear):
    """y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ, W 4-bit; s = lora_alpha / r (lora_alpha / √r with use_rslora).

    An ``nn.Linear`` by type (in_features, out_features, weight, bias) as bitsandbytes' ``Linear4bit`` is;
    ``weight`` is the packed 4-bit parameter (with its ``quant_state``)."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        merge_weights: bool = False,
    ) -> None:
        q = QuantizedWeight.from_bnb(weight)  # checks the state (and refuses bitsandbytes' CPU-only layout)
        r, p = check_rank(r), check_dropout(lora_dropout)
        if merge_weights:
            raise ValueError("LoRALinear4bit(merge_weights=True): " + _WHY)
        out_features, in_features = q.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight, self.bias = weight, bias
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.compute_dtype, self.merge_weights, self.merged = compute_dtype, False, False
        self.lora_dropout = nn.Dropout(p) if p > 0.0 else nn.Identity()
        if r > 0:
            factory = {"device": q.device, "dtype": lora_dtype}
            self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
            self.reset_lora_parameters()

    @classmethod
    def from_linear4bit(
        cls,
        layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        merge_weights: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> LoRALinear4bit:
        """Wrap a bitsandbytes ``Linear4bit`` (already quantised: moved to its device). Its weight and bias
        are shared; its ``compute_dtype`` is kept. Defaults are PEFT's (r = 8, lora_alpha = 8)."""
        if isinstance(layer, LoRALinear4bit):
            raise TypeError("this layer is already a LoRALinear4bit")
        if not is_linear4bit(layer):
            raise TypeError(f"from_linear4bit wraps a bitsandbytes Linear4bit, got {type(layer).__name__}")
        return cls(layer.weight, layer.bias, r, lora_alpha, lora_dropout, use_rslora=use_rslora,
                   lora_dtype=lora_dtype or torch.float32, compute_dtype=getattr(layer, "compute_dtype", None),
                   merge_weights=merge_weights)  # fmt: skip

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, **kwargs) -> LoRALinear4bit:
        """From a :class:`QuantizedWeight` (no bitsandbytes needed); `kwargs` as the constructor's."""
        bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        return cls(weight.as_parameter(), bias, **kwargs)

    @property
    def scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_parameters(self) -> None:  # nn.Linear's constructor calls it on the meta weight: nothing to do
        pass

    def reset_lora_parameters(self) -> None:
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def quantized_weight(self) -> QuantizedWeight:
        """W as a :class:`QuantizedWeight` over the shared parameter (no copy, no device work)."""
        return QuantizedWeight.from_bnb(self.weight)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W [out, in] in `dtype` (default: the original weight's), a tensor of its own."""
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantized_weight()
        dt = compute_dtype_for(x.dtype, self.compute_dtype)
        xc = x.to(dt)
        bias = self.bias.to(dt) if self.bias is not None and self.bias.dtype not in (dt, torch.float32) else self.bias
        if self.r == 0:
            y = torch.nn.functional.linear(xc, q.dequantize(dt), bias.to(dt) if bias is not None else None)
        else:
            y = lora_linear(xc, q, self.lora_A, self.lora_B, self.scaling, bias, self.lora_dropout_p, self.training)
        return y.to(x.dtype)

    # --- merging: refused (see the module docstring) ---

    def _has_lora(self) -> bool:
        return self.r > 0

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    def merge(self) -> None:
        raise ValueError("LoRALinear4bit.merge(): " + _WHY)

    def unmerge(self) -> None:
        """Nothing to undo: a 4-bit layer is never merged."""

    # --- state_dict: bitsandbytes' entries for the weight, ours for the adapters ---

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        qs = getattr(self.weight, "quant_state", None)
        if qs is not None and hasattr(qs, "as_dict"):
            for k, v in qs.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        weight = state_dict.get(prefix + "weight")
        same = weight is None or (weight.shape == self.weight.shape and torch.equal(weight.cpu(), self.weight.cpu()))
        if not same:
            error_msgs.append(f"{prefix}weight: a different 4-bit weight than this layer holds; build the layer "
                              "from a bitsandbytes model loaded with that weight instead")  # fmt: skip
        own = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight")}
        n = len(missing_keys)
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        missing_keys[n:] = [k for k in missing_keys[n:] if k != prefix + "weight"]  # the weight is never reloaded

    def extra_repr(self) -> str:
        q = self.quantized_weight()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{q.quant_type} bs={q.blocksize}{' nested' if q.nested else ''}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout_p}, use_rslora={self.use_rslora}"
        )


MERGE_4BIT_REFUSED = _WHY = (
    "merging into a 4-bit weight is refused: W + ΔW would be requantised to 4 bits, rounding most of ΔW away "
    "(a LoRA update is far below one NF4 step of a block) and making the merge impossible to undo exactly. To "
    "deploy merged weights, load the base model in 16 bits, load_adapter the saved adapter and merge_lora there"
)
