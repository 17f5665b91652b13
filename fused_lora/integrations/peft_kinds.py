"""The registry of PEFT layer kinds that :func:`patch_peft_model` runs on fused_lora's path.

A **kind** serves one PEFT class (exact type: ``lora.Linear``, ``lora.Conv2d``, ``adalora.SVDLinear``, ...):

- ``base_reason(layer)``: why this layer can never be served (its base layer, its settings), or None;
- ``paths``: how each adapter runs (:class:`AdapterPath`); a layer is patched when its base is servable and
  every adapter it holds has a path, otherwise it is reported with the reason of its first path;
- ``call_ok(layer, x, args, kwargs)``: the per-call check of the arguments (no extra arguments for most);
- the fused subclass of PEFT's class, made on first use: its forward asks the kind which path serves this
  call (one active adapter, not merged, adapters enabled, the path's own per-call check) and runs it, or
  hands the call to PEFT's forward. Its ``__name__`` is PEFT's (so its repr and PEFT's messages are
  unchanged); it pickles by its qualified name, an attribute of :mod:`fused_lora.integrations.peft_patch`
  (``FusedLoraLinear``, ``FusedLoraConv2d``, ...).

Other kinds plug in with one call, without touching the existing ones::

    register_kind(LayerKind("lora.Linear4bit", lambda: bnb_layers().Linear4bit, "FusedLoraLinear4bit",
                            base_reason=..., paths=[AdapterPath("LoRA", reason=..., forward=...)]))
    register_path("lora.Linear", AdapterPath("DoRA", reason=..., forward=...), first=True)   # a variant

An adapter path's ``reason(layer, adapter)`` returns None when it runs that adapter (e.g. the DoRA path
for an adapter whose ``lora_variant`` is DoRA), ``servable(layer, adapter, x)`` is its per-call check
(dtypes, training with dropout, ...), ``forward(layer, adapter, x, *args, **kwargs)`` the computation.
Nothing here imports peft until a PEFT class is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..backend import resolve_backend
from ..validation import KERNEL_DTYPES

PATCH_MODULE = "fused_lora.integrations.peft_patch"  # where the fused classes live, for pickle


def peft_lora():
    """PEFT's ``peft.tuners.lora.layer`` (a clear ImportError without the integrations extra)."""
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError("patch_peft_model needs peft: pip install 'fused_lora[integrations]'") from e
    return lora_layer


def _always(layer, adapter, x) -> bool:
    return True


@dataclass
class AdapterPath:
    """How one adapter of a layer runs on our path (see the module docstring)."""

    name: str
    reason: Callable[[nn.Module, str], str | None]
    forward: Callable[..., torch.Tensor]
    servable: Callable[[nn.Module, str, torch.Tensor], bool] = _always


def plain_call(layer, x, args, kwargs) -> bool:
    """Most layers: the fused path takes x alone (``adapter_names=`` batches and other arguments go to PEFT)."""
    return not args and not kwargs


@dataclass
class LayerKind:
    """One PEFT class served on our path (see the module docstring)."""

    name: str
    peft_class: Callable[[], type]
    fused_name: str
    base_reason: Callable[[nn.Module], str | None]
    paths: list[AdapterPath]
    call_ok: Callable[[nn.Module, torch.Tensor, tuple, dict], bool] = plain_call
    adapters: Callable[[nn.Module], list[str]] = lambda layer: list(layer.lora_A.keys())
    make_fused: Callable[[], type] | None = None  # a kind whose fused class, with its own forward, is made elsewhere
    _fused: type | None = field(default=None, repr=False)

    def static_reason(self, layer) -> str | None:
        """Why `layer` can never run on our path (None: it can, for every adapter it holds)."""
        why = self.base_reason(layer)
        if why is not None:
            return why
        for adapter in self.adapters(layer):
            if self.path_for(layer, adapter) is None:
                return self.paths[0].reason(layer, adapter) or f"adapter {adapter!r} has no fused path"
        return None

    def path_for(self, layer, adapter: str) -> AdapterPath | None:
        return next((p for p in self.paths if p.reason(layer, adapter) is None), None)

    def dispatch(self, layer, x, args, kwargs) -> tuple[AdapterPath, str] | None:
        """The path and adapter that serve this call, or None (PEFT's forward runs)."""
        if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
            return None
        if not self.call_ok(layer, x, args, kwargs):
            return None
        adapter = layer.active_adapters[0]
        if adapter not in self.adapters(layer):
            return None
        path = self.path_for(layer, adapter)
        if path is None or not path.servable(layer, adapter, x):
            return None
        return path, adapter

    def fused_class(self) -> type:
        """PEFT's class with the dispatching forward (made once; importable from peft_patch by name)."""
        if self._fused is None:
            self._fused = self.make_fused() if self.make_fused is not None else _make_fused(self)
        return self._fused


_KINDS: dict[str, LayerKind] = {}


def register_kind(kind: LayerKind) -> LayerKind:
    """Add a kind (its name and its fused class name must be new)."""
    if kind.name in _KINDS:
        raise ValueError(f"a layer kind named {kind.name!r} is already registered")
    if any(k.fused_name == kind.fused_name for k in _KINDS.values()):
        raise ValueError(f"a layer kind with fused class name {kind.fused_name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def register_path(kind_name: str, path: AdapterPath, first: bool = False) -> None:
    """Add an adapter path to a registered kind (``first``: tried before the existing ones)."""
    if kind_name not in _KINDS:
        raise ValueError(f"no layer kind named {kind_name!r}; registered: {sorted(_KINDS)}")
    paths = _KINDS[kind_name].paths
    paths.insert(0, path) if first else paths.append(path)


def kinds() -> list[LayerKind]:
    return list(_KINDS.values())


def kind_for_class(cls: type) -> LayerKind | None:
    """The kind whose PEFT class, or fused class, is exactly `cls`."""
    for kind in _KINDS.values():
        if kind._fused is cls:
            return kind
    for kind in _KINDS.values():
        try:
            if kind.peft_class() is cls:
                return kind
        except ImportError:  # a kind for an optional package (e.g. bitsandbytes) that is not installed
            continue
    return None


def fused_class_named(name: str) -> type | None:
    kind = next((k for k in _KINDS.values() if k.fused_name == name), None)
    try:
        return kind.fused_class() if kind is not None else None
    except ImportError:  # a kind for an optional package that is not installed
        return None


def _make_fused(kind: LayerKind) -> type:
    base = kind.peft_class()

    def forward(self, x, *args, **kwargs):
        served = kind.dispatch(self, x, args, kwargs)
        if served is None:
            return base.forward(self, x, *args, **kwargs)
        path, adapter = served
        return path.forward(self, adapter, x, *args, **kwargs)

    doc = f"PEFT's {kind.name}, running fused_lora's path whenever it can serve the call."
    cls = type(base.__name__, (base,), {"forward": forward, "__doc__": doc})
    # named as PEFT's class (its repr and its messages, "lora.Linear(...)", "lora.MultiheadAttention does not
    # support ...", read type(self).__name__), found by pickle under its own qualified name in peft_patch
    cls.__module__, cls.__qualname__ = PATCH_MODULE, kind.fused_name
    return cls


# ---------------------------------------------------------------- checks shared by the kinds


def hooked(module: nn.Module) -> bool:
    """Forward hooks (e.g. accelerate's offloading) that a fused path, reading the weight directly, would skip."""
    return bool(module._forward_pre_hooks or module._forward_hooks or hasattr(module, "_hf_hook"))


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with W stored [in, out])."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def is_plain_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is nn.Linear's (e.g. MultiheadAttention's out_proj subclass)."""
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def variant_name(layer, adapter: str) -> str | None:
    """The class name of the adapter's LoRA variant ("DoraLinearVariant", "MiCALinearVariant", ...) or None."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None and getattr(layer, "use_dora", {}).get(adapter):
        return "DoraLinearVariant"
    return type(variant).__name__ if variant is not None else None


def variant_reason(layer, adapter: str) -> str | None:
    """A LoRA variant (DoRA, aLoRA, ...) on this adapter: plain LoRA paths do not run it."""
    name = variant_name(layer, adapter)
    if name is None:
        return None
    return "DoRA / LoRA variant" if name.startswith("Dora") else f"LoRA variant ({name.removesuffix('LinearVariant')})"


def is_variant(*names: str):
    """An AdapterPath reason: None for adapters whose variant is one of `names` (class names), else why not."""

    def reason(layer, adapter: str) -> str | None:
        name = variant_name(layer, adapter)
        return None if name in names else f"not a {' / '.join(names)} adapter"

    return reason


def kernels_refuse(device: torch.device, dtype: torch.dtype) -> bool:
    """The call would reach the Triton kernels with a dtype they do not take (float64): PEFT's forward
    serves it instead (the reference backend takes float64)."""
    return dtype not in KERNEL_DTYPES and resolve_backend(device) == "triton"


def linear_dtypes_ok(x: torch.Tensor, w_dtype: torch.dtype, a_dtype: torch.dtype) -> bool:
    """x, the base weight and the adapters in dtypes lora_linear computes in: autocast's (which leaves float64
    as it is), else the tensors' own; adapters in the activation dtype or fp32; a dtype the kernels take."""
    dev = x.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    cast = lambda dtype: torch.get_autocast_dtype(dev) if autocast and dtype != torch.float64 else dtype
    act = cast(x.dtype)
    return act == cast(w_dtype) and a_dtype in (act, torch.float32) and not kernels_refuse(x.device, act)


def dropout_p(dropout: nn.Module) -> float:
    return dropout.p if isinstance(dropout, nn.Dropout) else 0.0
