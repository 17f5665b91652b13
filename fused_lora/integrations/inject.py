"""LoRA for any ``nn.Module``, the loralib way: swap matching ``nn.Linear`` layers for ``LoRALinear``,
``nn.Embedding`` for ``fused_lora.Embedding`` and ``nn.Conv1d/2d/3d`` for ``fused_lora.Conv1d/2d/3d``.

    report = inject_lora(model, ["q_proj", "v_proj"], r=16, lora_alpha=32, lora_dropout=0.05)
    mark_only_lora_as_trainable(model)        # loralib's helper (inject_lora already did this)
    torch.save(lora_state_dict(model), path)  # loralib's helper: only the adapters
    merge_lora(model); unmerge_lora(model)    # every LoRA layer, exact round trip

Defaults follow PEFT's ``LoraConfig`` (r = 8, lora_alpha = 8, no dropout), not loralib's ``lora.Linear``
(r = 0, lora_alpha = 1): ``inject_lora`` plays the part of ``get_peft_model``. ``merge_weights`` is off
by default (``eval()`` does not merge; :func:`merge_lora` does, on request).

`target_modules` follows PEFT: a string is a regular expression matched against the whole module name;
a list matches names equal to an entry or ending in "." + entry; "all-linear" takes every nn.Linear but
the model's output layer. Embeddings get no dropout (loralib's and PEFT's have none); an embedding or
convolution subclass with its own forward (e.g. a scaled embedding) is refused, since the LoRA layer
would not reproduce it. Names are the plain model's: DDP's and torch.compile's wrappers are looked
through (``module_tree``), so a compiled model takes the same targets, and reports the same names, as the
model it wraps.

Everything is checked, and every LoRA layer built, before the model changes; should anything still fail,
the model is put back as it was (``module_tree.all_or_nothing``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.nn as nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from ..conv import Conv1d, Conv2d, Conv3d, _ConvLoRA
from ..distributed import full, is_dtensor, reshard_all
from ..embedding import Embedding
from ..layer import LoRALinear
from ..qlora import MERGE_4BIT_REFUSED, LoRALinear4bit, is_linear4bit
from ..validation import check_alpha, check_dropout, check_flag, check_rank
from .module_tree import all_or_nothing, get_module, named_modules, unwrap

BIAS_MODES = ("none", "all", "lora_only")
LORA_LAYERS = (LoRALinear, Embedding, _ConvLoRA, LoRALinear4bit)
_CONVS = ((nn.Conv1d, Conv1d), (nn.Conv2d, Conv2d), (nn.Conv3d, Conv3d))
ADAPTABLE = "an nn.Linear, nn.Embedding or nn.Conv1d/2d/3d"


def lora_class(module: nn.Module) -> type | None:
    """The LoRA layer class that can replace `module`, or None. Embedding and convolution subclasses
    qualify only if they keep the base class's forward."""
    if isinstance(module, LORA_LAYERS):
        return None
    if is_linear4bit(module):  # bitsandbytes' Linear4bit (an nn.Linear subclass): QLoRA
        return LoRALinear4bit
    if isinstance(module, nn.Linear):
        return LoRALinear
    if isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward:
        return Embedding
    for base, cls in _CONVS:
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def wrap_module(module: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, use_rslora: bool = False,
                merge_weights: bool = False, lora_dtype=None, use_dora: bool = False) -> nn.Module:  # fmt: skip
    """The LoRA layer for `module`, sharing its weights (see :func:`lora_class`); DoRA for nn.Linear only."""
    cls = lora_class(module)
    common = dict(r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, merge_weights=merge_weights, lora_dtype=lora_dtype)
    if use_dora and cls is not LoRALinear:
        raise TypeError(f"use_dora=True: DoRA is built for nn.Linear targets, not {type(module).__name__}")
    if cls is LoRALinear:
        return LoRALinear.from_linear(module, lora_dropout=lora_dropout, use_dora=use_dora, **common)
    if cls is LoRALinear4bit:
        return LoRALinear4bit.from_linear4bit(module, lora_dropout=lora_dropout, **common)
    if cls is Embedding:
        return Embedding.from_embedding(module, **common)
    if cls is not None:
        return cls.from_conv(module, lora_dropout=lora_dropout, **common)
    raise TypeError(f"{type(module).__name__} is not {ADAPTABLE}")


@dataclass
class InjectReport:
    modules: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        shown = ", ".join(self.modules[:6]) + (f", … ({len(self.modules)} in all)" if len(self.modules) > 6 else "")
        return (
            f"LoRA on {len(self.modules)} modules ({shown}); trainable parameters: "
            f"{self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%)"
        )


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection (excluded by "all-linear", as PEFT does)."""
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in named_modules(model):
        if (head is not None and module is head) or name.split(".")[-1] in ("lm_head", "score", "classifier"):
            out.add(name)
    return out


def check_target(name: str, module: nn.Module, why: str = "") -> None:
    """A ValueError / TypeError, naming `name` (and `why` it is a target), unless a LoRA layer can replace
    `module` as it is."""
    if isinstance(module, LORA_LAYERS):
        raise ValueError(f"{name} is already a {type(module).__name__}: this model has LoRA injected already")
    if lora_class(module) is None:
        own = " with its own forward" if isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) else ""
        raise TypeError(f"{name}{why and f' {why} but'} is a {type(module).__name__}{own}, not {ADAPTABLE}")
    if parametrize.is_parametrized(module):
        raise ValueError(
            f"{name} is parametrized ({', '.join(module.parametrizations)}: weight_norm, orthogonal, ...): its "
            "weight is computed on every call, so a LoRA layer cannot share it; remove the parametrization first "
            "(torch.nn.utils.parametrize.remove_parametrizations)"
        )
    weight = module.weight
    if isinstance(weight, UninitializedParameter):
        raise ValueError(f"{name} ({type(module).__name__}) has uninitialised (lazy) parameters: run a forward first")
    if is_dtensor(weight):
        raise TypeError(
            f"{name}'s weight is a DTensor (sharded, e.g. by fully_shard): add LoRA first (inject_lora / "
            "load_adapter), then shard the model"
        )
    if isinstance(module, nn.Embedding) and module.sparse:
        raise ValueError(f"{name}: an nn.Embedding with sparse=True is not supported (lora_A's gradient is dense)")


def find_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Names of the modules `target_modules` selects (checked, but nothing is changed)."""
    if target_modules is None or (not isinstance(target_modules, str) and not list(target_modules)):
        raise ValueError("target_modules is empty: name modules, suffixes, a regex, or 'all-linear'")
    named = dict(named_modules(model))
    if target_modules == "all-linear":
        heads = _output_layer_names(model)
        chosen = [
            n
            for n, m in named.items()
            if isinstance(m, nn.Linear)
            and not isinstance(m, LoRALinear)
            and n not in heads
            and not n.endswith((".lora_A", ".lora_B"))
        ]
    else:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        chosen = [n for n in named if n and _matches(n, targets)]
        if not isinstance(targets, str):
            missing = [t for t in targets if not any(_matches(n, [t]) for n in named if n)]
            if missing:
                raise ValueError(f"target_modules {missing} match no module; available: {_module_listing(model)}")
    if exclude_modules:
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matches no module; available: {_module_listing(model)}")
    for n in chosen:
        check_target(n, named[n], "matches target_modules")
    return chosen


def _module_listing(model: nn.Module, limit: int = 40) -> str:
    """Distinct leaf-name suffixes of the model's nn.Linear layers, of its other adaptable layers
    (embeddings, convolutions) and of a few other modules."""
    named = [(n.split(".")[-1], m) for n, m in named_modules(model) if n]
    linear = sorted({n for n, m in named if isinstance(m, nn.Linear)})
    other = sorted({n for n, m in named if lora_class(m) is not None} - set(linear))
    rest = sorted({n for n, _ in named} - set(linear) - set(other))
    return f"nn.Linear: {linear[:limit]}; nn.Embedding / nn.ConvNd: {other[:limit]}; other modules: {rest[:limit]}"


def check_lora_settings(r, lora_alpha, lora_dropout, use_rslora) -> None:
    """The settings every new LoRA layer takes, checked before any is built."""
    check_rank(r)
    check_alpha(lora_alpha, r if isinstance(r, int) else 0, check_flag(use_rslora, "use_rslora"))
    check_dropout(lora_dropout)


def inject_lora(
    model: nn.Module,
    target_modules,
    r: int = 8,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    exclude_modules=None,
    merge_weights: bool = False,
    lora_dtype=None,
    use_dora: bool = False,
) -> InjectReport:
    """Replace the selected layers of `model`, in place, by LoRA layers that share their weights (no copy)
    — nn.Linear by LoRALinear, nn.Embedding by Embedding, nn.Conv1d/2d/3d by Conv1d/2d/3d —, freeze
    every parameter that is not an adapter, and report what was done. `model` may be wrapped by DDP or
    torch.compile; names are the plain model's. ``use_dora=True``: DoRA layers (nn.Linear targets only).

    All targets are checked (and their LoRA layers built) before any is replaced: an error leaves the
    model as it was (modules, parameters, requires_grad flags)."""
    model = unwrap(model)
    if any(isinstance(m, LORA_LAYERS) for _, m in named_modules(model)):
        raise ValueError("this model already has LoRA layers (inject_lora was called before)")
    check_lora_settings(r, lora_alpha, lora_dropout, use_rslora)
    use_dora = check_flag(use_dora, "use_dora")
    names = find_targets(model, target_modules, exclude_modules)
    if merge_weights:  # eval() would merge ΔW into weights that other modules hold too
        holders = _holders(model)
        _refuse_shared({n: holders[id(get_module(model, n).weight)] for n in names}, "inject_lora(merge_weights=True)")
    with all_or_nothing(model) as change:
        new = {
            n: wrap_module(get_module(model, n), r, lora_alpha, lora_dropout, use_rslora, merge_weights, lora_dtype,
                           use_dora)  # fmt: skip
            for n in names
        }
        for n, layer in new.items():
            change.replace(n, layer)
        mark_only_lora_as_trainable(model)
    params = list(model.parameters())
    return InjectReport(names, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """loralib's helper: freeze everything but the adapters; bias="all" also trains every bias,
    "lora_only" the biases of LoRA layers that have a ``bias`` attribute (as loralib: a convolution's
    ``conv.bias`` is not one)."""
    _check_bias(bias)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    if bias == "all":
        for n, p in model.named_parameters():
            if "bias" in n:
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LORA_LAYERS) and getattr(m, "bias", None) is not None:
                m.bias.requires_grad = True


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict:
    """loralib's helper: the adapters' entries of model.state_dict() (and biases, per `bias`).

    Under FSDP2 the entries are gathered into whole tensors: a collective (every rank calls it, every rank
    gets the whole adapters; save them from rank 0)."""
    _check_bias(bias)
    reshard_all(model)
    state = model.state_dict()
    if bias == "none":
        out = {k: v for k, v in state.items() if "lora_" in k}
    elif bias == "all":
        out = {k: v for k, v in state.items() if "lora_" in k or "bias" in k}
    else:
        out = {}
        for k, v in state.items():
            if "lora_" in k:
                out[k] = v
                bias_name = k.split("lora_")[0] + "bias"
                if bias_name in state:
                    out[bias_name] = state[bias_name]
    return {k: full(v) for k, v in out.items()}


def lora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(name, layer) for every LoRALinear, Embedding and Conv1d/2d/3d of `model`."""
    return ((n, m) for n, m in named_modules(unwrap(model)) if isinstance(m, LORA_LAYERS))


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """{id of a parameter: the modules holding it directly}, each module once (also one under two names)."""
    out: dict[int, list[str]] = {}
    for name, module in named_modules(model):
        for p in module._parameters.values():
            if p is not None:
                out.setdefault(id(p), []).append(name)
    return out


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """{LoRA layer name: the modules holding its W} for the layers whose W — the weight a merge changes —
    another module of `model` holds too (tied weights: an input embedding and the output head, as in
    GPT-2, Llama-3.2-1B or Gemma). Merging such a W would change the other module's weight as well."""
    holders = _holders(model)
    found = {n: holders[id(layer._base_weight())] for n, layer in lora_layers(model)}
    return {n: h for n, h in found.items() if len(h) > 1}


def _refuse_shared(holders: dict[str, list[str]], what: str) -> None:
    shared = {n: h for n, h in holders.items() if len(h) > 1}
    if shared:
        listing = "; ".join(f"{n}: held by {', '.join(h)}" for n, h in list(shared.items())[:8])
        raise ValueError(
            f"{what}: these layers' weights are shared with other modules (tied weights), and merging ΔW "
            f"into a shared weight changes the other modules too, so the merged model would not compute "
            f"what the unmerged one does ({listing}). Keep them unmerged, or untie the weights first"
        )


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer (W += ΔW, fp32 arithmetic, exact round trip); returns how many. A
    collective under FSDP2 (every rank calls it): each rank merges its block of each weight. A ValueError,
    before anything is merged, if a LoRA layer's weight is shared with another module (tied weights)."""
    _refuse_shared(shared_weights(model), "merge_lora")
    reshard_all(model)
    four_bit = [n for n, m in lora_layers(model) if isinstance(m, LoRALinear4bit) and m._has_lora()]
    if four_bit:  # refused before anything is merged
        raise ValueError(f"merge_lora: {', '.join(four_bit[:4])} are 4-bit (QLoRA) layers; {MERGE_4BIT_REFUSED}")
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Undo :func:`merge_lora` exactly; returns how many layers (a collective under FSDP2, as merging).
    Layers unmerge in the reverse of merge_lora's order, so each record applies to W as its merge left it."""
    reshard_all(model)
    layers = [m for _, m in lora_layers(model)]
    for m in reversed(layers):
        m.unmerge()
    return len(layers)
