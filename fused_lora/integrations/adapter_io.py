"""PEFT's adapter files, read and written from plain models with fused_lora's LoRA layers.

    save_adapter(model, "out/")   # adapter_config.json + adapter_model.safetensors, PEFT's key names
    load_adapter(model, "out/")   # injects LoRA layers where the file has adapters (if not yet), then loads

Keys are PEFT's, as ``PeftModel.save_pretrained`` writes them, so an adapter saved here loads with
``PeftModel.from_pretrained`` on the same base model and gives the same outputs, and the reverse:

    LoRALinear        base_model.model.<name>.lora_A.weight [r, in]          .lora_B.weight [out, r]
      with use_dora   base_model.model.<name>.lora_magnitude_vector [out]    (config: use_dora true)
    Embedding         base_model.model.<name>.lora_embedding_A [r, V]        .lora_embedding_B [D, r]
    Conv1d/2d/3d      base_model.model.<name>.lora_A.weight [r', in, k, …]   .lora_B.weight [out, r', 1, …]

Embeddings' factors are PEFT's as they are. Convolutions are converted exactly between loralib's
factorisation and PEFT's (``peft_conv``): PEFT's rank r' is ours, or r·k² when our B no longer has the
form a PEFT adapter loads into; each direction reproduces the other's delta, and a file written here
loads back with the rank it was saved from. Only convolutions PEFT adapts the same way are converted:
groups = 1, dilation 1, padding_mode "zeros" (PEFT's lora_A convolution ignores the others); anything
else is a ValueError. Per-module ranks and alphas go through ``rank_pattern`` / ``alpha_pattern``, alphas
converted so that every module keeps its scaling under the config's one ``use_rslora``; each key names one
module (``^`` + its escaped name: see ``adapter_config``; PEFT ≥ 0.15 reads it), and ``target_modules``
selects exactly the adapted modules under PEFT's rules (leaf names, else full names, else one regular
expression).

Loading: the config is checked (``adapter_config``: anything with which PEFT would compute something
else is refused), then every tensor, name, shape, rank and module, then every new layer is built, and only
then does the model change — and should that still fail, it is put back as it was. New layers' adapters
take the dtype ``inject_lora`` gives them (fp32 on a 16-bit weight, else the weight's: as PEFT's
``from_pretrained`` does), whatever the file's; a LoRA layer already there keeps its own.

Wrappers: a DDP- or torch.compile-wrapped model is unwrapped (``module.`` and ``_orig_mod.`` are no part
of the names, also for a compiled block inside the model; see ``module_tree``). Distributed: only rank 0
writes files (calling ``save_adapter`` on every rank or on rank 0 alone both work). Under FSDP2 the
adapters are gathered, so ``save_adapter`` is a collective there: every rank calls it, rank 0 writes, and
every rank returns once the files exist. ``load_adapter`` reads the files on every rank and copies each
rank's block into the sharded adapters (inject LoRA before ``fully_shard``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn as nn

from ..conv import _ConvLoRA, check_kernel_size
from ..distributed import barrier, copy_full_into, full, is_sharded, is_writer, reshard_all
from ..embedding import Embedding
from ..merged import MergedLinear
from .adapter_config import CONFIG_NAME, AdapterConfig, pattern_key, read_config
from .inject import LORA_LAYERS, check_target, lora_layers, mark_only_lora_as_trainable, wrap_module
from .module_tree import all_or_nothing, get_module, named_modules, unwrap
from .peft_conv import conv_from_peft, conv_to_peft

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(rf"{re.escape(PREFIX)}(.+)\.(?:lora_([AB])\.weight|lora_embedding_([AB]))")
_MAGNITUDE = re.compile(rf"{re.escape(PREFIX)}(.+)\.lora_magnitude_vector")  # DoRA's m, PEFT's key


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def rescale_alpha(alpha: float, r_from: int, rslora_from: bool, r_to: int, rslora_to: bool):
    """The lora_alpha that gives rank `r_to` (scaling alpha/r, or alpha/√r with rsLoRA) the scaling that
    `alpha` gives rank `r_from`; exact when the ranks' ratio allows it (e.g. k² for a convolution)."""
    if rslora_from == rslora_to:
        ratio = Fraction(r_to, r_from)
        num, den = ratio.numerator, ratio.denominator
        if rslora_to:
            rn, rd = math.isqrt(num), math.isqrt(den)
            if rn * rn != num or rd * rd != den:
                return alpha * math.sqrt(r_to / r_from)
            num, den = rn, rd
        return _number(alpha * num / den)
    den_from = math.sqrt(r_from) if rslora_from else r_from
    return alpha / den_from * (math.sqrt(r_to) if rslora_to else r_to)


def _check_conv(name: str, conv: nn.Module) -> int:
    """The kernel size of a convolution PEFT adapts as we do (see the module docstring)."""
    k = check_kernel_size(conv.kernel_size, conv.weight.dim() - 2, f"{name}: kernel_size")
    bad = {"groups": conv.groups != 1, "dilation": any(d != 1 for d in conv.dilation),
           "padding_mode": conv.padding_mode != "zeros"}  # fmt: skip
    if any(bad.values()):
        what = ", ".join(f"{key}={getattr(conv, key)!r}" for key, b in bad.items() if b)
        raise ValueError(
            f"{name}: PEFT's LoRA convolution cannot express this layer's delta ({what}: PEFT adapts only "
            f"groups=1, dilation 1, padding_mode 'zeros' the same way)"
        )
    return k


def _export(name: str, layer: nn.Module) -> tuple[int, dict[str, torch.Tensor], float | None]:
    """(PEFT rank, {key suffix: tensor}, dropout or None) for one of our layers. Under FSDP2 the adapters
    are gathered (a collective: every rank exports every layer, in the same order)."""
    a, b = full(layer.lora_A.detach()), full(layer.lora_B.detach())
    if isinstance(layer, Embedding):
        return layer.r, {"lora_embedding_A": a, "lora_embedding_B": b}, None
    if isinstance(layer, _ConvLoRA):
        conv = layer.conv
        k = _check_conv(name, conv)
        a_p, b_p = conv_to_peft(a, b, conv.out_channels, k)
        ones = (1,) * (conv.weight.dim() - 2)
        a_p = a_p.reshape(a_p.shape[0], conv.in_channels, *conv.kernel_size)
        tensors = {"lora_A.weight": a_p, "lora_B.weight": b_p.reshape(*b_p.shape, *ones)}
        return a_p.shape[0], tensors, layer.lora_dropout_p
    if isinstance(layer, MergedLinear):  # PEFT's rank r·g adapter with the block-structured B
        return a.shape[0], {"lora_A.weight": a, "lora_B.weight": layer.block_b(b)}, layer.lora_dropout_p
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if getattr(layer, "use_dora", False):  # PEFT's key for DoRA's magnitude (no ".weight")
        tensors["lora_magnitude_vector"] = full(layer.lora_magnitude.detach())
    return layer.r, tensors, layer.lora_dropout_p


def _adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers that hold adapters (not r = 0, nor a MergedLinear with no group enabled:
    loralib's plain layers, which have nothing to save or load)."""
    return {n: m for n, m in lora_layers(model) if m._has_lora()}


def _base_names(model: nn.Module) -> list[str]:
    """The module names of the plain model PEFT would load the file into: ours, less what lives inside
    our LoRA layers (a convolution's ``.conv``, a dropout)."""
    named = list(named_modules(model))
    inside = tuple(n + "." for n, m in named if isinstance(m, LORA_LAYERS))
    return [n for n, _ in named if n and not n.startswith(inside)]


def _peft_selects(targets, names: list[str]) -> set[str]:
    """The names PEFT's target_modules rule selects: a string is matched whole as a regular expression, a
    list entry matches a name equal to it or ending in "." + it."""
    if isinstance(targets, str):
        return {n for n in names if re.fullmatch(targets, n)}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in targets)}


def _target_modules(base: list[str], names: list[str]) -> list[str] | str:
    """target_modules that make PEFT adapt exactly `names`: their leaf names (["q_proj", "v_proj"]) when
    those select no other module, else the full names, else (a name that ends another one, as "fc" and
    "head.fc", or "0" and "1.0") one regular expression of the escaped full names."""
    wanted = set(names)
    leaves = sorted({n.split(".")[-1] for n in names})
    if _peft_selects(leaves, base) == wanted:
        return leaves
    if _peft_selects(sorted(names), base) == wanted:
        return sorted(names)
    return "|".join(re.escape(n) for n in sorted(names))


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's LoRA layers (LoRALinear, MergedLinear, Embedding, Conv1d/2d/3d) as a PEFT LoRA
    adapter; returns the directory. Checked before anything is written. `model` may be wrapped by DDP or
    torch.compile: the names are the plain model's.

    Collective under FSDP2 (every rank calls; rank 0 writes); elsewhere only rank 0 writes."""
    from safetensors.torch import save_file

    model = unwrap(model)
    layers = _adapted_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRALinear, Embedding or Conv1d/2d/3d layers with adapters (r > 0) to save "
            "(inject_lora first)"
        )
    dora = {n for n, m in layers.items() if getattr(m, "use_dora", False)}
    if dora and dora != set(layers):
        raise ValueError(
            f"save_adapter: PEFT's adapter config has one use_dora for every layer, and this model mixes DoRA "
            f"layers ({sorted(dora)[:4]}) with plain LoRA ones ({sorted(set(layers) - dora)[:4]})"
        )
    sharded = is_sharded(model)
    reshard_all(model)
    exported = {n: _export(n, m) for n, m in layers.items()}  # the same order on every rank
    rslora = _most_common(m.use_rslora for m in layers.values())
    ranks = {n: e[0] for n, e in exported.items()}
    alphas = {n: rescale_alpha(m.lora_alpha, m.r, m.use_rslora, ranks[n], rslora) for n, m in layers.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    dropouts = [e[2] for e in exported.values() if e[2] is not None]
    base = _base_names(model)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common(dropouts) if dropouts else 0.0,
        "target_modules": _target_modules(base, list(layers)),
        "rank_pattern": {pattern_key(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {pattern_key(n): v for n, v in alphas.items() if v != alpha},
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": bool(dora),
        "inference_mode": True,
    }
    tensors = {}
    for name, (_, parts, _) in exported.items():
        for suffix, t in parts.items():
            tensors[f"{PREFIX}{name}.{suffix}"] = t.contiguous().cpu()
    out = Path(directory)
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if sharded:
        barrier()
    return out


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {directory} (adapter_model.bin is not read: re-save it with safetensors)"
        )
    return load_file(str(path))


def _magnitudes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module name: DoRA magnitude m} from the file, taken out of `state`."""
    found = {}
    for key in list(state):
        m = _MAGNITUDE.fullmatch(key)
        if m is not None:
            found[m.group(1)] = state.pop(key)
    return found


def _adapter_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[bool, torch.Tensor, torch.Tensor]]:
    """{module name: (is an embedding's, A, B)} from PEFT's keys; anything else in the file is an error."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in state.items():
        m = _KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
        else:
            kind = "E" if m.group(3) else ""
            pairs.setdefault(m.group(1), {})[kind + (m.group(2) or m.group(3))] = t
    if unknown:
        raise ValueError(
            f"the adapter file has entries fused_lora's layers cannot hold (modules_to_save, biases, whole "
            f"embedding layers, trainable tokens, another PEFT method's?): {unknown[:8]}"
        )
    broken = [n for n, p in pairs.items() if set(p) not in ({"A", "B"}, {"EA", "EB"})]
    if broken:
        raise ValueError(f"the adapter file lacks lora_A or lora_B (or mixes them with lora_embedding_*) for {broken}")
    not_float = [f"{n} ({t.dtype})" for n, p in pairs.items() for t in p.values() if not t.is_floating_point()]
    if not_float:
        raise ValueError(f"the adapter file's tensors must be floating point: {not_float[:8]}")
    empty = [n for n, p in pairs.items() if min(p.get("A", p.get("EA")).shape[:1], default=0) < 1]
    if empty:
        raise ValueError(f"the adapter file has adapters of rank 0 for {empty[:8]}")
    return {n: ("EA" in p, p.get("A", p.get("EA")), p.get("B", p.get("EB"))) for n, p in pairs.items()}


def _import(name: str, module: nn.Module, embedding: bool, a: torch.Tensor, b: torch.Tensor):
    """(A, B, our rank) for `module` (one of our layers, or the layer it would wrap) from PEFT's factors,
    checked against its shapes."""
    base = module.conv if isinstance(module, _ConvLoRA) else module
    if isinstance(base, nn.Embedding) != embedding:
        kinds = ("lora_embedding_A/B", "lora_A/B.weight")
        raise ValueError(f"{name}: the file holds {kinds[not embedding]} for a {type(base).__name__}")
    r = a.shape[0]
    if isinstance(base, nn.Embedding):
        want = ((r, base.num_embeddings), (base.embedding_dim, r))
    elif isinstance(base, nn.Linear):
        want = ((r, base.in_features), (base.out_features, r))
    else:
        k, ones = _check_conv(name, base), (1,) * (base.weight.dim() - 2)
        want = ((r, base.in_channels, *base.kernel_size), (base.out_channels, r, *ones))
    if (tuple(a.shape), tuple(b.shape)) != want:
        raise ValueError(
            f"{name}: adapter shapes A {list(a.shape)}, B {list(b.shape)} do not fit a {type(base).__name__} "
            f"with these weights (expected A {list(want[0])}, B {list(want[1])})"
        )
    if isinstance(module, MergedLinear):
        return a, module.split_block_b(b), module.r
    if isinstance(base, (nn.Embedding, nn.Linear)):
        return a, b, r
    a2, b2 = conv_from_peft(a.reshape(r, -1), b.reshape(b.shape[0], r), k)
    return a2, b2, a2.shape[0] // k


def _check_model(model: nn.Module, names: list[str], existing: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """{name: module the file's adapter goes into}: the model's LoRA layers if it has any (then exactly the
    file's), else its plain layers of those names (each one a layer LoRA can wrap)."""
    if existing:
        missing = [n for n in names if n not in existing]
        extra = [n for n in existing if n not in names]
        if missing or extra:
            raise ValueError(
                f"the model's LoRA layers do not match the adapter: not in the model "
                f"{missing[:8]}, not in the file {extra[:8]}"
            )
        return {n: existing[n] for n in names}
    named = dict(named_modules(model))
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"the adapter file names modules the model does not have: {missing[:8]}")
    for n in names:
        check_target(n, named[n], "is named by the adapter file")
    return {n: named[n] for n in names}


def _checked_ranks(config: AdapterConfig, adapters: dict, loaded: dict, existing: dict) -> None:
    for n, (_, a, _) in adapters.items():
        if config.rank(n) != a.shape[0]:
            raise ValueError(
                f"{n}: the file's adapter has rank {a.shape[0]}, its config gives this module r={config.rank(n)} "
                "(r / rank_pattern): PEFT refuses such a file, and the scaling it means is not clear"
            )
        if existing and existing[n].r != loaded[n][2]:
            raise ValueError(f"{n}: the file's adapter has rank {loaded[n][2]} here, the layer r={existing[n].r}")


def _keep(change, layer: nn.Module) -> None:
    """Register the undo of load_adapter's change to a LoRA layer that was already there."""
    alpha, rslora, merged = layer.lora_alpha, layer.use_rslora, layer.merged
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    m = layer.lora_magnitude.detach().clone() if getattr(layer, "use_dora", False) else None

    def undo():
        if layer.merged:
            layer.unmerge()
        layer.lora_alpha, layer.use_rslora = alpha, rslora
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if m is not None:
                layer.lora_magnitude.copy_(m)
        if merged:
            layer.merge()

    change.on_undo(undo)


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT LoRA adapter into a plain model: the named layers (nn.Linear, nn.Embedding,
    nn.Conv1d/2d/3d) become fused_lora's LoRA layers (unless they already are, with matching ranks) and
    get the file's adapters and scaling (lora_alpha, alpha_pattern, use_rslora) — also layers that were
    LoRA layers already, so the model computes what PEFT computes with this file. New layers take the
    file's lora_dropout, and the adapter dtype ``inject_lora`` gives (fp32 on a 16-bit weight, else the
    weight's); layers that were LoRA layers keep their own dropout (a training setting, per layer, that the
    file's single value cannot express) and dtype. `model` may be wrapped by DDP or torch.compile.
    Returns the module names.

    Everything is checked before anything changes, and anything that still fails puts the model back as it
    was: a wrong file leaves the model as it was (modules, parameters, requires_grad flags, merges)."""
    model = unwrap(model)
    directory = Path(directory)
    config = read_config(directory / CONFIG_NAME)
    state = _read_weights(directory)
    magnitudes = _magnitudes(state)
    adapters = _adapter_modules(state)
    existing = _adapted_layers(model)
    names = sorted(adapters)
    modules = _check_model(model, names, existing)
    loaded = {n: _import(n, modules[n], *adapters[n]) for n in names}
    _checked_ranks(config, adapters, loaded, existing)
    _check_dora(config, names, modules, adapters, magnitudes, existing)
    rslora = config.use_rslora
    alphas = {}  # each module's lora_alpha at our rank: the file's scaling, whatever the rank conversion
    for n in names:
        r_file = adapters[n][1].shape[0]  # PEFT's rank for this module
        alphas[n] = rescale_alpha(config.alpha(n), r_file, rslora, loaded[n][2], rslora)

    with all_or_nothing(model) as change:
        if not existing:
            new = {
                n: wrap_module(modules[n], loaded[n][2], alphas[n], config.lora_dropout, use_rslora=rslora,
                               merge_weights=False, use_dora=config.use_dora)
                for n in names
            }  # fmt: skip
            for n, layer in new.items():
                change.replace(n, layer)
            mark_only_lora_as_trainable(model)
        for n in names:
            layer = get_module(model, n)
            if existing:
                _keep(change, layer)
            a, b, _ = loaded[n]
            was_merged = layer.merged
            layer.unmerge()  # W's merge follows the adapters it holds, at the file's scaling
            layer.lora_alpha, layer.use_rslora = alphas[n], rslora  # the file's scaling: what y depends on
            copy_full_into(layer.lora_A, a)
            copy_full_into(layer.lora_B, b)
            if config.use_dora:
                copy_full_into(layer.lora_magnitude, magnitudes[n])
            if was_merged:
                layer.merge()
    return names


def _check_dora(config, names, modules, adapters, magnitudes, existing) -> None:
    """A DoRA file (use_dora, a lora_magnitude_vector per module) loads into DoRA LoRALinear layers only, and
    a plain file into plain ones; every magnitude [out_features], floating point."""
    extra = sorted(set(magnitudes) - set(names))
    if extra:
        raise ValueError(f"the adapter file has lora_magnitude_vector entries for modules without adapters: {extra[:8]}")
    if not config.use_dora:
        if magnitudes:
            raise ValueError(f"the adapter file has DoRA magnitudes ({sorted(magnitudes)[:4]}) but use_dora is false")
        dora = sorted(n for n in existing if getattr(existing[n], "use_dora", False))
        if dora:
            raise ValueError(f"the file is a plain LoRA adapter, the model's layers {dora[:4]} are DoRA layers")
        return
    for n in names:
        base = modules[n].conv if isinstance(modules[n], _ConvLoRA) else modules[n]
        if adapters[n][0] or not isinstance(base, nn.Linear) or isinstance(modules[n], MergedLinear):
            raise ValueError(f"{n}: DoRA (use_dora) loads into nn.Linear / LoRALinear layers only, not {type(base).__name__}")
        if existing and not existing[n].use_dora:
            raise ValueError(f"{n}: the file is a DoRA adapter, this LoRALinear has use_dora=False")
        m = magnitudes.get(n)
        if m is None:
            raise ValueError(f"{n}: the file is a DoRA adapter (use_dora) but has no lora_magnitude_vector for it")
        if tuple(m.shape) != (base.out_features,) or not m.is_floating_point():
            raise ValueError(
                f"{n}: lora_magnitude_vector {m.dtype} {list(m.shape)} must be floating point [out_features] = "
                f"[{base.out_features}]"
            )
