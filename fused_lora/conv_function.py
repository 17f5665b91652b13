"""``lora_conv``: a convolution with a factored LoRA adapter (PEFT's shapes: lora_A a convolution, lora_B 1×1).

    x [b, C, *S], W [N, C, *k] (groups = 1), bias [N] or None, s = scaling (a float)
    A [r, C, *k] (a convolution kernel with W's kernel size), B [N, r] (a 1×1 convolution)
    ΔW = s·(B·A.view(r, -1)).view(W.shape)         (PEFT's lora_B(lora_A(x)) composes to exactly this)

    no dropout (p = 0, or eval):  y = conv(x, W + ΔW) + bias                        one addmm, one convolution
    training with p > 0:          y = conv(x, W) + bias + s·conv1x1(conv(drop(x), A), B)

**Grouped** (``groups`` = G > 1; PEFT's shapes): W [N, C/G, *k], A [r, C, *k] dense (PEFT's lora_A has no
groups), B [N, r/G] (PEFT's lora_B is a grouped 1×1 convolution): output channel j of group g = j // (N/G)
takes t's channels g·r/G … (g+1)·r/G − 1. The pair's delta is dense over C, not W's grouped shape, so no
merged weight exists; y = conv(x, W, groups=G) + bias + s·B_g·t with t = conv(drop(x), A) [b, r, *S'] —
PEFT's math, with the grouped 1×1, the scale and the add as one batched GEMM into the base output
(``baddbmm``; PEFT writes the 1×1's output, then its scaled copy, then the sum). Autograd takes the gradients.

**Without dropout** W + ΔW is one ``addmm`` (in fp32, or float64 for a float64 W; rounded once to W's dtype)
and torch runs one convolution. The backward never forms a weight-sized gradient (dW' of the merged
convolution would cost as much as the forward convolution itself): dX = conv_input_grad(dY, W + ΔW), then
from t = conv(x, A) [b, r, *S'] (recomputed, r channels) and g = s·Bᵀ·dY [b, r, *S'] (a 1×1 product)

    dB = s·Σ dY·tᵀ,   dA = conv_weight_grad(x, g),   dbias = Σ dY       (dW = conv_weight_grad(x, dY) only if W trains)

the gradients of PEFT's factored pair, at its cost (two r-channel passes over x and dY). The backward is
built from differentiable torch ops, so double backward works. The adapters' products run in their own
dtype (fp32 adapters on a 16-bit model: x and dY are cast, as PEFT casts x for its low-rank path).

**With dropout** in training the low-rank term needs a pass over the dropped input; the cheapest is PEFT's
own pair (an r-channel convolution, then the 1×1), which is what runs: the same math and the same
``torch.nn.functional.dropout`` draw as PEFT's, so the same mask for the same generator state. Under
``torch.autocast`` x, W and bias are cast to the autocast dtype as ``nn.Conv`` is; fp32 adapters stay.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .validation import _shape, _tensor, check_dropout, check_scaling

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value, d: int, name: str) -> tuple[int, ...]:
    values = (value,) * d if isinstance(value, int) else tuple(value)
    if len(values) != d or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{name} must be an int >= 0 or {d} of them, got {value!r}")
    return values


def conv_padding(padding, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]):
    """Numeric padding for 'valid' / 'same' (symmetric 'same' only: stride 1, even dilation·(k-1))."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(s != 1 for s in stride) or any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {kernel} and stride {stride} is not symmetric")
        return tuple(t // 2 for t in total)
    return _tuple(padding, len(kernel), "padding")


def _check(x, weight, lora_A, lora_B, bias, groups: int = 1) -> int:
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _tensor(name, t)
    d = weight.dim() - 2
    if d not in _CONV:
        raise ValueError(f"weight {_shape(weight)} must be [out, in, *kernel] with 1 to 3 kernel dimensions")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups must be an int >= 1 dividing out = {weight.shape[0]}, got {groups!r}")
    C = weight.shape[1] * groups
    if x.dim() != d + 2 or x.shape[1] != C:
        raise ValueError(
            f"x {_shape(x)} must be [batch, {C}, ...] ({d} spatial dims) for weight {_shape(weight)}, groups {groups}"
        )
    N, r = weight.shape[0], lora_A.shape[0]
    if tuple(lora_A.shape) != (r, C, *weight.shape[2:]):
        raise ValueError(
            f"lora_A {_shape(lora_A)} must be [r, {', '.join(map(str, (C, *weight.shape[2:])))}] (a kernel like W's"
            + (", over all C input channels)" if groups > 1 else ")")
        )
    if r % groups:
        raise ValueError(f"lora_A {_shape(lora_A)}: the rank {r} must be a multiple of groups = {groups}")
    if tuple(lora_B.shape) != (N, r // groups):
        want, why = ("[out, r]", "") if groups == 1 else ("[out, r/groups]", f", groups {groups}")
        raise ValueError(
            f"lora_B {_shape(lora_B)} must be {want} = [{N}, {r // groups}] (weight {_shape(weight)}, "
            f"lora_A {_shape(lora_A)}{why})"
        )
    if bias is not None:
        _tensor("bias", bias, 1)
        if bias.shape[0] != N:
            raise ValueError(f"bias {_shape(bias)} must be [out] = [{N}]")
    named = {
        "x": x,
        "weight": weight,
        "lora_A": lora_A,
        "lora_B": lora_B,
        **({"bias": bias} if bias is not None else {}),
    }
    if len({t.device for t in named.values()}) > 1:
        raise ValueError(
            "all tensors must be on one device, got " + ", ".join(f"{n} on {t.device}" for n, t in named.items())
        )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight is {weight.dtype} but x is {x.dtype}: cast one, or run under torch.autocast, as nn.Conv requires"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    return d


def merged_conv_weight(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """round(W + s·(B·A.view(r, -1)).view(W.shape)) in W's dtype: one addmm in fp32 (float64 for float64)."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    w2 = weight.reshape(weight.shape[0], -1).to(acc)
    merged = torch.addmm(w2, lora_B.to(acc), lora_A.reshape(lora_A.shape[0], -1).to(acc), alpha=scaling)
    return merged.to(weight.dtype).view(weight.shape)


def _conv_grads(dy, x, w, stride, padding, dilation, mask):
    d = w.dim() - 2
    return torch.ops.aten.convolution_backward(dy, x, w, None, stride, padding, dilation, False, [0] * d, 1, mask)


class _MergedLoRAConv(torch.autograd.Function):
    """y = conv(x, W + ΔW) + bias; backward without a weight-sized gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation):
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B)
        ctx.conf = (scaling, stride, padding, dilation)
        merged = merged_conv_weight(weight, lora_A, lora_B, scaling)
        return _CONV[weight.dim() - 2](x, merged, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, A, B = ctx.saved_tensors
        scaling, stride, padding, dilation = ctx.conf
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = dbias = dA = dB = None
        if need_x:
            merged = merged_conv_weight(weight, A, B, scaling)
            dx = _conv_grads(dy, x, merged, stride, padding, dilation, [True, False, False])[0]
        if need_w:
            dw = _conv_grads(dy, x, weight, stride, padding, dilation, [False, True, False])[1]
        if need_b:
            dbias = dy.sum(dim=[0, *range(2, dy.dim())]).to(bias.dtype)
        if need_a or need_bb:
            xl, dyl = x.to(A.dtype), dy.to(A.dtype)
            if need_bb:
                t = _CONV[A.dim() - 2](xl, A, None, stride, padding, dilation)  # [b, r, *S']
                dB = torch.einsum("bn...,br...->nr", dyl, t) * scaling
            if need_a:
                g = torch.einsum("nr,bn...->br...", B, dyl) * scaling  # [b, r, *S']
                dA = _conv_grads(g, xl, A, stride, padding, dilation, [False, True, False])[1]
        return dx, dw, dbias, dA, dB, None, None, None, None


def _grouped(x, weight, bias, A, B, s, p, training, stride, padding, dilation, groups):
    """y = conv(x, W, groups) + bias + s·B_g·conv(drop(x), A) (the module docstring's grouped case)."""
    conv = _CONV[weight.dim() - 2]
    y = conv(x, weight, bias, stride, padding, dilation, groups)
    xl = x.to(A.dtype)
    if training and p > 0.0:
        xl = F.dropout(xl, p, True)  # torch's draw: PEFT's mask for the same generator state
    t = conv(xl, A, None, stride, padding, dilation)  # [b, r, *S']
    b, N, r = y.shape[0], y.shape[1], A.shape[0]
    n_g, r_g = N // groups, r // groups
    Bg = B.view(groups, n_g, r_g)
    tg = t.reshape(b, groups, r_g, -1)
    if t.dtype == y.dtype:  # one batched GEMM accumulating into the base output
        Bb = Bg.unsqueeze(0).expand(b, -1, -1, -1).reshape(b * groups, n_g, r_g)
        out = torch.baddbmm(y.reshape(b * groups, n_g, -1), Bb, tg.reshape(b * groups, r_g, -1), alpha=s)
        return out.view(y.shape)
    low = torch.matmul(Bg, tg).view(y.shape)  # fp32 adapters on a 16-bit x: PEFT's promotion, then y's dtype
    return torch.add(y, low, alpha=s).to(y.dtype)


def lora_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """A convolution (zero padding) with LoRA in PEFT's factored shapes; see the module docstring.

    x [b, C, *S]; weight [N, C/G, *k]; lora_A [r, C, *k] (lora_A's convolution weight); lora_B [N, r/G]
    (lora_B's 1×1 weight, flattened); bias [N] or None; stride / padding / dilation / groups (G) as for
    ``torch.nn.functional.conv2d`` (the base convolution and lora_A take stride, padding and dilation;
    padding 'valid', or a symmetric 'same'; lora_A is never grouped, lora_B has W's groups)."""
    d = _check(x, weight, lora_A, lora_B, bias, groups)
    s, p = check_scaling(scaling), check_dropout(dropout_p)
    kernel = tuple(weight.shape[2:])
    stride, dilation = _tuple(stride, d, "stride"), _tuple(dilation, d, "dilation")
    padding = conv_padding(padding, kernel, stride, dilation)
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):  # as nn.Conv: x, W, bias in the autocast dtype
        dtype = torch.get_autocast_dtype(dev)
        cast = lambda t: t.to(dtype) if t is not None and t.dtype not in (dtype, torch.float64) else t
        x, weight, bias = cast(x), cast(weight), cast(bias)
        if lora_A.dtype != torch.float32:
            lora_A, lora_B = cast(lora_A), cast(lora_B)
    if bias is not None and bias.dtype != x.dtype:  # e.g. an fp32 lora_B bias folded in (s·b_B)
        bias = bias.to(x.dtype)
    with torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext():
        if groups > 1:
            return _grouped(x, weight, bias, lora_A, lora_B, s, p, training, stride, padding, dilation, groups)
        if training and p > 0.0:
            conv = _CONV[d]
            y = conv(x, weight, bias, stride, padding, dilation)
            t = conv(F.dropout(x.to(lora_A.dtype), p, True), lora_A, None, stride, padding, dilation)
            low = torch.einsum("nr,br...->bn...", lora_B, t) * s
            return (y + low).to(y.dtype)
        return _MergedLoRAConv.apply(x, weight, bias, lora_A, lora_B, s, stride, padding, dilation)
