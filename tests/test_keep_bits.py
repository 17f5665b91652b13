"""The packed keep bits (fused_lora/kernels/dropout.py): the dA pass stores x's dropout mask, 1 bit per
element, as it regenerates it, and the dX epilogue (fused GEMM, and the hybrid's low-rank kernel) reads it
instead of running Philox again.

- the bits are the kernels' mask (the [M, K] bool of ``dropout_mask``) bit for bit, whichever stores them
  (the small kernel, the grad pass unsplit, split, deterministic, with the rank split across programs);
- dX and T read through the bits are the same as before, bit for bit, and a flipped bit changes them
  (the epilogue really reads the bits);
- a training step stores them once and hands them to dX; bad buffers are clear errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fused_lora
from fused_lora.kernels import LAUNCHES, configs, dropout_mask, keep_bits, lora_gemm, low_rank, new_keep_bits, tuning
from fused_lora.function import _draw_seed
from fused_lora.kernels.dropout import effective_dropout_p

from helpers import assert_close_to_ref
from test_grad_split import _inputs

grad_module = importlib.import_module("fused_lora.kernels.lora_grad")  # the package exports the function by that name
SEED = torch.tensor([987654321], dtype=torch.int64)


def unpack(bits: torch.Tensor, K: int) -> torch.Tensor:
    """int32 [M, W] -> bool [M, K]: bit b of word w = column 32w + b (the reference unpacking)."""
    w = bits.to(torch.int64) & 0xFFFFFFFF
    return ((w[:, :, None] >> torch.arange(32)) & 1).reshape(bits.shape[0], -1)[:, :K].bool()


@pytest.mark.parametrize("M, K, p", [(1, 1, 0.5), (5, 45, 0.3), (33, 100, 0.1), (16, 64, 0.9), (7, 257, 0.02)])
def test_packed_bits_are_the_kernels_mask(M, K, p):
    bits = keep_bits(SEED, M, K, p)
    assert bits.dtype == torch.int32 and bits.shape == (M, -(-K // 32))
    want = dropout_mask(SEED, M, K, p)
    got = unpack(bits, K)
    assert torch.equal(got, want), (got != want).nonzero()[:5]


@pytest.mark.parametrize(
    "choice, deterministic, r",
    [(0, False, 5), (1, False, 5), (0, True, 5), (0, False, 70), ("split3", False, 5), ("split2", True, 12)],
)
def test_the_grad_pass_stores_the_mask_as_it_goes(choice, deterministic, r):
    """Configuration 0 (16 rows x 32 columns) packs in the dA pass; configuration 1 (16-column tiles)
    leaves it to the small kernel: the bits are the same either way, and so are g, dA, dB."""
    M, N, K, p = 37, 50, 130, 0.3
    dy, B, xa, x = _inputs(M, N, K, r, torch.float32, torch.float32)
    name = configs.name(configs.GRAD_INTERPRET[0 if isinstance(choice, str) else choice])
    if isinstance(choice, str):
        name += " " + choice
    bits = torch.full((M, -(-K // 32)), -1, dtype=torch.int32)
    with tuning.force("grad", name):
        before = LAUNCHES.copy()
        got = grad_module.lora_grad(dy, B, xa, x, scaling=0.5, dropout_p=p, seed=SEED, deterministic=deterministic,
                                    keep_bits_out=bits)  # fmt: skip
        launched = LAUNCHES - before
        plain = grad_module.lora_grad(dy, B, xa, x, scaling=0.5, dropout_p=p, seed=SEED, deterministic=deterministic)
    assert torch.equal(bits, keep_bits(SEED, M, K, p)), "the stored bits are not the small kernel's"
    assert torch.equal(unpack(bits, K), dropout_mask(SEED, M, K, p))
    tiles_pack = configs.GRAD_INTERPRET[0 if isinstance(choice, str) else choice].BLOCK_N % 32 == 0
    if not deterministic:  # deterministic mode runs its fixed entry, whichever that is
        assert launched["_keep_bits_kernel"] == (0 if tiles_pack else 1), launched
    for a, b in zip(got, plain):
        assert torch.equal(a, b)


def test_without_da_the_small_kernel_draws_the_bits():
    M, N, K, r, p = 20, 24, 70, 3, 0.4
    dy, B, xa, x = _inputs(M, N, K, r, torch.float32, torch.float32)
    bits = new_keep_bits(M, K, x.device)
    before = LAUNCHES.copy()
    g, dA, dB = grad_module.lora_grad(dy, B, xa, x, scaling=1.0, dropout_p=p, seed=SEED, need_dA=False,
                                      keep_bits_out=bits)  # fmt: skip
    assert dA is None and (LAUNCHES - before)["_keep_bits_kernel"] == 1
    assert torch.equal(bits, keep_bits(SEED, M, K, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_and_t_read_through_the_bits(dtype):
    """dX = dY·W + mask⊙(g·A) and the hybrid's T = mask⊙(g·A) with the bits handed in equal those drawn
    from the seed (the launcher's own bits), bit for bit, and the fp64 reference by the parity rule; a
    flipped bit changes the one element it covers."""
    M, N, K, r, p = 37, 29, 70, 5, 0.3
    g = torch.Generator().manual_seed(1)
    dy, W = torch.randn(M, N, generator=g).to(dtype), (torch.randn(N, K, generator=g) / 4).to(dtype)
    gl, A = torch.randn(M, r, generator=g), torch.randn(r, K, generator=g) / 4
    bits = keep_bits(SEED, M, K, p)
    mask = dropout_mask(SEED, M, K, p)
    dx_seed = lora_gemm(dy, W, gl, A, dropout_p=p, seed=SEED)
    dx_bits = lora_gemm(dy, W, gl, A, dropout_p=p, seed=None, keep_bits=bits)
    assert torch.equal(dx_seed, dx_bits)
    ref = dy.double() @ W.double() + mask.double() * (gl.double() @ A.double())
    same = (dy.float() @ W.float() + mask.float() * (gl @ A)).to(dtype)
    assert_close_to_ref("dX through the bits", dx_bits, ref, same)
    t = low_rank(gl, A, out_dtype=torch.float32, dropout_p=p, keep_bits=bits)
    assert torch.equal(t, low_rank(gl, A, out_dtype=torch.float32, dropout_p=p, seed=SEED))
    torch.testing.assert_close(t, (mask.float() * (gl @ A)), rtol=1e-5, atol=1e-5)
    flipped = bits.clone()
    flipped[3, 1] ^= 1 << 4  # row 3, column 36
    changed = (lora_gemm(dy, W, gl, A, dropout_p=p, keep_bits=flipped) != dx_bits).nonzero().tolist()
    assert changed == [[3, 36]], changed


def test_bad_bits_are_clear_errors():
    M, K, p = 8, 40, 0.2
    dy, W, gl, A = torch.randn(M, 16), torch.randn(16, K), torch.randn(M, 3), torch.randn(3, K)
    for bad, what in ((torch.zeros(M, 1, dtype=torch.int32), r"\[8, 2\]"),
                      (torch.zeros(M, 2, dtype=torch.int64), "int32"),
                      (torch.zeros(2, M, dtype=torch.int32).t(), "contiguous")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            lora_gemm(dy, W, gl, A, dropout_p=p, keep_bits=bad)
        with pytest.raises(ValueError, match="keep_bits"):
            grad_module.lora_grad(torch.randn(M, 16), torch.randn(16, 3), torch.randn(M, 3), torch.randn(M, K),
                                  scaling=1.0, dropout_p=p, seed=SEED, keep_bits_out=bad)  # fmt: skip
    with pytest.raises(ValueError, match="seed"):
        lora_gemm(dy, W, gl, A, dropout_p=p)


@pytest.mark.parametrize("impl", ["fused", "hybrid"])
def test_a_training_step_stores_the_bits_once_and_dx_reads_them(impl, monkeypatch):
    """lora_linear with dropout: the backward's grad pass stores the bits (no extra kernel), dX's launcher
    gets them, and the gradients equal the reference backend's with the same seed (the kernels' mask)."""
    import fused_lora.kernels as k

    seen = []
    for name in ("lora_gemm", "low_rank"):
        real = getattr(k, name)

        def spy(*args, _real=real, _name=name, **kw):
            if kw.get("dropout_p", 0) > 0:
                seen.append((_name, kw.get("keep_bits") is not None))
            return _real(*args, **kw)

        monkeypatch.setattr(k, name, spy)
    M, K, N, r, p, s = 24, 40, 18, 4, 0.25, 0.5
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, K, generator=g).requires_grad_()
    W = torch.randn(N, K, generator=g) / 4
    A = (torch.randn(r, K, generator=g) / 4).requires_grad_()
    B = (torch.randn(N, r, generator=g) / 4).requires_grad_()
    torch.manual_seed(11)
    before = LAUNCHES.copy()
    grad_name = configs.name(configs.GRAD_INTERPRET[0])  # 32-column tiles: the dA pass packs
    with fused_lora.use_impl(impl), tuning.force("grad", grad_name):
        fused_lora.lora_linear(x, W, A, B, s, None, p, training=True).square().sum().backward()
    launched = LAUNCHES - before
    assert seen == [("lora_gemm" if impl == "fused" else "low_rank", True)], seen
    assert launched["_keep_bits_kernel"] == 0 and launched["_lora_grad_kernel"] == 1, launched
    torch.manual_seed(11)
    mask = dropout_mask(_draw_seed(x.device), M, K, p)

    def truth(dt):
        xs, Ws, As, Bs = (t.detach().to(dt).requires_grad_() for t in (x, W, A, B))
        y = xs @ Ws.t() + s / (1 - effective_dropout_p(p)) * ((xs * mask.to(dt)) @ As.t()) @ Bs.t()
        y.square().sum().backward()
        return xs.grad, As.grad, Bs.grad

    for name, got, ref, same in zip(("dX", "dA", "dB"), (x.grad, A.grad, B.grad), truth(torch.float64),
                                    truth(torch.float32)):  # fmt: skip
        assert_close_to_ref(name, got, ref, same)
