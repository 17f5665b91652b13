"""fused_lora: LoRA fine-tuning with the low-rank path fused into the base GEMM (Triton kernels).

    y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ,   s = lora_alpha / r

- :func:`lora_linear` — the functional form (an autograd Function over the kernels).
- :class:`LoRALinear` — a drop-in for loralib's ``lora.Linear``.
- :mod:`fused_lora.reference` — the same math in plain PyTorch (the spec, and the CPU path).
- :func:`set_backend` / :func:`use_backend` — 'auto' | 'triton' | 'reference' (or FUSED_LORA_BACKEND).
"""

from .backend import get_backend, set_backend, use_backend
from .function import LoRALinearFunction, lora_linear
from .layer import LoRALinear

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "LoRALinearFunction",
    "__version__",
    "get_backend",
    "lora_linear",
    "set_backend",
    "use_backend",
]
