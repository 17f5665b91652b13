"""Drop-in integrations: plain nn.Modules (the loralib way), Hugging Face PEFT models, PEFT's files."""

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
