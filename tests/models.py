"""Tiny models for the integration tests: a Llama built from LlamaConfig (nothing downloaded), a PEFT
model over it, a batch, and non-zero LoRA B matrices (so adapters change outputs and gradients)."""

from __future__ import annotations

import torch
import torch.nn as nn

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(device="cpu", seed=0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).to(device).eval()


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, 9), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def randomize_lora(model: nn.Module, seed=3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_model(device="cpu", **config):
    import peft

    base = tiny_llama(device)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=config.pop("target_modules", ALL), lora_dropout=0.0, **config
    )
    model = peft.get_peft_model(base, cfg)
    randomize_lora(model)
    return model
