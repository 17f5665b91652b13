"""The fused path with a 4-bit base weight (QLoRA), without bitsandbytes (runs on the GPU machine too):
parity with the float64 reference on the dequantised weight, both implementations, what is saved for
backward and kept between steps, the shared scratch, torch.compile, no host sync."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import DEVICE

import fused_lora
from fused_lora import qlora_scratch
from fused_lora.kernels import LAUNCHES
from fused_lora.quant import QuantizedWeight

from helpers import assert_close_to_ref, f64, host_syncs, lora_inputs
from test_dequant import random_quantized
from test_parity import run_fused, run_reference

DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16+fp32A"]


def quantized(N, K, nested=True, quant_type="nf4", blocksize=64) -> QuantizedWeight:
    q = random_quantized(N, K, quant_type, blocksize, nested)
    if q.nested is None:  # weights of a sensible size: |w| <= absmax ~ 1/sqrt(K)
        q.absmax.mul_(K**-0.5)
    else:
        q.nested.absmax.mul_(K**-0.5)
        q.nested.offset.fill_(0.0)
    return q


def check_parity_4bit(x, q, a, b, bias, s, p):
    dy = torch.randn(*x.shape[:-1], q.shape[0]).to(device=x.device, dtype=x.dtype)
    before = LAUNCHES["_dequant4bit_kernel"]
    got = run_fused(x, q, a, b, bias, s, p, dy)
    assert LAUNCHES["_dequant4bit_kernel"] - before == 2, "one dequantisation forward, one for dX"
    w = q.dequantize(x.dtype)  # what the kernels multiplied by
    ref64 = run_reference(*f64(x, w, a, b, bias), s, p, dy.double(), got[-1])
    same = run_reference(x, w, a, b, bias, s, p, dy, got[-1])
    for name, g, r, t in zip(("y", "dX", "dA", "dB"), got[:4], ref64, same):
        assert_close_to_ref(name, g, r, t)


@pytest.mark.parametrize("r", [1, 7, 16])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_parity_odd_shape(r, dtypes, bias, p):
    dt, lora_dt = dtypes
    x, _, a, b, bb = lora_inputs(9, 41, 37, r, dt, lora_dt, bias=bias, device=DEVICE)
    check_parity_4bit(x, quantized(37, 41, nested=r != 7), a, b, bb, 2.0, p)


@pytest.mark.parametrize("impl", ["fused", "hybrid"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_parity_both_implementations_leading_dims(impl, quant_type):
    x, _, a, b, bb = lora_inputs(0, 64, 40, 5, torch.float16, torch.float32, device=DEVICE, lead=(2, 3))
    with fused_lora.use_impl(impl):
        check_parity_4bit(x, quantized(40, 64, quant_type=quant_type, blocksize=32), a, b, bb, 0.5, 0.1)


@pytest.mark.gpu
def test_parity_bf16():
    x, _, a, b, bb = lora_inputs(33, 136, 72, 16, torch.bfloat16, torch.float32, device=DEVICE)
    check_parity_4bit(x, quantized(72, 136), a, b, bb, 2.0, 0.1)


def test_bf16_under_the_interpreter_runs_the_reference_on_the_exact_weight():
    if DEVICE != "cpu":
        pytest.skip("interpreter only")
    x, _, a, b, _ = lora_inputs(5, 64, 24, 4, torch.bfloat16, torch.float32)
    q = quantized(24, 64)
    with pytest.warns(RuntimeWarning, match="bf16 under TRITON_INTERPRET"):
        y = fused_lora.lora_linear(x, q, a, b, 2.0)
    want = fused_lora.reference.lora_linear(x, q.dequantize(torch.bfloat16), a, b, 2.0)
    assert torch.equal(y, want)


def test_reference_backend_and_rank_zero():
    x, _, a, b, bb = lora_inputs(6, 64, 24, 3, device=DEVICE)
    q = quantized(24, 64)
    w = q.dequantize(torch.float32)
    with fused_lora.use_backend("reference"):
        y = fused_lora.lora_linear(x, q, a, b, 2.0, bb)
    assert torch.allclose(y, fused_lora.reference.lora_linear(x, w, a, b, 2.0, bb), atol=1e-5)
    y0 = fused_lora.lora_linear(x, q, a[:0], b[:, :0], 2.0, bb)
    assert torch.allclose(y0, torch.nn.functional.linear(x, w, bb), atol=1e-5)


def test_bad_inputs_name_the_weight():
    x, _, a, b, _ = lora_inputs(6, 64, 24, 3, device=DEVICE)
    with pytest.raises(ValueError, match="in_features = 48"):
        fused_lora.lora_linear(x, quantized(24, 48), a, b, 2.0)
    with pytest.raises(ValueError, match="lora_B"):
        fused_lora.lora_linear(x, quantized(30, 64), a, b, 2.0)


def _saved(fn):
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_nothing_weight_sized_is_saved_or_kept(p):
    """Saved for backward: x (the caller's tensor), xa, the seed and the 4-bit state (the packed bytes, a
    parameter) — no 16- or 32-bit [N, K] tensor; after the step nothing weight-sized is held but the shared
    scratch."""
    N, K = 48, 64
    x, _, a, b, _ = lora_inputs(8, K, N, 4, torch.float16, torch.float32, device=DEVICE)
    x.requires_grad_()
    a.requires_grad_(), b.requires_grad_()
    q = quantized(N, K)
    y, saved = _saved(lambda: fused_lora.lora_linear(x, q, a, b, 2.0, None, p))
    weight_sized = [t for t in saved if t.is_floating_point() and t.numel() >= N * K]
    assert not weight_sized, [(t.dtype, list(t.shape)) for t in weight_sized]
    assert any(t.data_ptr() == x.data_ptr() and t.dtype == x.dtype for t in saved), "x itself, not a copy"
    assert any(t.dtype == torch.uint8 and t.data_ptr() == q.packed.data_ptr() for t in saved), "the packed bytes"
    y.float().sum().backward()
    assert x.grad is not None and a.grad is not None


def test_scratch_is_shared_across_layers_and_grows_to_the_largest():
    qlora_scratch.release()
    shapes = [(40, 64), (96, 64), (24, 32)]
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    h = x
    for i, (N, K) in enumerate(shapes):
        q = quantized(N, K)
        a = torch.randn(3, K, device=DEVICE) * 0.1
        b = torch.randn(N, 3, device=DEVICE) * 0.1
        if i == 2:
            h = h[:, :32]
        h = fused_lora.lora_linear(h, q, a.requires_grad_(), b.requires_grad_(), 1.0)
        if i == 0:
            h = torch.cat([h, h[:, :24]], 1)
    h.sum().backward()
    held = qlora_scratch.scratch_bytes()
    key = (str(torch.device(DEVICE)) if DEVICE == "cpu" else f"cuda:{torch.cuda.current_device()}", "float32")
    assert held == {key: 96 * 64 * 4}, held  # one buffer, the largest layer's, for three layers and two passes


def test_scratch_reentry_and_threads_get_their_own():
    borrow = qlora_scratch.borrow
    with borrow(100, torch.float32, DEVICE) as outer, borrow(100, torch.float32, DEVICE) as inner:
        assert inner.data_ptr() != outer.data_ptr(), "re-entry must not hand out the busy buffer"
    order = []

    def worker():
        with qlora_scratch.borrow(10, torch.float32, DEVICE):
            order.append("worker")

    with qlora_scratch.borrow(10, torch.float32, DEVICE):
        t = threading.Thread(target=worker)
        t.start()
        t.join(0.2)
        order.append("main")  # the worker waits for the buffer: it cannot have run yet
    t.join()
    assert order == ["main", "worker"]


def test_a_training_step_reads_nothing_back():
    x, _, a, b, bb = lora_inputs(8, 64, 40, 4, torch.float16, torch.float32, device=DEVICE)
    q = quantized(40, 64)
    a.requires_grad_(), b.requires_grad_()

    def step():
        fused_lora.lora_linear(x, q, a, b, 2.0, bb, 0.1).float().sum().backward()

    step()
    assert host_syncs(step) == []


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, _, a, b, bb = lora_inputs(8, 64, 40, 4, torch.float32, torch.float32, device=DEVICE)
    q = quantized(40, 64)
    a.requires_grad_(), b.requires_grad_()

    def f(x, a, b):
        return fused_lora.lora_linear(x, q, a, b, 2.0, bb)

    y = torch.compile(f, fullgraph=True, backend=backend)(x, a, b)
    y.sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    y2 = f(x, a, b)
    y2.sum().backward()
    assert torch.allclose(y, y2, atol=1e-5) and torch.allclose(ga, a.grad, atol=1e-4) and torch.allclose(gb, b.grad)


def test_torch_func_jvp_grad_and_double_backward_with_a_4bit_weight():
    """Forward mode, torch.func and double backward see the dequantised weight: the same results as the
    dense weight the kernel produces."""
    x, _, a, b, bb = lora_inputs(6, 64, 24, 3, device=DEVICE)
    q = quantized(24, 64)
    w = q.dequantize(torch.float32)
    dx = torch.randn_like(x)
    f4 = lambda x, a: fused_lora.lora_linear(x, q, a, b, 2.0, bb)
    fd = lambda x, a: fused_lora.lora_linear(x, w, a, b, 2.0, bb)
    (y4, t4), (yd, td) = (torch.func.jvp(f, (x, a), (dx, torch.zeros_like(a))) for f in (f4, fd))
    assert torch.allclose(y4, yd, atol=1e-6) and torch.allclose(t4, td, atol=1e-5)
    g4, gd = (torch.func.grad(lambda x, f=f: f(x, a).square().sum())(x) for f in (f4, fd))
    assert torch.allclose(g4, gd, atol=1e-4)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(f4(xg, a).square().sum(), xg, create_graph=True)
    (gxd,) = torch.autograd.grad(fd(xg, a).square().sum(), xg, create_graph=True)
    assert torch.allclose(gx, gxd, atol=1e-4)
    (h,) = torch.autograd.grad(gx.sum(), xg)
    (hd,) = torch.autograd.grad(gxd.sum(), xg)
    assert torch.allclose(h, hd, atol=1e-4)
