"""Run a Hugging Face PEFT model's LoRA layers on fused_lora's path, in place.

    report = patch_peft_model(peft_model)     # logs and returns what was patched and what was not, and why
    print(report)                             # by kind, and by reason for what was left
    unpatch_peft_model(peft_model)            # PEFT's own forward again

Each PEFT layer of a registered kind (:mod:`fused_lora.integrations.peft_kinds`) whose base layer and
adapters it can serve has its class swapped for a subclass whose forward runs fused_lora's path with the
layer's own parameters:

- ``lora.Linear`` (an ``nn.Linear`` or GPT-2 ``Conv1D`` base; ``lora_bias`` folded into the bias; the MiCA
  and BD-LoRA variants, whose forward is LoRA's; KaSA with σ ⊙ A) and
  ``lora.ParamWrapper`` on an ``nn.Linear``'s weight: :func:`fused_lora.lora_linear` (peft_linear, peft_param);
- ``lora.Embedding`` (a plain ``nn.Embedding``): :func:`fused_lora.lora_embedding` (peft_linear);
- ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` (zero padding, no dilation): one convolution with W + s·B·A,
  :func:`fused_lora.conv_function.lora_conv` (peft_convolution); grouped bases: PEFT's factored pair with
  the grouped 1×1, the scale and the add as one batched GEMM;
- ``adalora.SVDLinear`` / ``SVDConv2d``: A⊙E·s/(ranknum + 1e-5) formed per step, then ``lora_linear`` /
  ``lora_conv`` (peft_adalora);
- ``lora.MultiheadAttention``: the merged weights formed once per call, no merge/unmerge (peft_mha);
- ``lora.bnb.Linear4bit`` (QLoRA): ``lora_linear`` on the 4-bit weight (peft_qlora, its own fused class).

Nothing else changes: parameter names, ``state_dict``, ``save_pretrained`` / ``from_pretrained``, adapter
switching, merging and ``disable_adapter()`` work as PEFT defines them, because at every call the subclass
hands anything it cannot serve (several active adapters, ``adapter_names=`` mixed batches, merged or
disabled adapters, extra arguments, dtype combinations the kernels do not take) back to PEFT's forward.
DoRA adapters on ``lora.Linear``, ``lora.Embedding`` and ``lora.Conv1d/2d/3d`` run their layer's path with a
per-column (per-channel) scale m/n, the weight norm without B·A (:mod:`fused_lora.dora`); the other LoRA variants are left on PEFT's forward (reported by
name) until a path for them is registered (:func:`fused_lora.integrations.peft_kinds.register_path`).

- Layers added later are patched too: ``add_adapter`` / ``load_adapter`` on new target modules go through
  the tuner's ``inject_adapter``, which a patched model runs through :class:`PatchNewLayers` (the new
  layers are patched, the others reported, at INFO on the "fused_lora" logger).
- A patched layer prints as PEFT's class does (``lora.Linear(...)``, ``lora.Embedding(...)``, ...).
- Patched models pickle and load in a new process: every fused class (``FusedLoraLinear``,
  ``FusedLoraEmbedding``, ``FusedLoraConv2d``, ``FusedSVDLinear``, ...) is importable from this module by
  name (created on first access, so importing fused_lora does not import peft).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from . import peft_adalora, peft_convolution, peft_linear, peft_mha, peft_param, peft_qlora  # noqa: F401
from .peft_kinds import AdapterPath, LayerKind, fused_class_named, kind_for_class, kinds, peft_lora, register_kind

log = logging.getLogger("fused_lora")


def _peft_linear4bit() -> type:
    cls = peft_qlora.peft_linear4bit()
    if cls is None:
        raise ImportError("PEFT's lora.bnb.Linear4bit needs peft and bitsandbytes")
    return cls


# QLoRA (peft_qlora): its fused class has its own forward and per-call checks; every adapter its static check
# admits has a path
register_kind(
    LayerKind(
        name="lora.Linear4bit",
        peft_class=_peft_linear4bit,
        fused_name="FusedLoraLinear4bit",
        base_reason=peft_qlora.static_reason,
        paths=[AdapterPath("QLoRA", lambda layer, adapter: None, lambda *a, **k: None)],
        make_fused=peft_qlora.fused_linear4bit_class,
    )
)


@dataclass
class PatchReport:
    patched: list[str] = field(default_factory=list)
    already_patched: list[str] = field(default_factory=list)
    not_patched: dict[str, str] = field(default_factory=dict)  # module name -> why
    kinds: dict[str, str] = field(default_factory=dict)  # module name -> its kind ("lora.Conv2d", ...), every layer

    def _count(self, names) -> str:
        counts = Counter(self.kinds.get(n, "?") for n in names)
        return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())) or "none"

    def __str__(self) -> str:
        reasons = Counter(self.not_patched.values())
        why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items())) or "none"
        lines = [
            f"fused_lora: {len(self.patched)} PEFT LoRA layers patched, {len(self.already_patched)} already "
            f"patched, {len(self.not_patched)} left on PEFT's forward ({why})"
        ]
        if self.patched or self.already_patched:
            lines.append(f"  on fused_lora's path: {self._count(self.patched + self.already_patched)}")
        by_kind: dict[tuple[str, str], int] = Counter((self.kinds.get(n, "?"), r) for n, r in self.not_patched.items())
        for (kind, reason), n in sorted(by_kind.items()):
            lines.append(f"  left on PEFT's forward: {n} x {kind}: {reason}")
        return "\n".join(lines)


def __getattr__(name: str):
    """The fused classes on first access (pickle looks classes up by module and name, in a process that
    never patched anything)."""
    cls = fused_class_named(name)
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls


class PatchNewLayers:
    """Stands in for a PEFT tuner's ``inject_adapter`` once its model is patched: runs the tuner's own,
    then patches the layers it created (``add_adapter`` on new target modules). A module-level class, not
    a closure, so the model still pickles."""

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


def _lora_layers(model: nn.Module):
    lora_layer = peft_lora()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]


def patch_peft_model(model: nn.Module) -> PatchReport:
    """Make every PEFT LoRA layer of `model` that fused_lora can serve run its path, now and when adapters
    are added later. Idempotent."""
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
    report = PatchReport()
    for name, layer in _lora_layers(model):
        kind = kind_for_class(type(layer))
        report.kinds[name] = kind.name if kind is not None else _peft_name(type(layer))
        if kind is None:
            report.not_patched[name] = f"{type(layer).__name__} layer (no fused path for this class)"
        elif type(layer) is kind._fused:
            report.already_patched.append(name)
        elif (why := kind.static_reason(layer)) is not None:
            report.not_patched[name] = why
        else:
            layer.__class__ = kind.fused_class()
            report.patched.append(name)
    return report


def _peft_name(cls: type) -> str:
    """'lora.Linear8bitLt', 'adalora.SVDLinear', ...: the tuner's package and the class name."""
    parts = cls.__module__.split(".")
    tuner = parts[2] if len(parts) > 2 and parts[:2] == ["peft", "tuners"] else parts[0]
    return f"{tuner}.{cls.__name__}"


def unpatch_peft_model(model: nn.Module) -> int:
    """Give every patched layer PEFT's own forward back (and the tuners their own inject_adapter);
    returns how many layers."""
    for tuner in _tuners(model):
        if isinstance(tuner.__dict__.get("inject_adapter"), PatchNewLayers):
            del tuner.__dict__["inject_adapter"]
    fused = {kind._fused: kind for kind in kinds() if kind._fused is not None}
    n = 0
    for _, layer in _lora_layers(model):
        if type(layer) in fused:
            layer.__class__ = fused[type(layer)].peft_class()
            n += 1
    return n
