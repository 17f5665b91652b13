"""Run a Hugging Face PEFT model's LoRA layers on the fused kernels, in place.

    report = patch_peft_model(peft_model)     # logs and returns what was patched and what was not, and why
    unpatch_peft_model(peft_model)            # PEFT's own forward again

Each PEFT ``lora.Linear`` it can serve — a plain ``nn.Linear`` (or GPT-2 ``Conv1D``) base, no DoRA or
other LoRA variant, no ``lora_bias``, one active adapter — has its class swapped for a subclass whose
forward calls :func:`fused_lora.lora_linear` with the layer's own parameters; each ``lora.Embedding`` with
a plain ``nn.Embedding`` base (not a scaled subclass such as Gemma's, not ``sparse``, no tensor-parallel
plan) likewise calls :func:`fused_lora.lora_embedding`. PEFT's convolution layers stay on PEFT's forward
(reported): their delta is weight-sized and a fused kernel would not pay. Nothing else changes:
parameter names, ``state_dict``, ``save_pretrained`` / ``from_pretrained``, adapter switching, merging
and ``disable_adapter()`` work as PEFT defines them, because at every call the subclass hands anything it
cannot serve (several active adapters, ``adapter_names=`` mixed batches, merged or disabled adapters,
extra arguments, dtype combinations the kernels do not take) back to PEFT's forward.

- Layers added later are patched too: ``add_adapter`` / ``load_adapter`` on new target modules go through
  the tuner's ``inject_adapter``, which a patched model runs through :class:`PatchNewLayers` (the new
  ``lora.Linear`` layers are patched, the others reported, at INFO on the "fused_lora" logger).
- A patched layer prints as PEFT's ``lora.Linear(...)`` does.
- Patched models pickle and load in a new process: ``FusedLoraLinear`` is importable from this module
  by name (created on first access, so importing fused_lora does not import peft).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backend import resolve_backend
from ..embedding import lora_embedding
from ..function import lora_linear
from ..validation import KERNEL_DTYPES
from . import peft_qlora

log = logging.getLogger("fused_lora")

_FUSED_CLASS: type | None = None
_FUSED_EMBEDDING_CLASS: type | None = None


@dataclass
class PatchReport:
    patched: list[str] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    not_patched: dict[str, str] = field(default_factory=dict)  # module name -> why

    def __str__(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.not_patched.values():
            reasons[why] = reasons.get(why, 0) + 1
        why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items())) or "none"
        return (
            f"fused_lora: {len(self.patched)} PEFT LoRA layers patched, {len(self.already_patched)} already "
            f"patched, {len(self.not_patched)} left on PEFT's forward ({why})"
        )


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError("patch_peft_model needs peft: pip install 'fused_lora[integrations]'") from e
    return lora_layer


def _fused_class():
    """peft's lora.Linear with the fused forward (created once, at module level, so models pickle)."""
    global _FUSED_CLASS
    if _FUSED_CLASS is None:
        base = _peft_lora().Linear

        class FusedLoraLinear(base):
            """PEFT's lora.Linear, running the fused kernels whenever they can serve the call."""

            def _get_name(self) -> str:  # repr: "lora.Linear(...)", as PEFT prints the layer
                return base.__name__

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                adapter = _servable_adapter(self, x, args, kwargs)
                if adapter is None:
                    return super().forward(x, *args, **kwargs)
                dropout = self.lora_dropout[adapter]
                p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
                return lora_linear(
                    x,
                    _base_weight(self),
                    self.lora_A[adapter].weight,
                    self.lora_B[adapter].weight,
                    self.scaling[adapter],
                    self.get_base_layer().bias,
                    p,
                    dropout.training,
                )

        _FUSED_CLASS = _importable(FusedLoraLinear)
    return _FUSED_CLASS


def _importable(cls: type) -> type:
    """`cls` (made inside a function, on PEFT's class) as a top-level name of this module, so pickle finds
    it by module and name in a new process."""
    cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()[cls.__name__] = cls
    return cls


def _fused_embedding_class():
    """peft's lora.Embedding with the fused lookup (created once, at module level, so models pickle)."""
    global _FUSED_EMBEDDING_CLASS
    if _FUSED_EMBEDDING_CLASS is None:
        base = _peft_lora().Embedding

        class FusedLoraEmbedding(base):
            """PEFT's lora.Embedding, running the fused kernel whenever it can serve the call."""

            def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                adapter = _servable_embedding_adapter(self, args, kwargs)
                if adapter is None:
                    return super().forward(x, *args, **kwargs)
                emb = self.get_base_layer()
                return lora_embedding(
                    x,
                    emb.weight,
                    self.lora_embedding_A[adapter],
                    self.lora_embedding_B[adapter],
                    self.scaling[adapter],
                    emb.padding_idx,
                    emb.max_norm,
                    emb.norm_type,
                    emb.scale_grad_by_freq,
                    emb.sparse,
                )

        _FUSED_EMBEDDING_CLASS = _importable(FusedLoraEmbedding)
    return _FUSED_EMBEDDING_CLASS


def __getattr__(name: str):
    """``FusedLoraLinear`` / ``FusedLoraEmbedding`` on first access (pickle looks classes up by module and
    name, in a process that never patched anything)."""
    if name == "FusedLoraLinear":
        return _fused_class()
    if name == "FusedLoraEmbedding":
        return _fused_embedding_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class PatchNewLayers:
    """Stands in for a PEFT tuner's ``inject_adapter`` once its model is patched: runs the tuner's own,
    then patches the ``lora.Linear`` layers it created (``add_adapter`` on new target modules). A
    module-level class, not a closure, so the model still pickles."""

    def __init__(self, tuner: nn.Module) -> None:
        self.tuner = tuner

    def __call__(self, *args, **kwargs):
        out = type(self.tuner).inject_adapter(self.tuner, *args, **kwargs)
        report = _patch_layers(self.tuner)
        log.info("after inject_adapter (add_adapter / load_adapter): %s", report)
        return out


def _tuners(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTuner

    return [m for m in model.modules() if isinstance(m, BaseTuner)]


def _base_weight(layer) -> torch.Tensor:
    w = layer.get_base_layer().weight
    return w.t() if layer.fan_in_fan_out else w  # Conv1D stores [in, out]: a view, no copy


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _variant_reason(layer) -> str | None:
    if any(getattr(layer, "use_dora", {}).values()) or getattr(layer, "lora_variant", None):
        return "DoRA / LoRA variant"
    if len(layer.active_adapters) != 1:
        return f"{len(layer.active_adapters)} active adapters"
    return None


def _static_embedding_reason(layer) -> str | None:
    base = layer.get_base_layer()
    if type(base) is not nn.Embedding or not base.weight.is_floating_point():
        return f"custom embedding base layer ({type(base).__name__})"  # e.g. a scaled embedding
    if base._forward_pre_hooks or base._forward_hooks or hasattr(base, "_hf_hook"):
        return "base layer has forward hooks (e.g. accelerate offloading)"
    if base.sparse:
        return "sparse embedding"
    if getattr(layer, "tp_layer", None) is not None:
        return "tensor-parallel embedding"
    return _variant_reason(layer)


def _static_reason(layer) -> str | None:
    """Why this layer can never be served (None if it can)."""
    lora_layer = _peft_lora()
    if type(layer) is lora_layer.Embedding:
        return _static_embedding_reason(layer)
    if type(layer) in peft_qlora.classes():  # PEFT's lora.bnb.Linear4bit (QLoRA)
        return peft_qlora.static_reason(layer)
    if type(layer) in (lora_layer.Conv1d, lora_layer.Conv2d, lora_layer.Conv3d):
        return f"{type(layer).__name__} layer (convolutions stay on PEFT's forward)"
    if type(layer) is not lora_layer.Linear:
        return f"{type(layer).__name__} layer"
    base = layer.get_base_layer()
    if not (type(base) is nn.Linear or _is_conv1d(base)) or not base.weight.is_floating_point():
        return f"quantized or custom base layer ({type(base).__name__})"
    if base._forward_pre_hooks or base._forward_hooks or hasattr(base, "_hf_hook"):
        return "base layer has forward hooks (e.g. accelerate offloading)"  # we read its weight directly
    if any(getattr(layer, "lora_bias", {}).values()):
        return "lora_bias"
    return _variant_reason(layer)


def _servable_adapter(layer, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active adapter this call can run fused, or None (then PEFT's forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if (
        adapter not in layer.lora_A
        or getattr(layer, "use_dora", {}).get(adapter)
        or adapter in getattr(layer, "lora_variant", {})
        or getattr(layer, "lora_bias", {}).get(adapter)
    ):
        return None
    a_dtype, w_dtype = layer.lora_A[adapter].weight.dtype, layer.get_base_layer().weight.dtype
    dev = x.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    # the dtypes lora_linear computes in: autocast's (which leaves float64 as it is), else the tensors' own
    cast = lambda dtype: torch.get_autocast_dtype(dev) if autocast and dtype != torch.float64 else dtype
    act = cast(x.dtype)
    if act != cast(w_dtype) or a_dtype not in (act, torch.float32) or _kernels_refuse(x.device, act):
        return None
    return adapter


def _kernels_refuse(device: torch.device, dtype: torch.dtype) -> bool:
    """The call would reach the Triton kernels with a dtype they do not take (float64): PEFT's forward
    serves it instead (the reference backend takes float64)."""
    return dtype not in KERNEL_DTYPES and resolve_backend(device) == "triton"


def _servable_embedding_adapter(layer, args, kwargs) -> str | None:
    """The one active adapter this embedding call can run fused, or None (then PEFT's forward runs)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if (
        adapter not in layer.lora_embedding_A
        or getattr(layer, "use_dora", {}).get(adapter)
        or adapter in getattr(layer, "lora_variant", {})
        or adapter in getattr(layer, "input_fns", {})
        or adapter in getattr(layer, "output_fns", {})
    ):
        return None
    a_dtype, weight = layer.lora_embedding_A[adapter].dtype, layer.get_base_layer().weight
    if a_dtype not in (weight.dtype, torch.float32) or _kernels_refuse(weight.device, weight.dtype):
        return None
    return adapter


def _lora_layers(model: nn.Module):
    lora_layer = _peft_lora()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Make every PEFT LoRA Linear and Embedding layer of `model` that the kernels can serve run them,
    now and when adapters are added later. Idempotent."""
    if not _lora_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no PEFT LoRA layers (wrap it with peft.get_peft_model "
            f"first, or use fused_lora.inject_lora on a plain model)"
        )
    report = _patch_layers(model)
    for tuner in _tuners(model):
        if not isinstance(tuner.__dict__.get("inject_adapter"), PatchNewLayers):
            tuner.inject_adapter = PatchNewLayers(tuner)
    log.info("%s", report)
    return report


def _patch_layers(model: nn.Module) -> PatchReport:
    fused = {_peft_lora().Linear: _fused_class(), _peft_lora().Embedding: _fused_embedding_class()}
    fused |= peft_qlora.classes()
    report = PatchReport()
    for name, layer in _lora_layers(model):
        if type(layer) in fused.values():
            report.already_patched.append(name)
        elif (why := _static_reason(layer)) is not None:
            report.not_patched[name] = why
        else:
            layer.__class__ = fused[type(layer)]
            report.patched.append(name)
    return report


def unpatch_peft_model(model: nn.Module) -> int:
    """Give every patched layer PEFT's own forward back (and the tuners their own inject_adapter);
    returns how many layers."""
    for tuner in _tuners(model):
        if isinstance(tuner.__dict__.get("inject_adapter"), PatchNewLayers):
            del tuner.__dict__["inject_adapter"]
    peft_cls = {_fused_class(): _peft_lora().Linear, _fused_embedding_class(): _peft_lora().Embedding}
    peft_cls |= {fused: peft for peft, fused in peft_qlora.classes().items()}
    n = 0
    for _, layer in _lora_layers(model):
        if type(layer) in peft_cls:
            layer.__class__ = peft_cls[type(layer)]
            n += 1
    return n
