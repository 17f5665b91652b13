"""Triton kernels for LoRA, and the launchers that check nothing but shapes they must (installed as
``fused_lora.kernels``; this folder sits at the repository's top level).

    x [M, K], W [N, K], A [r, K], B [N, r], s = alpha / r, drop(x) = x ⊙ mask / (1 - p)
    xa = s·drop(x)·Aᵀ                               shrink
    y  = x·Wᵀ + bias + xa·Bᵀ                        lora_gemm (fused)  or  low_rank + cuBLAS addmm (hybrid)
    g  = s/(1-p)·dY·B,  dB = dYᵀ·xa,  dA = gᵀ·(x ⊙ mask)          lora_grad
    dX = dY·W + mask ⊙ (g·A)                        lora_gemm (fused)  or  low_rank + cuBLAS addmm (hybrid)

Nothing here knows about modules or autograd: see ``fused_lora.function`` for that. Configurations live
in ``configs``, their per-problem choice in ``tuning``, operand precision in ``precision``.
"""

from .dropout import drop_threshold, dropout_mask, effective_dropout_p, keep_bits, new_keep_bits
from .lora_gemm import lora_gemm
from .lora_grad import lora_grad
from .low_rank import low_rank
from .shrink import shrink
from .utils import LAUNCHES

__all__ = [
    "LAUNCHES",
    "drop_threshold",
    "dropout_mask",
    "effective_dropout_p",
    "keep_bits",
    "lora_gemm",
    "lora_grad",
    "low_rank",
    "new_keep_bits",
    "shrink",
]
