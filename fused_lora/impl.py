"""Two implementations of the same fused Function, and the per-shape choice between them.

    fused   our persistent GEMM adds the low-rank term in its epilogue (kernels.lora_gemm): nothing
            [M, N]-sized besides the output is written or read.
    hybrid  a small kernel writes the low-rank term C = mask⊙(L·R) + bias as an [M, N] tensor
            (kernels.low_rank) and cuBLAS finishes: y = addmm(C, x, Wᵀ), dX = addmm(T, dY, W). One
            [M, N] write and read more, traded for cuBLAS's main loop: the safety net where our GEMM
            loses (small M, shapes our tiles fit badly, GPUs we have not tuned for). With bf16
            activations C is rounded to bf16 before cuBLAS adds x·Wᵀ: one rounding more than the
            fused GEMM makes, of the size of the term's own 16-bit rounding (bf16 has fp32's range:
            that C cannot overflow). With fp16 activations — fp16 or fp32 adapters alike — an fp16 C
            could overflow where the fused GEMM's fp32 accumulator does not (the term beyond 65504
            while y, after cancelling with x·Wᵀ, is not), so there C (T) is written in fp32, cuBLAS's
            fp32-output addmm adds x·Wᵀ and one cast rounds the sum, as the fused GEMM does: the two
            implementations then give the same finite answer, and `auto`'s choice cannot turn it into
            inf. Twice C's traffic and a cast more, which `auto` weighs when it times the two.

Both use the same shrink and grad kernels, save the same tensors (x, xa, the seed) and draw the same
dropout mask, so the choice can differ between forward and backward, and between shapes.

    auto     (default) time both on the first call of each (GPU, direction, dtypes, M bucket, N, K, r,
             dropout, bias) and keep the faster, in memory and on disk (kernels.tuning); inside a CUDA
             graph capture, a problem not yet timed runs `fused` (untimed, not cached); deterministic
             mode (``torch.use_deterministic_algorithms``) always runs `fused` (no atomics, one fixed
             configuration; cuBLAS's choice of algorithm may change with the workspace).
    fused    / hybrid: force one.

Chosen, most specific first, by :func:`use_impl` (this thread / task), :func:`set_impl` (process),
the environment variable ``FUSED_LORA_IMPL``, then ``auto``. The setting is read when a forward runs
and the backward of that forward follows it (autograd may run a backward on another thread — on CUDA
it does —, which would not see a ``use_impl`` block of the forward's thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .setting import Setting

IMPLS = ("auto", "fused", "hybrid")
ENV_VAR = "FUSED_LORA_IMPL"
_SETTING = Setting("impl", IMPLS, ENV_VAR)


def set_impl(name: str | None) -> None:
    """Force an implementation for this process ('auto', 'fused', 'hybrid'); None returns to the
    environment variable / auto."""
    _SETTING.set(name)


def get_impl() -> str:
    """The configured implementation name (before 'auto' is resolved for a problem). Read when a
    forward runs and carried to its backward; under torch.compile read once, when a graph is traced."""
    return _SETTING.get()


get_impl._dynamo_marked_constant = True  # type: ignore[attr-defined]  # as backend.resolve_backend


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """``with use_impl("hybrid"): ...`` runs the block (in this thread / task only) with that implementation."""
    with _SETTING.use(name):
        yield


def forward_gemm(k, x2, weight, xa, lora_B, bias, deterministic: bool, groups=None, name=None,
                 col_scale=None) -> torch.Tensor:  # fmt: skip
    """y [M, N] = (x·Wᵀ + xa·Bᵀ) ⊙ col_scale + bias, by the implementation chosen for this problem
    (`groups`: see kernels.lora_gemm; `name`: the configured implementation, :func:`get_impl` when None;
    `col_scale`: DoRA's fp32 [N] m/n, without bias or groups — the fused GEMM applies it in its
    epilogue, the hybrid in a pass over cuBLAS's x·Wᵀ that also adds the low-rank term)."""

    def fused():
        return k.lora_gemm(x2, weight.t(), xa, lora_B.t(), bias=bias, deterministic=deterministic, groups=groups,
                           col_scale=col_scale)  # fmt: skip

    def hybrid():
        if col_scale is not None:  # a per-column scale cannot ride on addmm: cuBLAS first, then the term and c
            if _wide(x2.dtype):
                base = mm_fp32(x2, weight.t())
                return k.low_rank(xa, lora_B.t(), out_dtype=x2.dtype, base=base, col_scale=col_scale, x_dtype=x2.dtype)
            # not in place: the tuner may run this candidate several times on the same inputs
            base = torch.mm(x2, weight.t())
            return k.low_rank(xa, lora_B.t(), out_dtype=x2.dtype, base=base, col_scale=col_scale)
        if _wide(x2.dtype):
            c = k.low_rank(xa, lora_B.t(), out_dtype=torch.float32, bias=bias, groups=groups, x_dtype=x2.dtype)
            return addmm_fp32(c, x2, weight.t()).to(x2.dtype)
        c = k.low_rank(xa, lora_B.t(), out_dtype=x2.dtype, bias=bias, groups=groups)
        return c.addmm_(x2, weight.t())

    M, K, N, r = x2.shape[0], x2.shape[1], weight.shape[0], lora_B.shape[1]
    key = ("fwd", x2.dtype, lora_B.dtype, M, N, K, r, 0.0, bias is not None)
    if col_scale is not None:  # DoRA's variants are timed apart from LoRA's
        key = ("fwd-dora", *key[1:])
    return _run(key, fused, hybrid, deterministic, x2.device, name)


def backward_dx(k, dy2, weight, g, lora_A, dropout_p: float, seed, deterministic: bool, name=None,
                keep_bits=None) -> torch.Tensor:  # fmt: skip
    """dX [M, K] = dY·W + mask⊙(g·A), by the implementation chosen for this problem (`name`: the
    implementation configured when the forward ran — the backward may run on another thread, which does
    not see a ``use_impl`` block of the forward's; :func:`get_impl` when None). `keep_bits`: the mask
    packed (fused_lora/kernels/dropout.py), read instead of regenerated from `seed`."""

    def fused():
        return k.lora_gemm(dy2, weight, g, lora_A, dropout_p=dropout_p, seed=seed, keep_bits=keep_bits,
                           deterministic=deterministic)  # fmt: skip

    def hybrid():
        if _wide(dy2.dtype):
            t = k.low_rank(g, lora_A, out_dtype=torch.float32, dropout_p=dropout_p, seed=seed, keep_bits=keep_bits,
                           x_dtype=dy2.dtype)  # fmt: skip
            return addmm_fp32(t, dy2, weight).to(dy2.dtype)
        t = k.low_rank(g, lora_A, out_dtype=dy2.dtype, dropout_p=dropout_p, seed=seed, keep_bits=keep_bits)
        return t.addmm_(dy2, weight)

    M, N, K, r = dy2.shape[0], dy2.shape[1], weight.shape[1], lora_A.shape[0]
    key = ("bwd", dy2.dtype, lora_A.dtype, M, K, N, r, dropout_p, False)
    return _run(key, fused, hybrid, deterministic, dy2.device, name)


def _wide(x_dtype: torch.dtype) -> bool:
    """fp16 activations (with fp16 or fp32 adapters): the low-rank term, which the kernels form in fp32
    (kernels.precision: fp16 adapters never see an fp32 intermediate cast to fp16), may exceed fp16's
    range where y does not (cancellation with x·Wᵀ), so C must stay fp32, as the fused GEMM's accumulator
    does. bf16 has fp32's range: its C cannot overflow, and keeps the cheaper 16-bit C (see the module
    docstring)."""
    return x_dtype == torch.float16


def addmm_fp32(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a·b in fp32 for fp32 c and 16-bit a, b: cuBLAS's fp32-output GEMM (``addmm(..., out_dtype=
    torch.float32)``, CUDA, torch >= 2.8) where there is one; elsewhere (CPU under the interpreter, older
    torch) the same sum from a and b cast to fp32 (exact casts, slower)."""
    if c.device.type == "cuda":
        try:
            return torch.addmm(c, a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):  # no out_dtype, or not for these operands
            pass
    return c.addmm_(a.float(), b.float())


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b in fp32 for 16-bit a, b: cuBLAS's fp32-output GEMM where there is one (as :func:`addmm_fp32`)."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError, RuntimeError):
            pass
    return a.float() @ b.float()


def resolve(key: tuple, deterministic: bool, device: torch.device, bench=None, name: str | None = None) -> str:
    """'fused' or 'hybrid' for a problem `key` (direction, dtypes, M, N, K, r, p, bias), under the
    configured implementation `name` (default :func:`get_impl`)."""
    name = get_impl() if name is None else _SETTING.check(name, "impl")
    if name != "auto":
        return name
    if deterministic or device.type == "meta":
        return "fused"
    from .kernels import tuning
    from .kernels.utils import bucket, rank_pad

    direction, x_dtype, a_dtype, M, N, K, r, p, has_bias = key
    table_key = (direction, str(x_dtype), str(a_dtype), bucket(M), N, K, rank_pad(r), p > 0, has_bias)
    return tuning.table("impl").pick(table_key, ["fused", "hybrid"], bench, device)


def _run(key, fused, hybrid, deterministic: bool, device: torch.device, name: str | None) -> torch.Tensor:
    impls = {"fused": fused, "hybrid": hybrid}
    return impls[resolve(key, deterministic, device, bench=lambda n: impls[n], name=name)]()
