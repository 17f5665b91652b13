"""Drop-in integrations: plain nn.Modules (the loralib way), Hugging Face PEFT models, PEFT's files, and
``AdapterCheckpointCallback`` for transformers' Trainer (imported on first use: it needs transformers)."""

from .adapter_io import load_adapter, save_adapter
from .inject import (
    InjectReport,
    inject_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from .peft_patch import PatchReport, patch_peft_model, unpatch_peft_model

__all__ = [
    "InjectReport",
    "PatchReport",
    "inject_lora",
    "load_adapter",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "patch_peft_model",
    "save_adapter",
    "unmerge_lora",
    "unpatch_peft_model",
]


def __getattr__(name: str):
    if name == "AdapterCheckpointCallback":
        from .trainer import AdapterCheckpointCallback

        return AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
