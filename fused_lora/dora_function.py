"""DoRA with the column scale inside the GEMM: :func:`fused_lora.dora.dora_linear`'s fast path.

    x [M, K] (x's leading dims flattened), W [N, K], A [r, K], B [N, r], c = m/n [N] (n detached), no bias
    xa = s·drop(x)·Aᵀ                       shrink (LoRA's; fp32 [M, r])
    y  = (x·Wᵀ + xa·Bᵀ) ⊙ c                 one fused GEMM, c applied in its epilogue (hybrid: cuBLAS's
                                            x·Wᵀ, then one pass adding xa·Bᵀ and scaling)

Saved for backward: LoRA's (x, xa, the seed) plus c and y — the layer's output itself, not z = y / c:
where the output's consumer saves it too (attention's q, k, v; the MLP's gate and up) no [M, N] tensor
is kept beyond LoRA's. An in-place edit of y before backward is then refused by autograd's version
check (as for torch's own ops that save their output, e.g. sigmoid), never used silently.

    g = s/(1-p)·dY·(c⊙B)    dB = c ⊙ (dYᵀ·xa)    dA = gᵀ·drop(x)     LoRA's grad pass on dY, B scaled;
    dz = dY ⊙ c,  S_j = Σ_m dY_mj·y_mj                      its dY loop also reads y and writes dz
                                                            (kernels.lora_grad, COL_SCALE)
    dc_j = S_j / c_j = Σ_m dY_mj·z_mj                       where c_j ≠ 0; where c_j = 0 y says nothing
                                                            about z: recomputed from x, W, xa, B
                                                            (kernels.column_scale.dead_column_sums)
    dX = dz·W + mask⊙(g·A)                                  LoRA's dX GEMM (fused or hybrid)
    dW = dzᵀ·x (a trainable base weight)

Beyond LoRA's backward that is one read of y and one write of dz ([M, N] each, x's dtype) and the
[bands, N] column sums; without dX (x not requiring grad) dz is not written.

dA and dB come from dY itself (c rides on B's rows and dB's), not from dz rounded to x's dtype. With a
bias, torch.compile, a torch.func transform, forward-mode AD, autocast, a 4-bit weight or the reference
backend, :func:`fused_lora.dora.dora_linear` composes LoRA's operator and the column scale instead (z
saved, one pass more each way). Double backward (``create_graph=True``) is built from differentiable
torch ops with the kernels' own mask.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from . import impl, ops, reference
from .backend import bf16_dot_wrong, resolve_backend
from .function import _autocast_dtype, _draw_seed
from .quant import QuantizedWeight
from .validation import KERNEL_DTYPES


def fused_path_ok(x, weight, lora_A, bias, scale) -> bool:
    """May this DoRA call take :class:`DoraLinearFunction`? (Inputs are checked by the caller.)"""
    if bias is not None or isinstance(weight, QuantizedWeight) or lora_A.shape[0] == 0:
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch.autograd.forward_ad._current_level >= 0 or _autocast_dtype(x.device.type) is not None:
        return False
    if x.dtype not in KERNEL_DTYPES or scale.device != x.device or resolve_backend(x.device) != "triton":
        return False
    return not (x.dtype == torch.bfloat16 and x.device.type == "cpu" and bf16_dot_wrong())


class DoraLinearFunction(torch.autograd.Function):
    """``DoraLinearFunction.apply(x, weight, lora_A, lora_B, c, scaling, dropout_p, deterministic, impl)``:
    y = (x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) ⊙ c on the kernels (module docstring); y is x's leading shape + [N]."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, c, scaling, dropout_p, deterministic, impl_name):
        k = ops._k()
        x2 = ops._2d(x)
        M, N, r = x2.shape[0], weight.shape[0], lora_A.shape[0]
        seed = _draw_seed(x.device) if dropout_p > 0.0 else None
        c32 = c.detach().float().contiguous()
        if x.device.type == "meta":  # shapes only (the benchmark's memory count)
            xa, y2 = ops._padded_fp32(x, M, r), x.new_empty((M, N))
        else:
            xa = k.shrink(x2, lora_A, scale=scaling, dropout_p=dropout_p, seed=seed, deterministic=deterministic)
            y2 = impl.forward_gemm(k, x2, weight, xa, lora_B, None, deterministic, None, impl_name, col_scale=c32)
        y = torch.ops.aten._unsafe_view(y2, (*x.shape[:-1], N))  # not a view (see fused_lora.function.linear)
        ctx.save_for_backward(x, weight, lora_A, lora_B, c, xa, seed, y)
        ctx.scaling, ctx.dropout_p, ctx.deterministic, ctx.impl = scaling, dropout_p, deterministic, impl_name
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, c, xa, seed, y = ctx.saved_tensors
        need_x, need_w, need_A, need_B, need_c = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():  # create_graph=True: a backward that is itself differentiable
            return (*_differentiable_backward(ctx, dy, x, weight, lora_A, lora_B, c, seed), None, None, None, None)
        if x.device.type == "meta":
            grads = [t.new_empty(t.shape) if need else None for t, need in
                     zip((x, weight, lora_A, lora_B, c), (need_x, need_w, need_A, need_B, need_c))]  # fmt: skip
            return (*grads, None, None, None, None)
        from .kernels import column_scale

        dy2, y2, x2 = ops._2d(dy), ops._2d(y), ops._2d(x)
        c32 = c.detach().float().contiguous()
        dx = dA = dB = None
        if need_x or need_A or need_B:  # the grad pass also writes dz = dY ⊙ c and Σ_m dY·y
            dz = torch.empty_like(y2) if need_x or need_w else None
            s_y = torch.empty_like(c32)
            # g = s/(1-p)·dY·(c⊙B) = s/(1-p)·dz·B; fp16 adapters: c⊙B in fp32 (in fp16 it could underflow)
            b_dtype = torch.float32 if lora_B.dtype == torch.float16 else lora_B.dtype
            b_scaled = (lora_B.float() * c32[:, None]).to(b_dtype)
            dx2, da, db = ops.backward_kernels(
                dy2, dz, x, weight, lora_A, b_scaled, xa, seed, ctx.scaling, ctx.dropout_p, ctx.deterministic,
                need_x, need_A, need_B, ctx.impl, dora=(c32, y2, dz, s_y),
            )  # fmt: skip
            dx = torch.ops.aten._unsafe_view(dx2, x.shape) if need_x else None
            dA = da.to(lora_A.dtype) if need_A else None
            dB = (db * c32[:, None]).to(lora_B.dtype) if need_B else None  # dzᵀ·xa = c ⊙ (dYᵀ·xa)
        else:  # only m (or W) trains: the column-scale pass alone
            dz, s_y, _ = column_scale.scale_bwd(dy2.contiguous(), y2, c32)
        dc = None
        if need_c:  # Σ dY·z = Σ dY·y / c; recomputed from x where y does not give z back (c = 0, tiny, inf;
            # y overflowed: Σ dY·y not finite)
            lossy = column_scale.lossy_columns(c32, y.dtype) | ~torch.isfinite(s_y)
            direct = column_scale.dead_column_sums(dy2, lossy, x2, weight, xa, lora_B)
            dc = torch.where(lossy, direct, s_y / torch.where(lossy, 1.0, c32)).to(c.dtype)
        dw = (dz.t() @ x2).to(weight.dtype) if need_w else None
        return dx, dw, dA, dB, dc, None, None, None, None


def _differentiable_backward(ctx, dy, x, weight, lora_A, lora_B, c, seed):
    """(dx, dW, dA, dB, dc) as differentiable torch ops, the kernels' own mask: z = x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ
    recomputed in the wider of x's and the adapters' dtypes, dz = dY ⊙ c, dc = Σ dY ⊙ z, the rest LoRA's
    closed form on dz (:func:`fused_lora.ops.differentiable_backward`)."""
    need_x, need_w, need_A, need_B, need_c = ctx.needs_input_grad[:5]
    lo = torch.promote_types(torch.promote_types(x.dtype, lora_A.dtype), c.dtype)
    dz = (dy.to(lo) * c.to(lo)).to(dy.dtype)
    dc = None
    if need_c:
        mask = ops.keep_mask(seed, x, ctx.dropout_p)
        low = F.linear(F.linear(reference.dropped(x.to(lo), ctx.dropout_p, mask), lora_A.to(lo)), lora_B.to(lo))
        z = F.linear(x, weight).to(lo) + ctx.scaling * low
        dc = (dy.to(lo) * z).reshape(-1, z.shape[-1]).sum(0).to(c.dtype)
    lora_ctx = types.SimpleNamespace(needs_input_grad=(need_x, need_w, False, need_A, need_B), dropout_p=ctx.dropout_p,
                                     scaling=ctx.scaling, bias_dtype=None)  # fmt: skip
    dx, dw, _, dA, dB = ops.differentiable_backward(lora_ctx, dz, x, weight, lora_A, lora_B, seed)
    return dx, dw, dA, dB, dc
