"""Forward and all three gradients of the fused path against the float64 reference.

Runs the Triton kernels: under the interpreter on CPU tensors in CI, compiled on CUDA tensors when a GPU
is present. Shapes are odd (no multiple of any block), ranks are not all powers of two, with and without
bias and dropout; dropout uses the kernels' own mask, regenerated from the same seed.
"""

from __future__ import annotations

import pytest
import torch

import fused_lora
from fused_lora import reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import LAUNCHES, dropout_mask

from helpers import assert_close_to_ref, f64, lora_inputs

RANKS = [1, 7, 16, 64, 128]
# (x/W dtype, adapter dtype): plain fp32, plain fp16, and PEFT's mixed precision (fp32 adapters).
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16+fp32A"]


def run_fused(x, w, a, b, bias, s, p, dy, seed_value=1234):
    """y and the grads of x, A, B through lora_linear; the seed and mask the kernels used."""
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    torch.manual_seed(seed_value)
    y = fused_lora.lora_linear(x, w, a, b, s, bias=bias, dropout_p=p, training=True)
    y.backward(dy)
    mask = None
    if p > 0:
        torch.manual_seed(seed_value)
        seed = _draw_seed(x.device)
        mask = dropout_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).reshape(x.shape)
    return y.detach(), x.grad, a.grad, b.grad, mask


def run_reference(x, w, a, b, bias, s, p, dy, mask):
    """The same through reference.lora_linear's autograd, in whatever dtype the inputs have (CPU)."""
    x, w, a, b, bias, dy = (t.detach().cpu() if t is not None else None for t in (x, w, a, b, bias, dy))
    mask = mask.cpu() if mask is not None else None
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = reference.lora_linear(x, w, a, b, s, bias=bias, dropout_p=p, dropout_mask=mask)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


def check_parity(x, w, a, b, bias, s, p):
    dy = torch.randn(*x.shape[:-1], w.shape[0]).to(device=x.device, dtype=x.dtype)
    got = run_fused(x, w, a, b, bias, s, p, dy)
    mask = got[-1]
    ref64 = run_reference(*f64(x, w, a, b, bias), s, p, dy.double(), mask)
    same = run_reference(x, w, a, b, bias, s, p, dy, mask)
    for name, g, r, t, dt in zip(("y", "dX", "dA", "dB"), got[:4], ref64, same, (x.dtype, x.dtype, a.dtype, b.dtype)):
        assert g.dtype == dt, f"{name} came back in {g.dtype}, expected {dt}"
        assert_close_to_ref(name, g, r, t)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_parity_odd_shape(r, dtypes, bias, p, device):
    x, w, a, b, bb = lora_inputs(37, 53, 41, r, *dtypes, bias=bias, device=device)
    check_parity(x, w, a, b, bb, 1.7, p)


@pytest.mark.parametrize("r", [7, 100, 256])
@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_parity_leading_dims_and_wider(r, dtypes, device):
    """x [2, 35, 130] (leading dims, K past several blocks), N = 67, ranks 100 and 256 (split across
    programs in the grad pass; many slices in the GEMM epilogue)."""
    x, w, a, b, bb = lora_inputs(0, 130, 67, r, *dtypes, device=device, lead=(2, 35))
    check_parity(x, w, a, b, bb, 0.5, 0.1)


def test_parity_non_contiguous_x(device):
    """x a transposed view (strided rows) and a column slice (strided columns): no copies needed."""
    _, w, a, b, bb = lora_inputs(0, 45, 29, 5, device=device)
    base = torch.randn(45, 2, 33, device=device)
    x = base.transpose(0, 2)[:, 1, :]  # [33, 45], strides (1, 66)
    assert not x.is_contiguous()
    check_parity(x, w, a, b, bb, 2.0, 0.2)
    xs = torch.randn(23, 90, device=device)[:, ::2]  # [23, 45], column stride 2
    check_parity(xs, w, a, b, bb, 2.0, 0.0)


def test_parity_transposed_weight(device):
    """W handed in as a transposed view (fan_in_fan_out storage)."""
    x, w, a, b, bb = lora_inputs(19, 37, 26, 6, device=device)
    check_parity(x, w.t().contiguous().t(), a, b, bb, 1.0, 0.0)


def test_launch_counts_prove_kernels_ran(device):
    """Forward is two launches (shrink, fused GEMM), backward two (grad pass, fused GEMM): if a kernel
    were swapped for the reference these counts would not move."""
    x, w, a, b, bb = lora_inputs(21, 33, 17, 4, device=device)
    x.requires_grad_()
    a.requires_grad_()
    b.requires_grad_()
    before = LAUNCHES.copy()
    y = fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb, dropout_p=0.1)
    fwd = LAUNCHES - before
    assert fwd == {"_shrink_kernel": 1, "_lora_gemm_kernel": 1}, fwd
    y.sum().backward()
    total = LAUNCHES - before
    assert total == {"_shrink_kernel": 1, "_lora_gemm_kernel": 2, "_lora_grad_kernel": 1}, total

    before = LAUNCHES.copy()
    with fused_lora.use_backend("reference"):
        fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb).sum().backward()
    assert LAUNCHES - before == {}, "the reference backend must not launch kernels"


def test_no_dx_kernel_when_x_needs_no_grad(device):
    x, w, a, b, bb = lora_inputs(21, 33, 17, 4, device=device)
    a.requires_grad_()
    before = LAUNCHES.copy()
    fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb).sum().backward()
    assert LAUNCHES - before == {"_shrink_kernel": 1, "_lora_gemm_kernel": 1, "_lora_grad_kernel": 1}
    assert b.grad is None and a.grad is not None


def test_trainable_weight_and_bias_get_gradients(device):
    """If the caller makes W or bias trainable, their gradients are right (not silently dropped)."""
    x, w, a, b, bb = lora_inputs(13, 22, 15, 3, device=device)
    w.requires_grad_()
    bb.requires_grad_()
    dy = torch.randn(13, 15, device=device)
    fused_lora.lora_linear(x, w, a, b, 1.5, bias=bb).backward(dy)
    ref = reference.lora_linear_grads(*f64(dy, x, w, a, b), 1.5)
    same = reference.lora_linear_grads(dy.cpu(), x.cpu(), w.detach().cpu(), a.cpu(), b.cpu(), 1.5)
    assert_close_to_ref("dW", w.grad, ref["weight"], same["weight"])
    assert_close_to_ref("dbias", bb.grad, ref["bias"], same["bias"])


def test_deterministic_mode_matches_and_repeats(device):
    """torch.use_deterministic_algorithms switches to the no-atomics kernels: same values (to fp32
    rounding) and bit-identical from run to run."""
    x, w, a, b, bb = lora_inputs(40, 70, 30, 9, device=device)
    dy = torch.randn(40, 30, device=device)
    atomics = run_fused(x, w, a, b, bb, 1.0, 0.2, dy)
    torch.use_deterministic_algorithms(True)
    try:
        det1 = run_fused(x, w, a, b, bb, 1.0, 0.2, dy)
        det2 = run_fused(x, w, a, b, bb, 1.0, 0.2, dy)
    finally:
        torch.use_deterministic_algorithms(False)
    for g1, g2, g0 in zip(det1[:4], det2[:4], atomics[:4]):
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
