"""The LoRA embedding and convolution in plain PyTorch: the specification the kernels and layers are
tested against, and the CPU path of :func:`fused_lora.lora_embedding`. Written to be read.

Embedding (loralib's ``lora.Embedding``, PEFT's ``lora.Embedding``), idx any shape, W [V, D], A [r, V],
B [D, r], s = scaling:

    y = F.embedding(idx, W, opts) + s·F.embedding(idx, Aᵀ, opts)·Bᵀ
    opts = padding_idx, max_norm, norm_type, scale_grad_by_freq: both lookups take them, as loralib
    passes them (so max_norm renormalises W's rows *and* A's columns in place, and padding_idx's
    column of A gets no gradient)

Convolution (loralib's ``ConvLoRA``; dims d = 1, 2, 3, kernel k in every dimension):

    ΔW = s·(B·A).view(W.shape)      A [r·k, in·k^(d-1)], B [out/groups·k, r·k]
    y  = conv(x, W + ΔW) + bias                            (no dropout, or eval)
    y  = conv(x, W) + bias + conv(x ⊙ mask / (1 - p), ΔW)   (training with dropout p > 0)

When the adapters are fp32 and the table / weight 16-bit, the low-rank part runs in fp32 and the sum is
rounded once to W's dtype (as PEFT does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_embedding(
    idx: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
) -> torch.Tensor:
    """y = W[idx] + s·A[:, idx]ᵀ·Bᵀ with nn.Embedding's options, differentiable by autograd."""
    opts = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq)
    y = F.embedding(idx, weight, **opts)
    if lora_A.shape[0] == 0:
        return y
    low = F.embedding(idx, lora_A.t(), **opts) @ lora_B.t() * scaling
    if low.dtype == y.dtype:
        return y + low
    return (y.to(low.dtype) + low).to(y.dtype)


def conv_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, shape: torch.Size) -> torch.Tensor:
    """ΔW = s·(B·A) viewed as the convolution weight's shape, in the adapters' dtype."""
    return (lora_B @ lora_A).view(shape) * scaling


def lora_conv(
    conv: torch.nn.Module,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA convolution of `x` with the weight, bias and settings (stride, padding, padding_mode,
    dilation, groups) of `conv`, an nn.Conv1d/2d/3d. `dropout_mask` (bool, x's shape) is the keep-mask
    when dropout_p > 0."""
    weight, bias = conv.weight, conv.bias
    delta = conv_delta(lora_A, lora_B, scaling, weight.shape)
    if dropout_p == 0.0:
        eff = (weight.to(delta.dtype) + delta).to(weight.dtype)
        return conv._conv_forward(x, eff, bias)
    if dropout_mask is None:
        raise ValueError("dropout_p > 0 needs the dropout_mask")
    dropped = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return conv._conv_forward(x, weight, bias) + conv._conv_forward(dropped, delta.to(weight.dtype), None)
