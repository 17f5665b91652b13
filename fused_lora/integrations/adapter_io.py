"""PEFT's adapter files, read and written from plain models with LoRALinear layers.

    save_adapter(model, "out/")   # adapter_config.json + adapter_model.safetensors, PEFT's key names
    load_adapter(model, "out/")   # injects LoRALinear where the file has adapters (if not yet), then loads

Keys are ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight``, as
``PeftModel.save_pretrained`` writes them, so an adapter saved here loads with
``PeftModel.from_pretrained`` on the same base model and gives the same outputs, and the reverse.
Per-module ranks and alphas go through PEFT's ``rank_pattern`` / ``alpha_pattern``.

Distributed: a DDP-wrapped model is unwrapped (its ``module.`` prefix is not part of the names), and only
rank 0 writes files (calling ``save_adapter`` on every rank or on rank 0 alone both work). Under FSDP2 the
adapters are gathered, so ``save_adapter`` is a collective there: every rank calls it, rank 0 writes, and
every rank returns once the files exist. ``load_adapter`` reads the files on every rank and copies each
rank's block into the sharded adapters (inject LoRA before ``fully_shard``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from ..distributed import barrier, copy_full_into, full, is_sharded, is_writer, reshard_all, unwrap
from ..layer import LoRALinear
from .inject import find_targets, lora_layers, mark_only_lora_as_trainable, replace_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": True, "lora_bias": True}


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (["q_proj", "v_proj"]) when they select exactly `names`, else the full names."""
    leaves = sorted({n.split(".")[-1] for n in names})
    selected = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's LoRALinear adapters as a PEFT LoRA adapter; returns the directory.

    Collective under FSDP2 (every rank calls; rank 0 writes); elsewhere only rank 0 writes."""
    from safetensors.torch import save_file

    model = unwrap(model)
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRALinear layers to save (use inject_lora first)")
    r = _most_common(m.r for m in layers.values())
    alpha = _most_common(m.lora_alpha for m in layers.values())
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's config holds one use_rslora for all layers, but these layers mix it")
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(m.lora_dropout_p for m in layers.values()),
        "target_modules": _target_modules(model, list(layers)),
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {re.escape(n): m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    sharded = is_sharded(model)
    reshard_all(model)
    tensors = {}
    for name, m in layers.items():  # the same order on every rank: full() gathers DTensors
        tensors[f"{PREFIX}{name}.lora_A.weight"] = full(m.lora_A.detach()).contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = full(m.lora_B.detach()).contiguous().cpu()
    out = Path(directory)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if sharded:
        barrier()
    return out


def _pattern(patterns: dict, name: str, default):
    """PEFT's rule: a key matches a module whose name ends with it (after a dot, or whole)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {directory} (adapter_model.bin is not read: re-save it with safetensors)"
        )
    config = json.loads(cfg_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}, only LORA adapters load here")
    for key, bad in UNSUPPORTED.items():
        if config.get(key) == bad:
            raise ValueError(f"{cfg_path}: {key}={bad} is not supported by LoRALinear")
    return config, load_file(str(weights_path))


def _adapter_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from PEFT's keys; anything else in the file is an error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in state.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if m is None:
            unknown.append(key)
        else:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if unknown:
        raise ValueError(f"the adapter file has entries LoRALinear cannot hold: {unknown[:8]}")
    broken = [n for n, p in pairs.items() if set(p) != {"A", "B"}]
    if broken:
        raise ValueError(f"the adapter file lacks lora_A or lora_B for {broken}")
    return {n: (p["A"], p["B"]) for n, p in pairs.items()}


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter into a plain model: the named nn.Linear layers become LoRALinear (unless
    they already are, with matching shapes) and get the file's A and B. Returns the module names.

    Everything is checked before anything changes: a wrong file leaves the model as it was."""
    model = unwrap(model)
    config, state = _read(Path(directory))
    adapters = _adapter_modules(state)
    existing = dict(lora_layers(model))
    names = sorted(adapters)
    if existing:
        missing = [n for n in names if n not in existing]
        extra = [n for n in existing if n not in adapters]
        if missing or extra:
            raise ValueError(
                f"the model's LoRALinear layers do not match the adapter: not in the model "
                f"{missing[:8]}, not in the file {extra[:8]}"
            )
    else:
        find_targets(model, names)  # every name exists and is an nn.Linear, or a clear error
    for n in names:
        a, b = adapters[n]
        layer = existing.get(n) or model.get_submodule(n)
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != layer.in_features
            or b.shape != (layer.out_features, a.shape[0])
        ):
            raise ValueError(
                f"{n}: adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit a layer of "
                f"in_features={layer.in_features}, out_features={layer.out_features}"
            )
        if existing and existing[n].r != a.shape[0]:
            raise ValueError(f"{n}: the file's rank {a.shape[0]} differs from the layer's r={existing[n].r}")

    if not existing:
        for n in names:
            a = adapters[n][0]
            layer = LoRALinear.from_linear(
                model.get_submodule(n),
                r=a.shape[0],
                lora_alpha=_pattern(config.get("alpha_pattern"), n, config.get("lora_alpha", 8)),
                lora_dropout=config.get("lora_dropout", 0.0),
                use_rslora=bool(config.get("use_rslora")),
                merge_weights=False,
                lora_dtype=a.dtype,
            )
            replace_module(model, n, layer)
        mark_only_lora_as_trainable(model)
    for n in names:
        layer = model.get_submodule(n)
        a, b = adapters[n]
        was_merged = layer.merged
        layer.unmerge()  # W's merge follows the adapters it holds
        copy_full_into(layer.lora_A, a)
        copy_full_into(layer.lora_B, b)
        if was_merged:
            layer.merge()
    return names
