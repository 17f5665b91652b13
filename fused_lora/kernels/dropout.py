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

**Packed keep bits** (the backward's shortcut): the dA pass regenerates the whole [M, K] mask anyway, so
it also stores it packed, int32 [M, ⌈K/32⌉] with

    bit b of word w of row m  =  keep(m, 32w + b)        (byte q of the row: column-octet q, bit 2j + h
                                                          from half h of Philox word j; past K: draws too)

4.2 MB at 8192 × 4096, alive only between the dA pass and the dX GEMM of the same backward; the dX
epilogue then reads 1 bit per element instead of running Philox (:func:`load_keep_bits`; tile starts
along K must be multiples of 32). Nothing extra is kept for backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, launch

DRAW_BITS = 16


@triton.jit
def philox_words(seed, offs_m, k_start, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The four Philox words of every (row, column-octet) of the tile: uint32 [BLOCK_M, BLOCK_K // 8] each."""
    octets = (k_start // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)
    c0 = tl.broadcast_to(octets[None, :], (BLOCK_M, BLOCK_K // 8))
    c1 = tl.broadcast_to(offs_m.to(tl.uint32)[:, None], (BLOCK_M, BLOCK_K // 8))
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero, zero)


@triton.jit
def keep_from_words(w0, w1, w2, w3, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K] from :func:`philox_words`: column 8q + 2j + h <- half h of word j."""
    # join adds a minor axis of size 2: join(join(a, c), join(b, d)) orders a, b, c, d, so `lo` and `hi`
    # hold words 0..3 in order and the outer join interleaves their halves: column 8q + 2j + h.
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    bits = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
    return bits.to(tl.int32) >= threshold


@triton.jit
def bytes_from_words(w0, w1, w2, w3, threshold):
    """The packed keep bits of each column-octet, uint8 [BLOCK_M, BLOCK_K // 8] from :func:`philox_words`:
    bit 2j + h = column 8q + 2j + h, computed where the words are (no layout change)."""
    b = ((w0 & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32)
    b |= ((w0 >> 16).to(tl.int32) >= threshold).to(tl.int32) << 1
    b |= ((w1 & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32) << 2
    b |= ((w1 >> 16).to(tl.int32) >= threshold).to(tl.int32) << 3
    b |= ((w2 & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32) << 4
    b |= ((w2 >> 16).to(tl.int32) >= threshold).to(tl.int32) << 5
    b |= ((w3 & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32) << 6
    b |= ((w3 >> 16).to(tl.int32) >= threshold).to(tl.int32) << 7
    return b.to(tl.uint8)


@triton.jit
def keep_mask(seed, offs_m, k_start, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K]: which of x[offs_m, k_start : k_start + BLOCK_K] survive dropout.

    k_start must be a multiple of 8 (every tile start is: blocks are powers of two >= 16)."""
    w0, w1, w2, w3 = philox_words(seed, offs_m, k_start, BLOCK_M, BLOCK_K)
    return keep_from_words(w0, w1, w2, w3, threshold, BLOCK_M, BLOCK_K)


@triton.jit
def store_keep_bytes(bits_ptr, w0, w1, w2, w3, threshold, offs_m, k_start, M, words, write,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    """Store the tile's packed keep bits (rows < M, the 4·`words` bytes of each row; `write`: whether this
    program writes at all) into the int32 [M, words] buffer, byte by byte (little-endian words)."""
    offs_q = k_start // 8 + tl.arange(0, BLOCK_K // 8)
    byte_ptr = bits_ptr.to(tl.pointer_type(tl.uint8), bitcast=True)
    tl.store(byte_ptr + offs_m[:, None].to(tl.int64) * (4 * words) + offs_q[None, :],
             bytes_from_words(w0, w1, w2, w3, threshold),
             mask=(offs_m[:, None] < M) & (offs_q[None, :] < 4 * words) & write)  # fmt: skip


@triton.jit
def load_keep_bits(bits_ptr, offs_m, k_start, M, words, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """bool [BLOCK_M, BLOCK_K]: keep(offs_m, k_start : k_start + BLOCK_K) read from packed words (int32
    [M, words], contiguous rows); k_start a multiple of 32. Rows >= M and words >= `words` read 0."""
    offs_w = k_start // 32 + tl.arange(0, BLOCK_K // 32)
    w = tl.load(bits_ptr + offs_m[:, None].to(tl.int64) * words + offs_w[None, :],
                mask=(offs_m[:, None] < M) & (offs_w[None, :] < words), other=0)  # fmt: skip
    bits = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)) != 0


@triton.jit(do_not_specialize=["threshold"])
def _keep_bits_kernel(seed_ptr, out_ptr, M, K, words, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    w0, w1, w2, w3 = philox_words(tl.load(seed_ptr), offs_m, k0, BLOCK_M, BLOCK_K)
    store_keep_bytes(out_ptr, w0, w1, w2, w3, threshold, offs_m, k0, M, words, True, BLOCK_K)


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


def check_keep_bits(bits: torch.Tensor | None, M: int, K: int, device: torch.device) -> torch.Tensor | None:
    """`bits` when it is the packed mask of an [M, K] x (int32 [M, ⌈K/32⌉], contiguous, on `device`), None
    for None; anything else is a ValueError naming the shapes."""
    if bits is None:
        return None
    want = (M, keep_bits_words(K))
    if bits.dtype != torch.int32 or tuple(bits.shape) != want or not bits.is_contiguous() or bits.device != device:
        raise ValueError(f"keep_bits must be a contiguous int32 {list(want)} tensor on {device} (an x of [{M}, {K}]), "
                         f"got {bits.dtype} {list(bits.shape)} on {bits.device}")
    return bits


def mask_bits(bits: torch.Tensor | None, seed: torch.Tensor | None, M: int, K: int, dropout_p: float,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    """The packed mask a dropout epilogue reads: `bits` (checked), or drawn from `seed` now."""
    if bits is not None:
        return check_keep_bits(bits, M, K, device)
    if seed is None:
        raise ValueError("dropout_p > 0 needs the seed (or its packed keep bits)")
    return keep_bits(seed, M, K, dropout_p)


def new_keep_bits(M: int, K: int, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer for the packed mask of an [M, K] x."""
    return torch.empty((M, keep_bits_words(K)), dtype=torch.int32, device=device)


def keep_bits_words(K: int) -> int:
    """Words per row of the packed keep bits of an x with K columns."""
    return triton.cdiv(K, 32)


def keep_bits(seed: torch.Tensor, M: int, K: int, dropout_p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The kernels' keep-mask for an x of [M, K] under `seed`, packed: int32 [M, ⌈K/32⌉] (module
    docstring), into `out` when given. The dA pass stores the same bits as it goes; this kernel serves a
    grad configuration whose tiles are narrower than 32 columns, and tests."""
    words = keep_bits_words(K)
    if out is None:
        out = torch.empty((M, words), dtype=torch.int32, device=seed.device)
    if M == 0 or words == 0:
        return out
    block_m, block_k = (16, 32) if interpreting() else (32, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(32 * words, block_k))  # every byte of every word
    launch(_keep_bits_kernel, grid, seed, out, M, K, words, drop_threshold(dropout_p), BLOCK_M=block_m,
           BLOCK_K=block_k)  # fmt: skip
    return out
