"""PEFT adapter files at every Hugging Face ``Trainer`` checkpoint, for models with LoRALinear layers.

    trainer = transformers.Trainer(model, args, train_dataset=ds,
                                   callbacks=[fused_lora.AdapterCheckpointCallback()])

``Trainer`` saves a plain model (one given LoRA by :func:`fused_lora.inject_lora`) as a full
``model.safetensors``: ``resume_from_checkpoint`` reads it back, but ``from_pretrained`` drops its LoRA
entries as unexpected and PEFT cannot read it. This callback adds :func:`fused_lora.save_adapter`'s files
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's format) to every ``checkpoint-<step>``
folder, beside Trainer's own, and, at the end of training, to ``output_dir``; load them with
:func:`fused_lora.load_adapter` or ``peft.PeftModel.from_pretrained``. Under DDP only rank 0 writes; under
FSDP2 every rank takes part in gathering the adapters (Trainer calls the callback on every rank).

A ``peft.PeftModel`` needs none of this: Trainer saves its adapter files itself, and the callback stands
aside (it logs so). A model with no LoRA at all is an error at the start of training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..distributed import unwrap
from .adapter_io import save_adapter
from .inject import lora_layers

log = logging.getLogger("fused_lora")


class AdapterCheckpointCallback(TrainerCallback):
    """Write PEFT adapter files into each Trainer checkpoint (and into output_dir when training ends)."""

    def __init__(self, save_at_end: bool = True) -> None:
        self.save_at_end = save_at_end
        self.written: list[Path] = []  # folders written so far, in order

    def _active(self, model) -> bool:
        if model is None:
            return False
        model = unwrap(model)
        if any(True for _ in lora_layers(model)):
            return True
        if any(type(m).__module__.startswith("peft.") for m in model.modules()):
            return False  # a PEFT model: Trainer writes its adapter files itself
        raise ValueError(
            f"AdapterCheckpointCallback: {type(model).__name__} has no LoRALinear layers "
            f"(add them with fused_lora.inject_lora before training)"
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self._active(model):
            log.info("AdapterCheckpointCallback: a PEFT model, whose adapter files Trainer saves itself")

    def on_save(self, args, state, control, model=None, **kwargs):
        if self._active(model):
            self._save(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save_at_end and self._active(model):
            self._save(model, Path(args.output_dir))

    def _save(self, model, directory: Path) -> None:
        save_adapter(model, directory)
        self.written.append(directory)
