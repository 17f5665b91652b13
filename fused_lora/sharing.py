"""Who else holds a LoRA layer's base weight W: what keeps a layer from merging ΔW into a weight that
another module shares (tied weights — an input embedding that is also the output head, as in GPT-2,
Llama-3.2-1B or Gemma: ``head.weight is embed.weight``), where the merge would change that module's
output too.

A layer cannot see the model it sits in, so the holders of each LoRA weight (the Parameter object; a tie
is one Parameter held by two modules, as torch and transformers make it) are kept here, for every
parameter once it is accounted for:

- a layer's constructor makes a fresh W that nothing else holds (:func:`adopt`);
- ``from_linear`` / ``from_embedding`` / ``from_conv`` look, once, for the modules that hold the weight
  they wrap (:func:`wrapping`); the nn.Linear / nn.Embedding being wrapped is taken as replaced by the
  new layer and not counted while that layer lives (an ``nn.ConvNd`` becomes the layer's ``conv`` and so
  its owner);
- a module that takes a watched weight later (``other.weight = layer.weight``) is seen by a
  parameter-registration hook (torch's global ``register_module_parameter_registration_hook``);
- a layer whose W is a Parameter not accounted for (``layer.weight = other.weight``, a deep copy,
  unpickling, ``load_state_dict(assign=True)``, FSDP2's sharded parameters) looks at its next merge
  (:func:`other_holders`).

Looking is cheap in the usual case: when Python's reference count says that only the owner's parameter
dict refers to W, no other module can hold it. Otherwise it walks every object the garbage collector
tracks — measured 0.2–0.3 s in a process of 420,000 objects (a 32-layer Llama built from a config,
transformers and peft imported; this project's 2-core machine, loaded) — and records the holders of
every module parameter at once, so one walk serves a whole model.

Not seen: a tie made, after its parameter was accounted for, by writing a module's ``_parameters`` dict
directly (no hook runs), and two different Parameters that share one storage (e.g.
``nn.Parameter(embed.weight.data)``).
"""

from __future__ import annotations

import gc
import sys
import weakref

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

# {parameter: weak references to the modules seen holding it}
_HOLDERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# {module wrapped by from_linear / from_embedding: its LoRA layer}: not counted as a holder of a weight
# while that layer lives and holds it too (a layer built and thrown away — a failed inject_lora — replaces
# nothing)
_REPLACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refcount(module: nn.Module, name: str) -> int:
    """Python's reference count of module._parameters[name] as seen here (the dict's reference, plus
    this call's own): compared with :data:`_BASELINE`, measured by this very function."""
    return sys.getrefcount(module._parameters[name])


def _baseline() -> int:
    probe = nn.Module()
    probe.register_parameter("w", nn.Parameter(torch.empty(0)))
    return _refcount(probe, "w")


_BASELINE = _baseline()


def _holds(module: nn.Module, param: torch.Tensor) -> bool:
    return any(q is param for q in module._parameters.values())


def _record(param: torch.Tensor, modules) -> None:
    refs = _HOLDERS.get(param)
    if refs is None:
        refs = _HOLDERS[param] = []
    known = {id(m) for m in (r() for r in refs) if m is not None}
    refs.extend(weakref.ref(m) for m in modules if id(m) not in known)


def adopt(owner: nn.Module, name: str) -> None:
    """`owner`'s fresh parameter `name` (made by a layer's constructor) is held by `owner` alone."""
    if owner._parameters.get(name) is not None:
        _record(owner._parameters[name], [owner])


def wrapping(module: nn.Module, name: str) -> None:
    """Look for the modules holding `module`'s parameter `name`, which a LoRA layer is about to wrap
    (nothing to do if a walk already recorded them: the hook has kept them since). Call it before binding
    that parameter to a local name: the count of references is read."""
    if module._parameters.get(name) is None:  # nothing to hold (parametrized away, or None)
        return
    if module._parameters[name] in _HOLDERS:
        return
    if _refcount(module, name) > _BASELINE:
        _scan([module._parameters[name]])
    else:
        _record(module._parameters[name], [module])


def replace(module: nn.Module, layer: nn.Module) -> None:
    """`module` (wrapped by from_linear / from_embedding) is replaced by `layer`, which took its weight
    over: while `layer` lives and holds that weight too, `module` is not counted as its holder."""
    _REPLACED[module] = weakref.ref(layer)


def _replaced(module: nn.Module, param: torch.Tensor) -> bool:
    ref = _REPLACED.get(module)
    layer = ref() if ref is not None else None
    return layer is not None and _holds(layer, param)


def other_holders(owner: nn.Module, name: str) -> list[nn.Module]:
    """The modules other than `owner` that hold `owner`'s parameter `name` (empty: not shared). A
    parameter not seen before is looked for first (see the module docstring)."""
    if owner._parameters.get(name) is None:  # nothing to hold (parametrized away, or None)
        return []
    if owner._parameters[name] not in _HOLDERS:
        if _refcount(owner, name) > _BASELINE:
            _scan([owner._parameters[name]])
        else:
            adopt(owner, name)
    param = owner._parameters[name]
    alive = (r() for r in _HOLDERS[param])
    return [m for m in alive if m is not None and m is not owner and _holds(m, param) and not _replaced(m, param)]


def _scan(targets: list[torch.Tensor]) -> None:
    """One walk over the objects the garbage collector tracks: record the holders of every parameter any
    module holds (the targets among them), so that a walk serves every wrap and merge after it — the hook
    keeps the account from then on. (inject_lora holds references to the parameters it may restore, so
    each of its wraps would otherwise walk again.)"""
    # type(), not isinstance: no __class__ lookups on proxies (a deprecated alias may warn on access)
    modules = [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]
    holders: dict[int, tuple[torch.Tensor, list[nn.Module]]] = {id(t): (t, []) for t in targets}
    for m in modules:
        params = m.__dict__.get("_parameters")
        for q in params.values() if isinstance(params, dict) else ():
            if q is not None:
                holders.setdefault(id(q), (q, []))[1].append(m)
    for param, mods in holders.values():
        _record(param, mods)


def _on_register(module: nn.Module, name: str, param) -> None:
    """The global parameter-registration hook: a module taking a watched W becomes one of its holders."""
    if param is not None and param in _HOLDERS:
        _record(param, [module])


nn.modules.module.register_module_parameter_registration_hook(_on_register)


def describe(modules: list[nn.Module], limit: int = 3) -> str:
    """A short listing of modules for a message: their class and settings."""
    shown = []
    for m in modules[:limit]:
        extra = m.extra_repr()
        shown.append(f"{type(m).__name__}({extra})" if len(extra) <= 80 else type(m).__name__)
    more = f" and {len(modules) - limit} more" if len(modules) > limit else ""
    return ", ".join(shown) + more
