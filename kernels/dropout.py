"""Dropout masks regenerated from a seed, never stored.

Element (m, k) of x [M, K] is kept when a Philox4x32-10 draw exceeds p. The counter is
(k // 4, m, 0, 0) under the key `seed`; one Philox call yields four words, used for columns
4·(k // 4) + 0..3. Because the counter names the element (not the tile, not the program), every kernel
that regenerates the mask, whatever its tile shape, gets the same bits: the forward shrink, the dX
epilogue and the dA pass agree by construction. Rows and column-quads are separate 32-bit counter
words, so tensors with more than 2^32 elements never reuse a draw.

keep(m, k) = (philox(...)[k % 4] >> 1) >= threshold,   threshold = floor(p · 2^31)   P(keep) = 1 - p

The threshold is an integer computed on the host (:func:`drop_threshold`), so the interpreter and the GPU
draw exactly the same mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch


@triton.jit
def keep_mask(seed, offs_m, k_start, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K]: which of x[offs_m, k_start : k_start + BLOCK_K] survive dropout.

    k_start must be a multiple of 4 (every tile start is: blocks are powers of two >= 16)."""
    quads = (k_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    rows = offs_m.to(tl.uint32)
    c0 = tl.broadcast_to(quads[None, :], (BLOCK_M, BLOCK_K // 4))
    c1 = tl.broadcast_to(rows[:, None], (BLOCK_M, BLOCK_K // 4))
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # Interleave so that column 4q + j takes word j of quad q: join adds a minor axis of size 2.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return (bits >> 1).to(tl.int32) >= threshold


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
    """floor(p · 2^31): an element is dropped when its 31-bit draw falls below it."""
    return int(float(dropout_p) * 2147483648.0)


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
