"""The fused LoRA embedding as PyTorch custom operators, with every autograd rule (see :mod:`fused_lora.opdef`).

    fused_lora::lora_embedding_fwd(idx [...] int, weight [V, D], lora_A [r, V], lora_B [D, r], scaling,
                                   padding_idx, scale_grad_by_freq, deterministic) -> y [..., D]
    fused_lora::lora_embedding_bwd(dy [..., D], idx, lora_A, lora_B, scaling, padding_idx, counts [V]?,
                                   need_A, need_B, deterministic) -> (dA [r, V], dB [D, r])

    y = W[idx] + s·A[:, idx]ᵀ·Bᵀ            one kernel; y in idx's shape + [D], not a view of anything
    dB = s·Σ_t dY[t]ᵀ·A[:, idx_t]ᵀ,  dA[:, v] = s·Σ_{idx_t = v} dY[t]·B      one kernel (+ one, deterministic)
    ẏ = Ẇ[idx] + s·(Ȧ[:, idx]ᵀ·Bᵀ + A[:, idx]ᵀ·Ḃᵀ)                         forward mode, torch ops

padding_idx (-1: none) and scale_grad_by_freq change only the reverse mode (the padding column of A gets
no gradient; dA's columns are divided by the index counts), as in ``F.embedding``, whose forward-mode
rule the tangent follows. With ``create_graph=True`` (double backward, and every torch.func transform)
the backward is the same sums in differentiable torch ops. vmap: a batch of indices alone is more
indices (one call); batched tables run one call per batch element.
"""

from __future__ import annotations

import torch

from .opdef import Rules, attach_autograd, below_autograd, define, unflatten, vmap_by_loop

_kernels = None


def _k():
    """fused_lora.kernels.embedding, imported on first use (importing triton reads TRITON_INTERPRET)."""
    global _kernels
    if _kernels is None:
        from .kernels import embedding

        _kernels = embedding
    return _kernels


def _flat(idx: torch.Tensor) -> torch.Tensor:
    """The indices as the kernels read them: one contiguous row (a strided 1-D view is copied)."""
    return idx.reshape(-1).contiguous()


def _fwd(idx: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
         padding_idx: int, scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:  # fmt: skip
    """y [..., D] = W[idx] + s·A[:, idx]ᵀ·Bᵀ (one kernel); padding_idx and scale_grad_by_freq are for the backward."""
    y = _k().lora_embedding_forward(_flat(idx), weight, lora_A, lora_B, scaling, deterministic=deterministic)
    return unflatten(y, idx.shape, weight.shape[1])


def _fwd_fake(idx, weight, lora_A, lora_B, scaling, padding_idx, scale_grad_by_freq, deterministic):
    return weight.new_empty((*idx.shape, weight.shape[1]))


lora_embedding_fwd = define("lora_embedding_fwd", _fwd, _fwd_fake)


@torch.library.custom_op("fused_lora::lora_embedding_bwd", mutates_args=())
def lora_embedding_bwd(dy: torch.Tensor, idx: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                       scaling: float, padding_idx: int, counts: torch.Tensor | None, need_A: bool, need_B: bool,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dA [r, V], dB [D, r]) in the adapters' dtype, each an empty tensor when not needed (padding_idx -1: none)."""
    dA, dB = _k().lora_embedding_backward(
        dy.reshape(idx.numel(), dy.shape[-1]), _flat(idx), lora_A, lora_B, scaling,
        padding_idx=None if padding_idx < 0 else padding_idx, counts=counts, need_dA=need_A, need_dB=need_B,
        deterministic=deterministic,
    )  # fmt: skip
    return (
        dA.to(lora_A.dtype) if need_A else lora_A.new_empty(0),
        dB.to(lora_B.dtype) if need_B else lora_B.new_empty(0),
    )


@lora_embedding_bwd.register_fake
def _(dy, idx, lora_A, lora_B, scaling, padding_idx, counts, need_A, need_B, deterministic):
    return lora_A.new_empty(lora_A.shape if need_A else (0,)), lora_B.new_empty(lora_B.shape if need_B else (0,))


class EmbeddingRules(Rules):
    """The autograd of ``fused_lora::lora_embedding_fwd``: reverse mode by the kernel, a differentiable
    backward under ``create_graph=True``, forward mode in torch ops (see the module docstring)."""

    @staticmethod
    def forward(*args):
        return below_autograd(lora_embedding_fwd, *args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        idx, weight, lora_A, lora_B, scaling, padding_idx, freq, deterministic = inputs
        ctx.save_for_backward(idx, weight, lora_A, lora_B)
        ctx.save_for_forward(idx, weight, lora_A, lora_B)
        ctx.scaling, ctx.deterministic, ctx.padding_idx, ctx.freq = scaling, deterministic, padding_idx, freq

    @staticmethod
    def backward(ctx, dy):
        idx, weight, lora_A, lora_B = ctx.saved_tensors
        _, need_w, need_A, need_B = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True (and torch.func): a backward that is itself differentiable
            return (None, *_differentiable_backward(ctx, dy, idx, weight, lora_A, lora_B), None, None, None, None)
        V, pad, freq = weight.shape[0], ctx.padding_idx, ctx.freq
        counts = torch.bincount(idx.reshape(-1), minlength=V) if freq and need_A else None
        dA = dB = dW = None
        if need_A or need_B:
            dA, dB = torch.ops.fused_lora.lora_embedding_bwd(
                dy, idx, lora_A, lora_B, ctx.scaling, pad, counts, need_A, need_B, ctx.deterministic
            )
        if need_w:  # only when the caller made the table trainable
            dW = torch.ops.aten.embedding_dense_backward(dy, idx, V, pad, freq)
        return None, dW, dA if need_A else None, dB if need_B else None, None, None, None, None

    @staticmethod
    def jvp(ctx, _didx, dw, dA, dB, *_):
        idx, weight, lora_A, lora_B = ctx.saved_tensors
        return tangent(ctx.scaling, idx, weight, lora_A, lora_B, dw, dA, dB)


attach_autograd(lora_embedding_fwd, EmbeddingRules)


def _differentiable_backward(ctx, dy, idx, weight, lora_A, lora_B):
    """(dW, dA, dB) as differentiable torch ops, honouring padding_idx and scale_grad_by_freq as
    ``F.embedding``'s backward does (``embedding_dense_backward``), the low-rank products in the wider of
    the table's and the adapters' dtypes:  g = s·dY·B,  dAᵀ = scatter of g by idx,  dB = s·dYᵀ·Aᵀ[idx]."""
    _, need_w, need_A, need_B = ctx.needs_input_grad[:4]
    V, pad, freq = weight.shape[0], ctx.padding_idx, ctx.freq
    lo = torch.promote_types(weight.dtype, lora_A.dtype)
    dy_lo = dy.to(lo)
    dW = torch.ops.aten.embedding_dense_backward(dy, idx, V, pad, freq) if need_w else None
    dA = dB = None
    if need_A:
        g = (dy_lo @ lora_B.to(lo)) * ctx.scaling
        dA = torch.ops.aten.embedding_dense_backward(g, idx, V, pad, freq).t().to(lora_A.dtype)
    if need_B:
        rows = torch.nn.functional.embedding(idx, lora_A.t().to(lo)).reshape(idx.numel(), lora_A.shape[0])
        dB = ((dy_lo.reshape(idx.numel(), dy.shape[-1]).t() @ rows) * ctx.scaling).to(lora_B.dtype)
    return dW, dA, dB


def tangent(s: float, idx, weight, lora_A, lora_B, dw, dA, dB) -> torch.Tensor:
    """ẏ = Ẇ[idx] + s·(Ȧ[:, idx]ᵀ·Bᵀ + A[:, idx]ᵀ·Ḃᵀ) in W's dtype, rounded as the reference rounds y
    (the low-rank terms in the wider of the table's and the adapters' dtypes, one rounding of the sum)."""
    lo = torch.promote_types(weight.dtype, lora_A.dtype)
    main = torch.nn.functional.embedding(idx, dw) if dw is not None else None
    low = []
    if dA is not None:
        low.append(torch.nn.functional.embedding(idx, dA.t().to(lo)) @ lora_B.t().to(lo) * s)
    if dB is not None:
        low.append(torch.nn.functional.embedding(idx, lora_A.t().to(lo)) @ dB.t().to(lo) * s)
    if not low:
        return main
    low = sum(low[1:], low[0])
    if main is None:
        return low.to(weight.dtype)
    return (main + low) if low.dtype == main.dtype else (main.to(lo) + low).to(weight.dtype)


@torch.library.register_vmap("fused_lora::lora_embedding_fwd")
def _fwd_vmap(info, in_dims, idx, weight, lora_A, lora_B, scaling, padding_idx, freq, deterministic):
    """A batch of indices alone is more indices: one call. Batched tables: one call per batch element."""
    args = [idx, weight, lora_A, lora_B, scaling, padding_idx, freq, deterministic]
    if in_dims[0] is not None and all(d is None for d in in_dims[1:]):
        args[0] = idx.movedim(in_dims[0], 0)
        return lora_embedding_fwd(*args), 0
    return vmap_by_loop(lora_embedding_fwd)(info, in_dims, *args)


lora_embedding_bwd.register_vmap(vmap_by_loop(lora_embedding_bwd))


class LoRAEmbeddingFunction:
    """The fused embedding with the checks already done: ``LoRAEmbeddingFunction.apply(idx, weight, lora_A,
    lora_B, scaling, padding_idx, scale_grad_by_freq, deterministic)``, differentiable (reverse and forward
    mode, torch.func) through the custom operator ``fused_lora::lora_embedding_fwd`` (what torch.compile
    sees). y is idx's shape + [D], and not a view."""

    @staticmethod
    def apply(idx, weight, lora_A, lora_B, scaling: float, padding_idx, scale_grad_by_freq, deterministic):
        pad = -1 if padding_idx is None else padding_idx
        return lora_embedding_fwd(idx, weight, lora_A, lora_B, scaling, pad, bool(scale_grad_by_freq), deterministic)
