"""fused_lora: LoRA fine-tuning with the low-rank path fused into the base GEMM (Triton kernels).

    y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ,   s = lora_alpha / r

- :func:`lora_linear` — the functional form (an autograd Function over the kernels).
- :func:`dora_linear` — DoRA's (``LoRALinear(use_dora=True)`` the layer; :mod:`fused_lora.dora`), and
  :func:`set_dora_formula` / :func:`use_dora_formula` for what dropout means in it ('fused' | 'peft').
- :class:`LoRALinear` — a drop-in for loralib's ``lora.Linear``; :class:`MergedLinear` for its
  ``lora.MergedLinear`` (fused q/k/v: one pass over x for every group's adapter).
- :class:`Embedding`, :class:`Conv1d` / :class:`Conv2d` / :class:`Conv3d` — drop-ins for loralib's
  (the embedding's lookup and low-rank term in one kernel; :func:`lora_embedding` its functional form).
- :mod:`fused_lora.reference` — the same math in plain PyTorch (the spec, and the CPU path).
- :func:`set_backend` / :func:`use_backend` — 'auto' | 'triton' | 'reference' (or FUSED_LORA_BACKEND).
- :func:`set_impl` / :func:`use_impl` — 'auto' | 'fused' | 'hybrid' (or FUSED_LORA_IMPL): the fused GEMM or
  our low-rank kernel + cuBLAS, chosen per shape by timing both (auto).
- :class:`LoRALinear4bit` — QLoRA: LoRA on a bitsandbytes 4-bit (NF4/FP4) base weight, dequantised by our
  kernel into a shared scratch before each GEMM (:class:`QuantizedWeight` is the 4-bit weight itself).
- :func:`inject_lora`, loralib's helpers, :func:`merge_lora` — LoRA for any nn.Module.
- :func:`patch_peft_model` — a Hugging Face PEFT model's LoRA layers on the fused kernels.
- :func:`save_adapter` / :func:`load_adapter` — PEFT's adapter files from plain models.
- :class:`AdapterCheckpointCallback` — those files at every transformers ``Trainer`` checkpoint
  (imported on first use: it needs transformers).
"""

from .backend import get_backend, set_backend, use_backend
from .conv import Conv1d, Conv2d, Conv3d
from .dora import dora_linear, set_dora_formula, use_dora_formula
from .embedding import Embedding, IndexOutOfRangeError, lora_embedding
from .function import LoRALinearFunction, lora_linear
from .impl import get_impl, set_impl, use_impl
from .integrations import (
    InjectReport,
    PatchReport,
    inject_lora,
    load_adapter,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    patch_peft_model,
    save_adapter,
    unmerge_lora,
    unpatch_peft_model,
)
from .layer import LoRALinear
from .merged import MergedLinear
from .qlora import LoRALinear4bit
from .quant import QuantizedWeight

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "AdapterCheckpointCallback":  # needs transformers: imported on first use
        from .integrations.trainer import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Embedding",
    "IndexOutOfRangeError",
    "InjectReport",
    "LoRALinear",
    "LoRALinear4bit",
    "LoRALinearFunction",
    "MergedLinear",
    "PatchReport",
    "QuantizedWeight",
    "__version__",
    "dora_linear",
    "get_backend",
    "get_impl",
    "inject_lora",
    "load_adapter",
    "lora_embedding",
    "lora_linear",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "patch_peft_model",
    "save_adapter",
    "set_backend",
    "set_dora_formula",
    "set_impl",
    "unmerge_lora",
    "unpatch_peft_model",
    "use_backend",
    "use_dora_formula",
    "use_impl",
]
