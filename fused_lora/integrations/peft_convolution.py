"""PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` on :func:`fused_lora.conv_function.lora_conv`.

PEFT's lora_A is a convolution with the base's kernel size, stride and padding ([r, C, *k], dilation 1,
no groups) and lora_B a 1×1 convolution ([N, r, 1, …]); lora_B(lora_A(x)) is conv(x, B·A) with
B·A [N, C, *k] — W's shape — so without dropout the layer is one convolution with W + s·B·A (one addmm),
and its backward takes the adapters' gradients without a weight-sized gradient (see conv_function). In
training with p > 0 the low-rank path runs on the dropped input as PEFT's does (same mask for the same
generator state). ``lora_bias``: lora_B's bias, times s, is folded into the convolution's bias. DoRA:
(m/n) per output channel around that convolution, n from the factored norm (fused_lora.dora); with
dropout in training under ``dora_formula`` "peft" the call goes to PEFT's forward.

**Grouped** bases (groups G > 1): PEFT's lora_A is a dense convolution and lora_B a grouped 1×1
([N, r/G, 1, …]); their delta is dense over the input channels, not W's grouped shape, so there is no
merged convolution: lora_conv's grouped case runs PEFT's factored math with the 1×1, the scale and the add
as one batched GEMM into the base output (see conv_function; the same cost class as PEFT's, one pass less).
DoRA on a grouped base uses PEFT's norm as PEFT defines it there: ‖W + s·L‖ per output channel with
L = (B.view(-1, r)·A.view(r, -1)).reshape(W.shape) (B·A's elements laid into W's shape, not the pair's
dense delta), computed directly (W's size, fp32).

Left on PEFT's forward, with the reason: a dilated base (PEFT's lora_A is not dilated), ``padding_mode``
other than zeros (lora_A pads with zeros), an asymmetric ``padding='same'``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..conv_function import conv_padding, lora_conv
from ..distributed import fsdp_managed
from ..dora import dora_norm, get_dora_formula
from .peft_kinds import AdapterPath, LayerKind, hooked, peft_lora, register_kind, variant_name, variant_reason
from .peft_linear import dropout_reason, lora_bias

_TORCH_CONV = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}


def conv_base_reason(base: nn.Module, conv_cls: type, groups_ok: bool = False) -> str | None:
    """A base convolution that lora_conv can run as the base's own forward would (grouped: if `groups_ok`)."""
    if not isinstance(base, conv_cls) or type(base).forward is not conv_cls.forward:
        return f"custom convolution base layer ({type(base).__name__})"
    if not base.weight.is_floating_point():
        return f"quantized convolution base layer ({base.weight.dtype})"
    if hooked(base):
        return "base layer has forward hooks (e.g. accelerate offloading)"
    if base.groups != 1 and not groups_ok:
        return "grouped convolution (groups > 1): the adapter's delta is not of W's grouped shape"
    if base.padding_mode != "zeros":
        return f"padding_mode={base.padding_mode!r} (the low-rank path pads with zeros)"
    try:
        conv_padding(base.padding, base.kernel_size, base.stride, base.dilation)
    except ValueError as e:
        return str(e)
    return None


def _base_reason(layer) -> str | None:
    base = layer.get_base_layer()
    why = conv_base_reason(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)[layer._kernel_dim - 3], groups_ok=True)
    if why is None and any(d != 1 for d in base.dilation):
        return "dilated convolution (PEFT's lora_A is not dilated)"
    return why


def _ones(n: int) -> tuple[int, ...]:
    return (1,) * n


def _reason(layer, adapter: str) -> str | None:
    why = variant_reason(layer, adapter) or dropout_reason(layer, adapter)
    return why if why is not None else _pair_reason(layer, adapter)


def _pair_reason(layer, adapter: str) -> str | None:
    base, a, b = layer.get_base_layer(), layer.lora_A[adapter], layer.lora_B[adapter]
    d = base.weight.dim() - 2
    same = (a.kernel_size, a.stride, a.padding) == (base.kernel_size, base.stride, base.padding)
    plain_a = a.dilation == _ones(d) and a.groups == 1 and a.padding_mode == "zeros" and a.bias is None
    one_b = (b.kernel_size, b.stride, b.dilation, b.groups) == (_ones(d), _ones(d), _ones(d), base.groups)
    if not (type(a) is type(b) is type(base) and same and plain_a and one_b and b.padding in ((0,) * d, "valid")):
        return "lora_A / lora_B are not the convolution pair PEFT builds"
    return None


def _servable(layer, adapter: str, x: torch.Tensor) -> bool:
    w, a, b = layer.get_base_layer().weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dev = x.device.type
    autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
    return x.dim() == w.dim() and a.dtype == b.dtype and (autocast or x.dtype == w.dtype)


def _forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    base, dropout, scaling = layer.get_base_layer(), layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    B = B.view(B.shape[0], B.shape[1])  # [N, r/G, 1, …] -> [N, r/G]
    bias = lora_bias(layer, adapter, base.bias, scaling)
    return lora_conv(
        x, base.weight, A, B, scaling, bias, p, dropout.training,
        stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups,
    )  # fmt: skip


def _dora_reason(layer, adapter: str) -> str | None:
    if variant_name(layer, adapter) not in ("DoraConv1dVariant", "DoraConv2dVariant", "DoraConv3dVariant"):
        return "not a DoRA adapter"
    if getattr(layer.lora_B[adapter], "bias", None) is not None:
        return "DoRA with lora_bias"
    return dropout_reason(layer, adapter) or _pair_reason(layer, adapter)


def _dora_servable(layer, adapter: str, x: torch.Tensor) -> bool:
    """As LoRA's; PEFT's own dropout formula (dora_formula 'peft', p > 0 in training) runs PEFT's forward."""
    dropout = layer.lora_dropout[adapter]
    peft_dropout = get_dora_formula() == "peft" and isinstance(dropout, nn.Dropout) and dropout.p > 0 and layer.training
    m = layer.lora_magnitude_vector[adapter].weight
    return _servable(layer, adapter, x) and not peft_dropout and m.is_floating_point()


def grouped_dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's DoRA norm on a grouped convolution (detached, [N], fp32 or float64): ‖W_j + s·L_j‖ over (C/G, *k)
    with L = (B.view(-1, r)·A.view(r, -1)).reshape(W.shape); W [N, C/G, *k], A [r, C, *k], B [N, r/G]."""
    with torch.no_grad():
        acc = torch.promote_types(weight.dtype, torch.float32)
        r = A.shape[0]
        low = B.reshape(-1, r).to(acc) @ A.reshape(r, -1).to(acc)  # [N/G, C·k^d]: W's element count
        full = torch.add(weight.to(acc), low.reshape(weight.shape), alpha=scaling)
        return full.flatten(1).norm(dim=1)


def _dora_forward(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA convolution: y = (m/n) ⊙ conv(x, W + s·B·A) + bias per output channel (with dropout,
    the low-rank pair on the dropped input: the 'fused' formula), n_j = ‖W_j + s·(B·A)_j‖ over (C, *k)."""
    base, dropout, scaling = layer.get_base_layer(), layer.lora_dropout[adapter], layer.scaling[adapter]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    B = B.view(B.shape[0], B.shape[1])
    w = base.weight
    if base.groups == 1:
        n = dora_norm(w.view(w.shape[0], -1), A.reshape(A.shape[0], -1), B, scaling, cache=not fsdp_managed(base))
    else:
        n = grouped_dora_norm(w, A, B, scaling)
    m = layer.lora_magnitude_vector[adapter].weight.reshape(-1)  # PEFT's is [1, N, 1, …]
    z = lora_conv(x, w, A, B, scaling, None, p, dropout.training, stride=base.stride, padding=base.padding,
                  dilation=base.dilation, groups=base.groups)  # fmt: skip
    shape = (1, -1) + (1,) * (z.dim() - 2)
    dt = torch.promote_types(z.dtype, m.dtype)
    c = (m / n.to(m.dtype)).to(dt).view(shape)
    y = z * c if base.bias is None else torch.addcmul(base.bias.to(dt).view(shape), z, c)
    return y.to(z.dtype)


CONVS = [
    register_kind(
        LayerKind(
            name=f"lora.{name}",
            peft_class=lambda name=name: getattr(peft_lora(), name),
            fused_name=f"FusedLora{name}",
            base_reason=_base_reason,
            paths=[AdapterPath("LoRA", _reason, _forward, _servable),
                   AdapterPath("DoRA", _dora_reason, _dora_forward, _dora_servable)],  # fmt: skip
        )
    )
    for name in _TORCH_CONV
]
