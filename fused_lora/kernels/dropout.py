"""Dropout masks regenerated from a seed, never stored: 16 random bits per element.

Element (m, k) of x [M, K] draws from Philox4x32-10 under the key `seed` with the counter
(k // 8, m, 0, 0). One call yields four 32-bit words w0..w3; each word gives two 16-bit draws, its low
and its high half, so one call serves the 8 columns 8·(k // 8) + 0..7:

    column 8q + 2j + h  <-  half h (0: low, 1: high) of word j of call (q, m)

Because the counter names the element (not the tile, not the program), every kernel that regenerates
the mask, whatever its tile shape, gets the same bits: the forward shrink, the dX epilogue and the dA
pass agree by construction, and so does the hybrid implementation. Rows and column-octets are separate
32-bit counter words, so tensors with more than 2^32 elements never reuse a draw.

    keep(m, k) = draw16(m, k) >= t,   t = round(p · 2^16)   P(drop) = t / 2^16

So p is quantised to a multiple of 2^-16 (|error| <= 2^-17: p = 0.1 drops with probability
6554/65536 = 0.1000061); kept values are scaled by the exact 1/(1 - p), which biases E[drop(x)] by at most
2^-17/(1 - p) relative. Sixteen bits instead of 32 halve the Philox calls per element (one call per 8
elements, ~10 integer ops per element) and nothing else changes. t is an integer computed on the host
(:func:`drop_threshold`), so the interpreter and the GPU draw exactly the same mask.

drop(x) multiplies by the mask (x·keep·scale), as torch's dropout does: a NaN or inf at a dropped
position stays NaN, as in the reference and in PEFT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch

DRAW_BITS = 16


@triton.jit
def keep_mask(seed, offs_m, k_start, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K]: which of x[offs_m, k_start : k_start + BLOCK_K] survive dropout.

    k_start must be a multiple of 8 (every tile start is: blocks are powers of two >= 16)."""
    octets = (k_start // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)
    c0 = tl.broadcast_to(octets[None, :], (BLOCK_M, BLOCK_K // 8))
    c1 = tl.broadcast_to(offs_m.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_K // 8))
    zero = c0 * 0
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero)
    # join adds a minor axis of size 2: join(join(a, c), join(b, d)) orders a, b, c, d, so `lo` and `hi`
    # hold words 0..3 in order and the outer join interleaves their halves: column 8q + 2j + h.
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    bits = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
    return bits.to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(
    seed_ptr,
    out_ptr,  # pointers: int64 [1] seed, int8 [M, K] output
    M,
    K,
    stride_om,  # sizes and strides
    threshold,  # drop_threshold(p)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # meta-parameters
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = keep_mask(tl.load(seed_ptr), offs_m, pid_k * BLOCK_K, threshold, BLOCK_M, BLOCK_K)
    ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


def drop_threshold(dropout_p: float) -> int:
    """round(p · 2^16): an element is dropped when its 16-bit draw falls below it."""
    return round(float(dropout_p) * (1 << DRAW_BITS))


def effective_dropout_p(dropout_p: float) -> float:
    """The probability with which the kernels actually drop an element (p quantised to 2^-16)."""
    return drop_threshold(dropout_p) / (1 << DRAW_BITS)


def dropout_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the kernels use for an x of [M, K] under `seed`, as a bool tensor [M, K].

    For tests and debugging only: the training path never materialises it."""
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    if M == 0 or K == 0:
        return out.bool()
    block_m, block_k = (16, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    launch(
        _dropout_mask_kernel,
        grid,
        seed,
        out,
        M,
        K,
        out.stride(0),
        drop_threshold(dropout_p),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    return out.bool()
