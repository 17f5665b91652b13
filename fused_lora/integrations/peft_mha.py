"""PEFT's ``lora.MultiheadAttention``: the merged weights formed functionally, no merge/unmerge per call.

``nn.MultiheadAttention`` reads ``in_proj_weight`` and ``out_proj.weight`` itself (neither is an
``nn.Linear`` call a fused GEMM could replace), so PEFT merges ΔW into both before every forward and
unmerges after: deleting and re-registering the parameters, ΔW computed twice, two weight-sized in-place
updates. The fused path forms W_in + s·B·A and W_out + s·B_o·A_o once (fp32, rounded once to W's dtype)
and runs the attention with them through ``torch.func.functional_call`` — the module's parameters are
never touched, and autograd reaches A and B through the merged weights exactly as through PEFT's. As in
PEFT, lora_dropout is not applied (merged weights take no dropout) and the base weights get no gradient.

PEFT 0.21.2 adds out_proj's ΔW twice in its forward and ``merge()``: its merge writes W_out + ΔW and then
calls out_proj's own merge, which adds ΔW in place again, outside autograd (value W_out + 2·ΔW, gradient
of one ΔW). The fused path reproduces what this PEFT does, found once per process by merging a tiny
layer (under a forked RNG), so patched and unpatched models agree whichever PEFT is installed; a merge
it does not recognise leaves the layers on PEFT's forward, reported.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .peft_kinds import AdapterPath, LayerKind, hooked, is_plain_linear, peft_lora, register_kind, variant_reason


@functools.cache
def out_proj_delta_count() -> int | None:
    """How many times this PEFT's MultiheadAttention merge adds out_proj's ΔW (1 or 2; None: neither)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        layer = peft_lora().MultiheadAttention(
            nn.MultiheadAttention(4, 1), "probe", LoraConfig(r=1, init_lora_weights=False), r=1, lora_alpha=1
        )
        out = layer.get_base_layer().out_proj
        w0, delta = out.get_base_layer().weight.detach().clone(), out.get_delta_weight("probe")
        layer.merge(adapter_names=["probe"])
        merged = out.get_base_layer().weight.detach()
    for k in (1, 2):
        if torch.allclose(merged, w0 + k * delta, rtol=1e-5, atol=1e-6):
            return k
    return None


def merged_weight(weight: torch.Tensor, lora_layer, adapter: str, count: int = 1) -> torch.Tensor:
    """round(W + count·s·B·A) in W's dtype, differentiable in A and B through one ΔW (W detached, as PEFT)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    A, B = lora_layer.lora_A[adapter].weight, lora_layer.lora_B[adapter].weight
    delta = (B.to(acc) @ A.to(acc)) * lora_layer.scaling[adapter]
    w = weight.detach().to(acc) + delta
    if count > 1:
        w = w + (count - 1) * delta.detach()
    return w.to(weight.dtype)


def _base_reason(layer) -> str | None:
    base = layer.get_base_layer()
    if type(base).forward is not nn.MultiheadAttention.forward:
        return f"custom attention base layer ({type(base).__name__})"
    if not base._qkv_same_embed_dim or base.in_proj_weight is None or hooked(base):
        return "attention with separate q/k/v weights or forward hooks"
    out = base.out_proj
    if not isinstance(out, peft_lora().Linear) or not is_plain_linear(out.get_base_layer()):
        return f"out_proj is not PEFT's lora.Linear over an nn.Linear ({type(out).__name__})"
    if out_proj_delta_count() is None:
        return "this PEFT's MultiheadAttention merge is not recognised"
    return None


def _reason(layer, adapter: str) -> str | None:
    return variant_reason(layer, adapter)


def _call_ok(layer, query, args, kwargs) -> bool:
    return "adapter_names" not in kwargs  # PEFT raises its own TypeError


def _servable(layer, adapter: str, query: torch.Tensor) -> bool:
    if not isinstance(query, torch.Tensor):
        return False
    base = layer.get_base_layer()
    out = base.out_proj
    if out.merged or out.disable_adapters or out.active_adapters != layer.active_adapters:
        return False  # PEFT raises on diverging states, or serves them: its forward decides
    if adapter not in out.lora_A or variant_reason(out, adapter) is not None:
        return False
    dev = query.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    return autocast or query.dtype == base.in_proj_weight.dtype


def _forward(layer, adapter: str, query: torch.Tensor, *args, **kwargs):
    base = layer.get_base_layer()
    out = base.out_proj
    weights = {
        "in_proj_weight": merged_weight(base.in_proj_weight, layer, adapter),
        "out_proj.base_layer.weight": merged_weight(out.get_base_layer().weight, out, adapter, out_proj_delta_count()),
    }
    result = torch.func.functional_call(base, weights, (query, *args), kwargs)
    dtype = query.dtype
    return result[0].to(dtype), (result[1].to(dtype) if result[1] is not None else None)


MHA = register_kind(
    LayerKind(
        name="lora.MultiheadAttention",
        peft_class=lambda: peft_lora().MultiheadAttention,
        fused_name="FusedLoraMultiheadAttention",
        base_reason=_base_reason,
        paths=[AdapterPath("LoRA", _reason, _forward, _servable)],
        call_ok=_call_ok,
    )
)
