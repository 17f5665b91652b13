"""The fused layer as PyTorch custom operators — the unit that torch.compile, CUDA graphs, FSDP and
torch.func see.

    fused_lora::lora_linear_fwd(x [..., K], weight [N, K], bias [N]?, lora_A [r, K], lora_B [N, r], seed [1]?,
                                scaling, dropout_p, deterministic, group_n, group_bounds [G + 1]?, impl)
                                -> (y [..., N], xa [M, r] fp32)            M = x's rows (leading dims)
    fused_lora::lora_linear_bwd(dy [..., N], x [..., K], weight, lora_A, lora_B, xa, seed?, scaling, dropout_p,
                                deterministic, need_x, need_A, need_B, impl) -> (dx [..., K], dA [r, K], dB [N, r])
    fused_lora::dropout_mask(seed [1], M, K, dropout_p) -> keep [M, K] bool   (the kernels' mask)

The base weight is dense, or 4-bit (QLoRA): then `weight` is its packed bytes, the four trailing
`weight_*` tensors its state (absmax; absmax2, code2, offset with double quantisation) and `weight_info`
its shape and format (:mod:`fused_lora.base_weight`); each op dequantises W into the shared scratch just
before its GEMM (y forward, dX backward): no 16-bit copy of W is saved or kept.

Each is opaque to the compiler: its body launches the Triton kernels (or, on CPU tensors, the kernels
under Triton's interpreter), and a fake implementation gives shapes, dtypes and strides to FakeTensor
tracing and to the meta device. y comes back in x's leading shape and is not a view of anything (an
in-place op on a layer's output must not rebase the graph past the op: FSDP2's hooks hang on it).
Gradients a caller does not need come back as empty tensors (ops cannot return None). The dropout seed
is drawn outside the ops by the caller from torch's generator (see :func:`fused_lora.function.lora_linear`),
so it is an ordinary traced op; `impl` ('auto' / 'fused' / 'hybrid', :mod:`fused_lora.impl`) is read by
the caller at forward time and travels to the backward with the saved tensors, so a ``use_impl`` block
governs the backward of the forward it ran, whichever thread autograd runs the backward on.

The forward's autograd is :class:`LinearRules` (:mod:`fused_lora.opdef`): reverse mode through
``lora_linear_bwd``; with ``create_graph=True`` (double backward, and every torch.func transform, which
builds differentiable graphs) a backward of differentiable torch ops fed the kernels' own mask; forward
mode (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) by the tangent formula below, in
torch ops with the kernels' mask; vmap by folding a batch of x into its rows (no dropout), or one call per
batch element. The primal always runs on the kernels.

    ẏ = ẋ·Wᵀ + x·Ẇᵀ + ḃ + s·(drop(ẋ)·Aᵀ + drop(x)·Ȧᵀ)·Bᵀ + xa·Ḃᵀ      (xa = s·drop(x)·Aᵀ, the same mask)

Outputs never alias inputs; xa's rows are padded to 16 bytes (a TMA operand), which the fake
implementation reproduces stride for stride.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import base_weight, impl, reference
from .opdef import Rules, attach_autograd, below_autograd, define, unflatten, vmap_by_loop

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


def _rows(t: torch.Tensor) -> int:
    return math.prod(t.shape[:-1])


def _2d(t: torch.Tensor) -> torch.Tensor:
    """t [..., C] as [M, C] (a view where the leading dims flatten; any C, 0 included)."""
    return t.reshape(_rows(t), t.shape[-1])


def _fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    seed: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    deterministic: bool,
    group_n: int,
    group_bounds: torch.Tensor | None,
    impl_name: str,
    weight_absmax: torch.Tensor | None = None,
    weight_absmax2: torch.Tensor | None = None,
    weight_code2: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
    weight_info: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., N], xa [M, r]): y = x·Wᵀ + bias + xa·Bᵀ with xa = s·drop(x)·Aᵀ. With `group_bounds`
    (grouped adapters, MergedLinear) output column n only multiplies rank columns bounds[n // group_n] ..
    bounds[n // group_n + 1] — the rest of its row of B is zero."""
    k, N = _k(), base_weight.out_features(weight, weight_info)
    x2 = _2d(x)  # a view unless x's leading dims cannot be flattened
    xa = k.shrink(x2, lora_A, scale=scaling, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
    groups = (group_n, group_bounds) if group_bounds is not None else None
    state = (weight_absmax, weight_absmax2, weight_code2, weight_offset)
    with base_weight.dense(weight, state, weight_info, x.dtype) as w:  # a 4-bit W: dequantised, shared scratch
        y2 = impl.forward_gemm(k, x2, w, xa, lora_B, bias, deterministic, groups, impl_name)
    return unflatten(y2, x.shape[:-1], N), xa


def _fwd_fake(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic, group_n, group_bounds,
              impl_name, weight_absmax=None, weight_absmax2=None, weight_code2=None, weight_offset=None,
              weight_info=None):  # fmt: skip
    N = base_weight.out_features(weight, weight_info)
    return x.new_empty((*x.shape[:-1], N)), _padded_fp32(x, _rows(x), lora_A.shape[0])


lora_linear_fwd = define("lora_linear_fwd", _fwd, _fwd_fake)


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
    impl_name: str,
    weight_absmax: torch.Tensor | None = None,
    weight_absmax2: torch.Tensor | None = None,
    weight_code2: torch.Tensor | None = None,
    weight_offset: torch.Tensor | None = None,
    weight_info: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [..., K], dA, dB) in x's and the adapters' dtypes; each an empty tensor when not needed."""
    dx, dA, dB = x.new_empty(0), lora_A.new_empty(0), lora_B.new_empty(0)
    if need_x or need_A or need_B:
        state = (weight_absmax, weight_absmax2, weight_code2, weight_offset)
        dx2, da, db = backward_kernels(_2d(dy), None, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p,
                                       deterministic, need_x, need_A, need_B, impl_name, state,
                                       weight_info)  # fmt: skip
        dx = unflatten(dx2, x.shape[:-1], x.shape[-1]) if need_x else dx
        dA = da.to(lora_A.dtype) if need_A else dA
        dB = db.to(lora_B.dtype) if need_B else dB
    return dx, dA, dB


def backward_kernels(dy2, dy_dx, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, deterministic, need_x,
                     need_A, need_B, impl_name, state=(None,) * 4, weight_info=None, dora=None):  # fmt: skip
    """(dX [M, K], dA, dB unrounded, fp32) on the kernels: the grad pass over dy2 [M, N] and x, then the dX
    GEMM over `dy_dx` (dy2 when None). DoRA (fused_lora/dora_function.py) hands the grad pass dY with B
    scaled by m/n and `dora` (kernels.lora_grad: the pass also writes dz = dY ⊙ m/n into `dy_dx`, which
    the dX GEMM then reads, and dm's column sums). Entries not needed are None."""
    k = _k()
    x2 = _2d(x)
    # dX's epilogue reads the mask packed (1 bit per element), stored by the dA pass as it regenerates it,
    # instead of running Philox again: int32 [M, ⌈K/32⌉], alive until dX is written
    bits = k.new_keep_bits(x2.shape[0], x.shape[-1], x.device) if need_x and dropout_p > 0.0 else None
    g, da, db = k.lora_grad(dy2, lora_B, xa, x2, scaling=scaling, dropout_p=dropout_p, seed=seed,
                            need_g=need_x, need_dA=need_A, need_dB=need_B, deterministic=deterministic,
                            keep_bits_out=bits, dora=dora)  # fmt: skip
    dx = None
    if need_x:
        dy_dx = dy2 if dy_dx is None else dy_dx
        with base_weight.dense(weight, state, weight_info, dy2.dtype) as w:  # a 4-bit W: dequantised again
            dx = impl.backward_dx(k, dy_dx, w, g, lora_A, dropout_p, seed, deterministic, impl_name, bits)
    return dx, (da if need_A else None), (db if need_B else None)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, deterministic, need_x, need_A, need_B, impl_name,
      weight_absmax=None, weight_absmax2=None, weight_code2=None, weight_offset=None, weight_info=None):  # fmt: skip
    return (
        x.new_empty(x.shape if need_x else (0,)),
        lora_A.new_empty(lora_A.shape if need_A else (0,)),
        lora_B.new_empty(lora_B.shape if need_B else (0,)),
    )


@torch.library.custom_op("fused_lora::dropout_mask", mutates_args=())
def dropout_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask [M, K] (bool) the kernels draw for an x of M rows and K columns under `seed`. An
    operator, so torch.func's wrapped tensors and FakeTensors reach the kernel as plain ones."""
    return _k().dropout_mask(seed, M, K, dropout_p)


@dropout_mask.register_fake
def _(seed, M, K, dropout_p):
    return seed.new_empty((M, K), dtype=torch.bool)


def keep_mask(seed: torch.Tensor | None, x: torch.Tensor, dropout_p: float) -> torch.Tensor | None:
    """The kernels' keep-mask shaped like x [..., K], or None without dropout."""
    if dropout_p == 0.0:
        return None
    return dropout_mask(seed, _rows(x), x.shape[-1], dropout_p).view(x.shape)


class LinearRules(Rules):
    """The autograd of ``fused_lora::lora_linear_fwd`` (its Autograd kernel): forward = the op,
    reverse mode, forward mode, vmap (see the module docstring). Arguments are the op's."""

    @staticmethod
    def forward(*args):
        return below_autograd(lora_linear_fwd, *args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic, group_n, group_bounds = inputs[:11]
        name = inputs[11]
        state = (*inputs[12:16], *(None,) * (16 - max(len(inputs), 12)))  # a 4-bit weight's state, or Nones
        ctx.weight_info = inputs[16] if len(inputs) > 16 else None
        _, xa = output
        ctx.mark_non_differentiable(xa)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed, *state)
        ctx.save_for_forward(x, weight, lora_A, lora_B, xa, seed, group_bounds, *state)
        ctx.scaling, ctx.dropout_p, ctx.deterministic, ctx.impl = scaling, dropout_p, deterministic, name
        ctx.group_n = group_n
        ctx.bias_dtype = bias.dtype if bias is not None else None

    @staticmethod
    def backward(ctx, dy, _dxa):
        x, weight, lora_A, lora_B, xa, seed, *state = ctx.saved_tensors
        need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True (and torch.func): a backward that is itself differentiable
            dense = base_weight.dense_copy(weight, state, ctx.weight_info, x.dtype)
            grads = differentiable_backward(ctx, dy, x, dense, lora_A, lora_B, seed)
        else:
            dx, dA, dB = torch.ops.fused_lora.lora_linear_bwd(
                dy, x, weight, lora_A, lora_B, xa, seed, ctx.scaling, ctx.dropout_p, ctx.deterministic,
                need_x, need_A, need_B, ctx.impl, *state, ctx.weight_info,
            )  # fmt: skip
            dy2, x2 = _2d(dy), _2d(x)
            dw = (dy2.t() @ x2).to(weight.dtype) if need_w else None
            dbias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_bias else None
            grads = (dx if need_x else None), dw, dbias, (dA if need_A else None), (dB if need_B else None)
        return (*grads, *(None,) * 12)

    @staticmethod
    def jvp(ctx, dx, dw, dbias, dA, dB, *_):
        x, weight, lora_A, lora_B, xa, seed, group_bounds, *state = ctx.saved_tensors
        weight = base_weight.dense_copy(weight, state, ctx.weight_info, x.dtype)  # a 4-bit W: dequantised
        return tangent(ctx, x, weight, lora_A, lora_B, xa, seed, group_bounds, dx, dw, dbias, dA, dB), None


attach_autograd(lora_linear_fwd, LinearRules)


def differentiable_backward(ctx, dy, x, weight, lora_A, lora_B, seed):
    """First derivatives as differentiable torch ops (double backward, torch.func), in closed form with
    the kernels' own dropout mask (regenerated from the saved seed), rounded as autograd rounds the
    reference's: dy·W in x's dtype, the low-rank products in the wider of x's and the adapters' dtypes.

        g = s·dY·B    dX = dY·W + drop(g·A)    dA = gᵀ·drop(x)    dB = s·dYᵀ·(drop(x)·Aᵀ)    dW = dYᵀ·x
    """
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    lo = torch.promote_types(x.dtype, lora_A.dtype)
    mask = keep_mask(seed, x, ctx.dropout_p)
    drop = lambda t: reference.dropped(t, ctx.dropout_p, mask)
    dy2, x2 = _2d(dy), _2d(x)
    A, B, dy_lo = lora_A.to(lo), lora_B.to(lo), dy.to(lo)
    g = (dy_lo @ B) * ctx.scaling if need_x or need_A else None
    dx = (dy @ weight + drop(g @ A).to(x.dtype)) if need_x else None
    dA = (_2d(g).t() @ _2d(drop(x.to(lo)))).to(lora_A.dtype) if need_A else None
    if need_B:
        xa = _2d(drop(x.to(lo)) @ A.t())
        dB = ((_2d(dy_lo).t() @ xa) * ctx.scaling).to(lora_B.dtype)
    else:
        dB = None
    dw = (dy2.t() @ x2).to(weight.dtype) if need_w else None
    dbias = dy2.sum(0).to(ctx.bias_dtype) if need_bias else None
    return dx, dw, dbias, dA, dB


def tangent(ctx, x, weight, lora_A, lora_B, xa, seed, group_bounds, dx, dw, dbias, dA, dB) -> torch.Tensor:
    """ẏ (see the module docstring) in y's dtype, rounded as the reference rounds y: x·Wᵀ-like terms in
    x's dtype, the low-rank terms in the wider of x's and the adapters' dtypes, one rounding of the sum."""
    s, p = ctx.scaling, ctx.dropout_p
    lo = torch.promote_types(x.dtype, lora_A.dtype)
    mask = keep_mask(seed, x, p) if dx is not None or dA is not None else None
    drop = lambda t: reference.dropped(t, p, mask).to(lo)
    main = [F.linear(dx, weight)] if dx is not None else []
    main += [F.linear(x, dw)] if dw is not None else []
    main += [dbias.to(x.dtype)] if dbias is not None else []
    low = []
    if dx is not None:
        low.append(F.linear(F.linear(drop(dx), lora_A.to(lo)), lora_B.to(lo)) * s)
    if dA is not None:
        low.append(F.linear(F.linear(drop(x), dA.to(lo)), lora_B.to(lo)) * s)
    if dB is not None:
        if group_bounds is not None:  # the forward reads B only inside its blocks
            dB = dB * reference.group_mask(lora_B, ctx.group_n, group_bounds)
        low.append(F.linear(xa.view(*x.shape[:-1], xa.shape[-1]).to(lo), dB.to(lo)))
    out = sum(main[1:], main[0]) if main else None
    if not low:
        return out
    low = sum(low[1:], low[0])
    if out is None:
        return low.to(x.dtype)
    return (out + low) if low.dtype == out.dtype else (out.to(low.dtype) + low).to(x.dtype)


@torch.library.register_vmap("fused_lora::lora_linear_fwd")
def _fwd_vmap(info, in_dims, x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic,
              group_n, group_bounds, impl_name, *weight_state):  # fmt: skip
    """A batch of x alone (no dropout: the mask depends on the row) is more rows: one call. Anything
    else (batched weights or adapters, a batched seed, dropout) runs one call per batch element, each
    with its own slice — with an unbatched seed, the same mask for every element."""
    args = [x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, deterministic, group_n, group_bounds, impl_name,
            *weight_state]  # fmt: skip
    if in_dims[0] is not None and all(d is None for d in in_dims[1:]) and dropout_p == 0.0:
        args[0] = x.movedim(in_dims[0], 0)
        y, xa = lora_linear_fwd(*args)
        return (y, xa.view(info.batch_size, xa.shape[0] // info.batch_size, xa.shape[-1])), (0, 0)
    return vmap_by_loop(lora_linear_fwd)(info, in_dims, *args)


lora_linear_bwd.register_vmap(vmap_by_loop(lora_linear_bwd))  # dA, dB sum over rows: no folding
dropout_mask.register_vmap(vmap_by_loop(dropout_mask))  # a batch of seeds (vmap randomness="different")
