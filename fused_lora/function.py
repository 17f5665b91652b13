"""``lora_linear``: the fused LoRA linear layer, differentiable, compilable.

    x [..., K], W [N, K], bias [N] or None, A [r, K], B [N, r], s = scaling
    y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ

Forward: xa = s·drop(x)·Aᵀ [M, r] fp32 (shrink), then y = x·Wᵀ + xa·Bᵀ + bias — by the fused GEMM
(low-rank term in its epilogue, 2 launches) or the hybrid (the term written by a small kernel, cuBLAS
adds x·Wᵀ to it; 3 launches), whichever :mod:`fused_lora.impl` chose for this shape. Saved for
backward: x itself (the caller's tensor), xa, and an 8-byte seed when dropout is on — the mask is
regenerated, never stored.

Backward: g = s/(1-p)·dY·B, dB = dYᵀ·xa and dA = gᵀ·drop(x) in one pass over dY and x (lora_grad),
then dX = dY·W + mask⊙(g·A) (fused GEMM or hybrid, chosen again for this shape under the implementation
setting the forward ran with, whichever thread runs the backward). Gradients are computed
only for inputs that need them; a trainable W or bias gets its gradient from plain torch (dYᵀ·x, Σ dY).
With ``create_graph=True`` (double backward, and under every torch.func transform) the backward is built
from differentiable torch ops with the kernels' own mask, so second derivatives are right too; forward
mode (jvp, forward_ad) has its own rule, the same way. y is x's leading shape + [N] and not a view.

Both directions are PyTorch custom operators (:mod:`fused_lora.ops`): ``torch.compile`` traces a model
of fused layers without a graph break, and the kernels run inside the compiled graph.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from . import base_weight, ops, reference
from .backend import bf16_dot_wrong, resolve_backend
from .impl import get_impl
from .quant import QuantizedWeight
from .validation import (
    check_dropout,
    check_groups,
    check_kernel_dtypes,
    check_learnable_scaling,
    check_lora_inputs,
    check_scaling,
)


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed from torch's generator for `device`, kept on that device (no host sync), so
    torch.manual_seed makes runs reproducible and activation checkpointing replays the same mask. An
    ordinary torch op: under torch.compile it is traced (inductor draws it with its own generator
    unless ``torch._inductor.config.fallback_random = True``; aot_eager draws as eager does)."""
    if device.type == "meta":
        return torch.empty(1, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


class LoRALinearFunction:
    """The fused path with the checks already done: ``LoRALinearFunction.apply(x, weight, bias, lora_A,
    lora_B, scaling, dropout_p, deterministic)``. Differentiable (reverse and forward mode, torch.func)
    through the custom operator's autograd (:class:`fused_lora.ops.LinearRules`); use :func:`lora_linear`,
    which checks inputs and picks a backend. y is x's leading shape + [N], and not a view."""

    @staticmethod
    def apply(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, deterministic: bool, groups=None):
        seed = _draw_seed(x.device) if dropout_p > 0.0 else None
        group_n, bounds = groups if groups is not None else (0, None)
        w, state, info = base_weight.op_args(weight)  # a dense W, or a 4-bit one's packed bytes and state
        y, _ = ops.lora_linear_fwd(
            x, w, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic, group_n, bounds, get_impl(),
            *state, info,
        )  # fmt: skip
        return y


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    groups: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·(drop(x)·lora_Aᵀ)·lora_Bᵀ, fused (see the module docstring).

    x [..., in_features] in fp16 / bf16 / fp32 (any strides); weight [out, in] in x's dtype (a
    transposed view is fine), or a 4-bit :class:`fused_lora.quant.QuantizedWeight` (QLoRA: dequantised to
    x's dtype into a shared scratch just before each GEMM, forward and backward; never kept); lora_A
    [r, in] and lora_B [out, r] in x's dtype or fp32; bias [out] or
    None. Dropout (probability `dropout_p`, only when `training`) applies to the low-rank path's input.

    Under ``torch.autocast`` it behaves as ``nn.Linear`` does: x, weight and bias are cast to the
    autocast dtype and so is the output; fp32 adapters stay fp32 (the kernels read them as they are).

    `groups` (MergedLinear's block-structured B: rows of group q are zero outside rank columns
    bounds[q] .. bounds[q + 1]) = (group_n, bounds int32 or int64 [N / group_n + 1] on x's device,
    non-decreasing within [0, r]) lets each output tile multiply only its groups' rank columns; the result
    is the same as without it. It is checked (a ValueError / TypeError naming `groups`); that B is zero
    outside the blocks is the caller's promise, not checked (it would cost a host sync per call). The
    reference backend honours it by zeroing B outside the blocks, as the kernels' result assumes.
    """
    cast = _autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    quantized = weight if isinstance(weight, QuantizedWeight) else None
    if cast is not None:  # as nn.Linear under autocast: x, W, bias in the autocast dtype; fp32 adapters stay
        x, weight = _cast(x, cast), (weight if quantized else _cast(weight, cast))
        bias = _cast(bias, cast) if bias is not None else None
        if isinstance(lora_A, torch.Tensor) and lora_A.dtype != torch.float32:
            lora_A, lora_B = _cast(lora_A, cast), _cast(lora_B, cast)
    if quantized is not None:  # checked as a weight of x's dtype (what it is dequantised to)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        weight = base_weight.stand_in(quantized, x.dtype)
    check_lora_inputs(x, weight, lora_A, lora_B, bias)
    groups = check_groups(groups, weight.shape[0], lora_A.shape[0], x.device)
    p = check_dropout(dropout_p)  # checked in eval too: a bad value must not wait for train() to surface
    p = p if training else 0.0
    backend = resolve_backend(x.device)
    learnable_scale = isinstance(scaling, torch.Tensor) and scaling.requires_grad and backend == "reference"
    # the reference backend lets autograd see a learnable scale (checked alike, kept a tensor); kernels refuse it
    scaling = check_learnable_scaling(scaling) if learnable_scale else check_scaling(scaling)
    guard = torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext()

    with guard:
        if quantized is not None:  # the kernels take the 4-bit weight itself; anything else a dense copy
            kernels = backend == "triton" and lora_A.shape[0] > 0 and not _interpreted_bf16(x)
            weight = quantized if kernels else base_weight.dequantized(quantized, x.dtype)
        if backend == "reference":
            return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, training=True, groups=groups)
        check_kernel_dtypes(x)
        if _interpreted_bf16(x):
            # Triton's interpreter multiplies bf16 tl.dot operands wrongly (triton-lang/triton#11584)
            warnings.warn(
                "bf16 under TRITON_INTERPRET=1: Triton's interpreter computes bf16 matrix products wrongly, "
                "so this call runs the reference implementation instead of the kernels",
                RuntimeWarning,
                stacklevel=2,
            )
            return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, training=True, groups=groups)
        if lora_A.shape[0] == 0:  # r = 0: a plain linear layer
            return linear(x, weight, bias.to(x.dtype) if bias is not None else None)
        return LoRALinearFunction.apply(
            x, weight, bias, lora_A, lora_B, scaling, p, torch.are_deterministic_algorithms_enabled(), groups
        )


def _interpreted_bf16(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_dot_wrong()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose output is not an autograd view. F.linear of an x with more than
    two dims and a bias returns a view of its 2-D addmm, and an in-place op on a view rebases the graph
    past the view's node: a hook on the output (FSDP2's pre-backward unshard) never runs. Here the 2-D
    result is reshaped by ``aten._unsafe_view`` (what torch.matmul does with its own folded product):
    the same storage, no view tracking, the gradient a reshape. The 2-D result has no other owner."""
    if x.dim() <= 2:
        return F.linear(x, weight, bias)
    y = F.linear(x.reshape(x.shape[:-1].numel(), x.shape[-1]), weight, bias)
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


def _cast(t, dtype: torch.dtype):
    """Autocast's rule: floating tensors other than float64 go to `dtype`; anything else is left for the
    checks to reject."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)
