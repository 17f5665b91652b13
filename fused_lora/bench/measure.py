"""Measurements shared by the benchmark and the tests: time, peak memory, bytes kept for backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F


def saved_for_backward(fn: Callable[[], object], exclude: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors autograd saves while running fn(), minus those that are (views of) `exclude` — the
    parameters and the input, which exist anyway. Deduplicated; meta tensors compare by identity."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    owned = list(exclude)
    out: list[torch.Tensor] = []
    for t in saved:
        if not _shares_memory(t, owned) and not _shares_memory(t, out):
            out.append(t)
    return out


@contextlib.contextmanager
def cuda_dropout() -> Iterator[None]:
    """Inside: ``F.dropout`` in training dispatches as it does on a CUDA tensor, whatever the device.

    ``at::dropout`` runs ``native_dropout`` (which keeps a **bool** mask for backward: 1 byte per element)
    when ``train`` and the tensor is on CUDA (or XPU, lazy, a private-use backend) with 0 < p < 1 and
    elements; on the CPU and the meta device it multiplies by a noise tensor in the input's dtype, which
    autograd keeps (2 bytes per element in bf16, 4 in fp32). Measuring on the meta device inside this
    block gives what a GPU run keeps (nn.Dropout calls ``F.dropout`` by its module attribute)."""
    original = F.dropout

    def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not (training and 0 < p < 1 and input.numel() > 0):
            return original(input, p, training, inplace)
        out = torch.native_dropout(input, p, training)[0]
        return input.copy_(out) if inplace else out

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original


@contextlib.contextmanager
def cuda_attention() -> Iterator[None]:
    """Inside: ``F.scaled_dot_product_attention`` on the meta device runs as a CUDA flash-attention kernel
    does, so that what autograd keeps is what a GPU run keeps.

    On the CPU and the meta device SDPA without a mask may take the math path, which keeps the
    [batch, heads, seq, seq] scores and probabilities for backward (GBs at seq 2048); CUDA's flash
    attention (which takes grouped-query key/value heads as they are) keeps q, k, v, the output, an fp32
    logsumexp [batch, heads, seq] and its RNG state. A meta call without a mask, dropout or a custom
    scale shape is routed to ``aten._scaled_dot_product_flash_attention``; any other call is left alone.
    (transformers calls SDPA through the module attribute, which is what is replaced.)"""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or attn_mask is not None:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)  # fmt: skip
        if key.shape[-3] != query.shape[-3] and not enable_gqa:
            raise ValueError(f"query has {query.shape[-3]} heads, key {key.shape[-3]}: needs enable_gqa=True")
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                 scale=scale)  # fmt: skip
        return out[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _shares_memory(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """t is one of `others` or a view of one. Meta tensors have no addresses: identity and view bases."""
    base = t
    while base is not None:
        if any(base is o or base is o._base for o in others):
            return True
        base = base._base
    if t.device.type == "meta":
        return False
    ptr = t.untyped_storage().data_ptr()
    return any(o.device == t.device and ptr == o.untyped_storage().data_ptr() for o in others)


def nbytes(ts: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def time_ms(
    fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None, warmup: int = 25, rep: int = 100
) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds by triton.testing.do_bench (CUDA events, L2 flushed between runs)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(p20), float(p80)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated during fn() above what was allocated before it (CUDA only)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
