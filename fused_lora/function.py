"""``lora_linear``: the fused LoRA linear layer as a ``torch.autograd.Function``.

    x [..., K], W [N, K], bias [N] or None, A [r, K], B [N, r], s = scaling
    y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ

Forward: xa = s·drop(x)·Aᵀ [M, r] fp32 (shrink), then y = x·Wᵀ + xa·Bᵀ + bias — by the fused GEMM
(low-rank term in its epilogue, 2 launches) or the hybrid (the term written by a small kernel, cuBLAS
adds x·Wᵀ to it; 3 launches), whichever :mod:`fused_lora.impl` chose for this shape. Saved for
backward: x itself (the caller's tensor), xa, and an 8-byte seed when dropout is on — the mask is
regenerated, never stored.

Backward: g = s/(1-p)·dY·B, dB = dYᵀ·xa and dA = gᵀ·drop(x) in one pass over dY and x (lora_grad),
then dX = dY·W + mask⊙(g·A) (fused GEMM or hybrid, chosen again for this shape). Gradients are computed
only for inputs that need them; a trainable W or bias gets its gradient from plain torch (dYᵀ·x, Σ dY).
With ``create_graph=True`` (double backward) the backward is built from differentiable torch ops with
the kernels' own mask, so second derivatives are right too.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F

from . import impl, reference
from .backend import interpreting, resolve_backend
from .validation import check_dropout, check_kernel_dtypes, check_lora_inputs, check_scaling

_kernels = None


def _k():
    """fused_lora.kernels, imported on first use: importing triton reads TRITON_INTERPRET, so a CPU-only
    user (or a test that sets the variable late) never pays for, or is surprised by, an early import."""
    global _kernels
    if _kernels is None:
        from . import kernels

        _kernels = kernels
    return _kernels


class _MetaKernels:
    """Stand-ins for the launchers on the meta device: they allocate what the kernels would return and
    launch nothing, so shapes, dtypes and what autograd saves can be traced at full size for free (the
    benchmark's memory table, model-size estimates, meta-device initialisation)."""

    @staticmethod
    def shrink(x, lora_A, **_):
        return x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32)

    @staticmethod
    def lora_gemm(p, q, l, r, **_):
        return p.new_empty((p.shape[0], q.shape[1]))

    @staticmethod
    def low_rank(l, r, *, out_dtype, **_):
        return l.new_empty((l.shape[0], r.shape[1]), dtype=out_dtype)

    @staticmethod
    def lora_grad(dy, lora_B, xa, x, *, need_g=True, need_dA=True, need_dB=True, **_):
        (M, N), K, R = dy.shape, x.shape[1], lora_B.shape[1]
        new = lambda *s: dy.new_empty(s, dtype=torch.float32)
        return new(M, R) if need_g else None, new(R, K) if need_dA else None, new(N, R) if need_dB else None


def _draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed from torch's generator for `device`, kept on that device (no host sync), so
    torch.manual_seed makes runs reproducible and activation checkpointing replays the same mask."""
    if device.type == "meta":
        return torch.empty(1, dtype=torch.int64, device=device)
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


class LoRALinearFunction(torch.autograd.Function):
    """autograd for the fused kernels. Use :func:`lora_linear`, which checks inputs and picks a backend."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, deterministic: bool):
        K, N = x.shape[-1], weight.shape[0]
        x2 = x.reshape(x.shape[:-1].numel(), K)  # a view unless x's leading dims cannot be flattened
        seed = _draw_seed(x.device) if dropout_p > 0.0 else None
        k = _MetaKernels if x.device.type == "meta" else _k()
        xa = k.shrink(x2, lora_A, scale=scaling, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
        y2 = impl.forward_gemm(k, x2, weight, xa, lora_B, bias, deterministic)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.scaling, ctx.dropout_p, ctx.deterministic = scaling, dropout_p, deterministic
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y2.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return _differentiable_backward(ctx, dy)
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        s, p = ctx.scaling, ctx.dropout_p
        K, N = x.shape[-1], weight.shape[0]
        M = x.shape[:-1].numel()
        x2, dy2 = x.reshape(M, K), dy.reshape(M, N)
        dx = dw = dbias = dA = dB = None
        k = _MetaKernels if x.device.type == "meta" else _k()
        det = ctx.deterministic
        if need_x or need_A or need_B:
            g, dA, dB = k.lora_grad(dy2, lora_B, xa, x2, scaling=s, dropout_p=p, seed=seed, need_g=need_x,
                                    need_dA=need_A, need_dB=need_B, deterministic=det)  # fmt: skip
        if need_x:
            dx = impl.backward_dx(k, dy2, weight, g, lora_A, p, seed, det).view(x.shape)
        if need_w:
            dw = (dy2.t() @ x2).to(weight.dtype)
        if need_bias:
            dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if dA is not None:
            dA = dA.to(lora_A.dtype)
        if dB is not None:
            dB = dB.to(lora_B.dtype)
        return dx, dw, dbias, dA, dB, None, None, None


def _differentiable_backward(ctx, dy):
    """First derivatives as a differentiable graph (double backward): the reference formula, fed the
    kernels' own dropout mask (regenerated from the saved seed), differentiated by autograd."""
    x, weight, lora_A, lora_B, _, seed = ctx.saved_tensors
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    mask = None
    if ctx.dropout_p > 0.0:
        mask = _k().dropout_mask(seed, x.shape[:-1].numel(), x.shape[-1], ctx.dropout_p).reshape(x.shape)
    inputs = [(x, need_x), (weight, need_w), (lora_A, need_A), (lora_B, need_B)]
    wanted = [t for t, need in inputs if need]
    y = reference.lora_linear(x, weight, lora_A, lora_B, ctx.scaling, None, ctx.dropout_p, dropout_mask=mask)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True) if wanted else ())
    dx, dw, dA, dB = (next(grads) if need else None for _, need in inputs)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0).to(ctx.bias_dtype) if need_bias else None
    return dx, dw, dbias, dA, dB, None, None, None


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
) -> torch.Tensor:
    """y = x·Wᵀ + bias + scaling·(drop(x)·lora_Aᵀ)·lora_Bᵀ, fused (see the module docstring).

    x [..., in_features] in fp16 / bf16 / fp32 (any strides); weight [out, in] in x's dtype (a
    transposed view is fine); lora_A [r, in] and lora_B [out, r] in x's dtype or fp32; bias [out] or
    None. Dropout (probability `dropout_p`, only when `training`) applies to the low-rank path's input.

    Under ``torch.autocast`` it behaves as ``nn.Linear`` does: x, weight and bias are cast to the
    autocast dtype and so is the output; fp32 adapters stay fp32 (the kernels read them as they are).
    """
    cast = _autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if cast is not None:  # as nn.Linear under autocast: x, W, bias in the autocast dtype; fp32 adapters stay
        x, weight = _cast(x, cast), _cast(weight, cast)
        bias = _cast(bias, cast) if bias is not None else None
        if isinstance(lora_A, torch.Tensor) and lora_A.dtype != torch.float32:
            lora_A, lora_B = _cast(lora_A, cast), _cast(lora_B, cast)
    check_lora_inputs(x, weight, lora_A, lora_B, bias)
    p = check_dropout(dropout_p)  # checked in eval too: a bad value must not wait for train() to surface
    p = p if training else 0.0
    backend = resolve_backend(x.device)
    learnable_scale = isinstance(scaling, torch.Tensor) and scaling.requires_grad and backend == "reference"
    if not learnable_scale:  # the reference backend lets autograd see a learnable scale; kernels refuse it
        scaling = check_scaling(scaling)
    guard = torch.autocast(x.device.type, enabled=False) if cast is not None else contextlib.nullcontext()

    with guard:
        if backend == "reference":
            return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, training=True)
        check_kernel_dtypes(x)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreting():
            # Triton's interpreter multiplies bf16 tl.dot operands wrongly (triton-lang/triton#11584)
            warnings.warn(
                "bf16 under TRITON_INTERPRET=1: Triton's interpreter computes bf16 matrix products wrongly, "
                "so this call runs the reference implementation instead of the kernels",
                RuntimeWarning,
                stacklevel=2,
            )
            return reference.lora_linear(x, weight, lora_A, lora_B, scaling, bias, p, training=True)
        if lora_A.shape[0] == 0:  # r = 0: a plain linear layer
            return F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
        return LoRALinearFunction.apply(
            x, weight, bias, lora_A, lora_B, scaling, p, torch.are_deterministic_algorithms_enabled()
        )


def _cast(t, dtype: torch.dtype):
    """Autocast's rule: floating tensors other than float64 go to `dtype`; anything else is left for the
    checks to reject."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)
