"""The fused layer as two PyTorch custom operators — the unit that torch.compile, CUDA graphs and FSDP see.

    fused_lora::lora_linear_fwd(x [M, K], weight [N, K], bias [N]?, lora_A [r, K], lora_B [N, r], seed [1]?,
                                scaling, dropout_p, deterministic, group_n, group_bounds [G + 1]?,
                                *weight_state?, weight_info?) -> (y [M, N], xa [M, r] fp32)
    fused_lora::lora_linear_bwd(dy [M, N], x, weight, lora_A, lora_B, xa, seed?, scaling, dropout_p,
                                deterministic, need_x, need_A, need_B, *weight_state?, weight_info?)
                                -> (dx [M, K], dA [r, K], dB [N, r])

The base weight is dense, or 4-bit (QLoRA): then `weight` is its packed bytes, the four `weight_*`
tensors its state (absmax; absmax2, code2, offset with double quantisation) and `weight_info` its
shape and format (:mod:`fused_lora.base_weight`); each op dequantises W into the shared scratch just
before its GEMM (y forward, dX backward): no 16-bit copy of W is saved or kept.

Each is opaque to the compiler (``torch.library.custom_op``): its body launches the Triton kernels (or,
on CPU tensors, the kernels under Triton's interpreter), and a fake implementation gives shapes, dtypes
and strides to FakeTensor tracing and to the meta device. ``register_autograd`` ties them together, so
``torch.compile(model, fullgraph=True)`` traces a model of fused layers with no graph break and AOT
autograd puts the backward op in the backward graph. Gradients a caller does not need come back as
empty tensors (ops cannot return None). The dropout seed is drawn outside the ops by the caller from
torch's generator (see :func:`fused_lora.function.lora_linear`), so it is an ordinary traced op.

Outputs never alias inputs; xa's rows are padded to 16 bytes (a TMA operand), which the fake
implementation reproduces stride for stride.
"""

from __future__ import annotations

import torch

from . import base_weight, impl, reference

_kernels = None


def _k():
    """fused_lora.kernels, imported on first use: importing triton reads TRITON_INTERPRET, so a CPU-only
    user (or a test that sets the variable late) never pays for, or is surprised by, an early import."""
    global _kernels
    if _kernels is None:
        from . import kernels

        _kernels = kernels
    return _kernels


def _padded_fp32(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """What kernels.utils.row_padded allocates, as an empty (or fake) tensor with the same strides."""
    stride = -(-cols // 4) * 4 if cols else 4
    return x.new_empty_strided((rows, cols), (stride, 1), dtype=torch.float32)


@torch.library.custom_op("fused_lora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    deterministic: bool,
    group_n: int = 0,
    group_bounds: torch.Tensor | None = None,
    weight_absmax: torch.Tensor | None = None,
    weight_absmax2: torch.Tensor | None = None,
    weight_code2: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
    weight_info: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa): y = x·Wᵀ + bias + xa·Bᵀ with xa = s·drop(x)·Aᵀ, for 2-D x. With `group_bounds` (grouped
    adapters, MergedLinear) output column n only multiplies rank columns bounds[n // group_n] ..
    bounds[n // group_n + 1] — the rest of its row of B is zero."""
    k = _k()
    xa = k.shrink(x, lora_A, scale=scaling, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
    groups = (group_n, group_bounds) if group_bounds is not None else None
    state = (weight_absmax, weight_absmax2, weight_code2, weight_offset)
    with base_weight.dense(weight, state, weight_info, x.dtype) as w:
        y = impl.forward_gemm(k, x, w, xa, lora_B, bias, deterministic, groups)
    return y, xa


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic, group_n=0, group_bounds=None,
      weight_absmax=None, weight_absmax2=None, weight_code2=None, weight_offset=None, weight_info=None):  # fmt: skip
    N = base_weight.out_features(weight, weight_info)
    return x.new_empty((x.shape[0], N)), _padded_fp32(x, x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fused_lora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    deterministic: bool,
    need_x: bool,
    need_A: bool,
    need_B: bool,
    weight_absmax: torch.Tensor | None = None,
    weight_absmax2: torch.Tensor | None = None,
    weight_code2: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
    weight_info: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) in x's and the adapters' dtypes; each an empty tensor when not needed."""
    k = _k()
    empty = x.new_empty(0)
    dx, dA, dB = empty, lora_A.new_empty(0), lora_B.new_empty(0)
    if need_x or need_A or need_B:
        g, da, db = k.lora_grad(dy, lora_B, xa, x, scaling=scaling, dropout_p=dropout_p, seed=seed, need_g=need_x,
                                need_dA=need_A, need_dB=need_B, deterministic=deterministic)  # fmt: skip
        if need_x:
            state = (weight_absmax, weight_absmax2, weight_code2, weight_offset)
            with base_weight.dense(weight, state, weight_info, dy.dtype) as w:
                dx = impl.backward_dx(k, dy, w, g, lora_A, dropout_p, seed, deterministic)
        dA = da.to(lora_A.dtype) if need_A else dA
        dB = db.to(lora_B.dtype) if need_B else dB
    return dx, dA, dB


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, deterministic, need_x, need_A, need_B,
      weight_absmax=None, weight_absmax2=None, weight_code2=None, weight_offset=None, weight_info=None):  # fmt: skip
    return (
        x.new_empty(x.shape if need_x else (0,)),
        lora_A.new_empty(lora_A.shape if need_A else (0,)),
        lora_B.new_empty(lora_B.shape if need_B else (0,)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic = inputs[:9]
    _, xa = output
    ctx.mark_non_differentiable(xa)
    state = tuple(inputs[11:15]) + (None,) * (15 - len(inputs))  # a 4-bit weight's state: small tensors
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed, *state)
    ctx.weight_info = inputs[15] if len(inputs) > 15 else None
    ctx.scaling, ctx.dropout_p, ctx.deterministic = scaling, dropout_p, deterministic
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, seed, *state = ctx.saved_tensors
    info = ctx.weight_info
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
        dense = base_weight.dense_copy(weight, state, info, dy.dtype)
        grads = differentiable_backward(ctx, dy, x, dense, lora_A, lora_B, seed)
        return (*grads, *(None,) * 11)
    dx, dA, dB = torch.ops.fused_lora.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p, ctx.deterministic, need_x, need_A, need_B,
        *state, info,
    )  # fmt: skip
    dw = (dy.t() @ x).to(weight.dtype) if need_w else None
    dbias = dy.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
    dx, dA, dB = (dx if need_x else None), (dA if need_A else None), (dB if need_B else None)
    return (dx, dw, dbias, dA, dB, *(None,) * 11)


def differentiable_backward(ctx, dy, x, weight, lora_A, lora_B, seed):
    """First derivatives as a differentiable graph (double backward): the reference formula, fed the
    kernels' own dropout mask (regenerated from the saved seed), differentiated by autograd."""
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    mask = _k().dropout_mask(seed, x.shape[0], x.shape[1], ctx.dropout_p) if ctx.dropout_p > 0.0 else None
    inputs = [(x, need_x), (weight, need_w), (lora_A, need_A), (lora_B, need_B)]
    wanted = [t for t, need in inputs if need]
    y = reference.lora_linear(x, weight, lora_A, lora_B, ctx.scaling, None, ctx.dropout_p, dropout_mask=mask)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True) if wanted else ())
    dx, dw, dA, dB = (next(grads) if need else None for _, need in inputs)
    dbias = dy.sum(0).to(ctx.bias_dtype) if need_bias else None
    return dx, dw, dbias, dA, dB


torch.library.register_autograd("fused_lora::lora_linear_fwd", _backward, setup_context=_setup_context)
