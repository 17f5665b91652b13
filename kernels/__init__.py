"""Triton kernels for LoRA, and the launchers that check nothing but shapes they must (installed as
``fused_lora.kernels``; this folder sits at the repository's top level).

    x [M, K], W [N, K], A [r, K], B [N, r], s = alpha / r, drop(x) = x ⊙ mask / (1 - p)
    y  = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ          shrink → lora_gemm
    dX = dY·W + s·mask ⊙ ((dY·B)·A) / (1 - p)      lora_grad (g = dY·B) → lora_gemm
    dA = s·(dY·B)ᵀ·drop(x),  dB = s·dYᵀ·(drop(x)·Aᵀ)  lora_grad

Nothing here knows about modules or autograd: see ``fused_lora.function`` for that.
"""

from .dropout import drop_threshold, dropout_mask
from .lora_gemm import lora_gemm
from .lora_grad import lora_grad
from .shrink import shrink
from .utils import LAUNCHES

__all__ = ["LAUNCHES", "drop_threshold", "dropout_mask", "lora_gemm", "lora_grad", "shrink"]
