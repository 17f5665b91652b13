"""Defects found by adversarial testing, each pinned by a test that failed before its fix: fp16
overflow inside the kernels, thread-global backend selection, a racy zeroing hook, silent double
backward, a detached learnable scale, NaN semantics under dropout, float64 through fp32 adapters,
and validation gaps."""

from __future__ import annotations

import threading

import pytest
import torch

import fused_lora
from fused_lora import reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import LAUNCHES, dropout_mask

from helpers import assert_close_to_ref, f64, lora_inputs


def test_fp16_adapters_do_not_overflow(device):
    """s·xa = 102400 does not fit fp16, but y = 102.4 and dB = 102.4 do: intermediates stay fp32."""
    x = torch.full((1, 16), 100.0, dtype=torch.float16, device=device)
    w = torch.zeros(4, 16, dtype=torch.float16, device=device)
    a = torch.ones(1, 16, dtype=torch.float16, device=device, requires_grad=True)
    b = torch.full((4, 1), 1e-3, dtype=torch.float16, device=device, requires_grad=True)
    dy = torch.full((1, 4), 1e-3, dtype=torch.float16, device=device)
    y = fused_lora.lora_linear(x, w, a, b, 64.0)
    y.backward(dy)
    ref_y = reference.lora_linear(*f64(x, w, a.detach(), b.detach()), 64.0)
    ref = reference.lora_linear_grads(*f64(dy, x, w, a.detach(), b.detach()), 64.0)
    assert torch.isfinite(y).all() and torch.isfinite(b.grad).all() and torch.isfinite(a.grad).all()
    torch.testing.assert_close(y.double().cpu(), ref_y, rtol=2e-3, atol=0)
    torch.testing.assert_close(b.grad.double().cpu(), ref["lora_B"], rtol=2e-3, atol=0)
    torch.testing.assert_close(a.grad.double().cpu(), ref["lora_A"], rtol=2e-3, atol=1e-6)


def test_use_backend_is_per_thread_and_restored():
    """Two threads inside use_backend("reference") and use_backend("triton") at the same time each see
    their own choice; afterwards the process-wide setting is what it was."""
    before = fused_lora.get_backend()
    inside, seen = threading.Barrier(2), {}

    def worker(name):
        with fused_lora.use_backend(name):
            inside.wait()  # both are inside their block now
            seen[name] = fused_lora.get_backend()
            inside.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("reference", "triton")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"reference": "reference", "triton": "triton"}
    assert fused_lora.get_backend() == before


def test_no_kernel_keeps_per_call_state_on_a_shared_autotuner():
    """triton.autotune keeps each call's arguments on the shared Autotuner (self.nargs), which its
    zeroing hooks read: concurrent calls could zero each other's buffers. Our kernels are plain JIT
    functions; their configurations come from kernels.tuning, which stores nothing about a call."""
    import triton

    from fused_lora.kernels import lora_gemm, lora_grad, low_rank, shrink

    for module in (lora_gemm, lora_grad, low_rank, shrink):
        for name in dir(module):
            assert not isinstance(getattr(module, name), triton.runtime.Autotuner), f"{module.__name__}.{name}"


def test_concurrent_k_split_shrinks_are_each_right(device):
    """Four threads run K-split shrinks (atomics into a zeroed buffer) at once: each gets its own result."""
    from fused_lora.kernels import configs, shrink, tuning

    split = next(c for c in configs.shrink_table() if c.SPLIT_K > 1)
    inputs = [lora_inputs(29 + i, 70, 5, 6, device=device)[0::2] for i in range(4)]  # (x, a, bias)
    results = [None] * 4

    def worker(i):
        x, a, _ = inputs[i]
        with tuning.force("shrink", configs.name(split)):
            results[i] = [shrink(x, a, scale=1.5) for _ in range(2)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (x, a, _), got in zip(inputs, results):
        for xa in got:
            torch.testing.assert_close(xa, 1.5 * x @ a.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_double_backward_matches_the_reference(p, device):
    """grad(create_graph=True) then a second grad: the fused path gives what the reference gives with
    the same mask (before: None, silently)."""
    x, w, a, b, bias = lora_inputs(9, 12, 7, 3, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    torch.manual_seed(5)
    y = fused_lora.lora_linear(leaves[0], w, leaves[1], leaves[2], 1.3, bias=bias, dropout_p=p)
    gx, ga = torch.autograd.grad((y * y).sum(), [leaves[0], leaves[1]], create_graph=True)
    second = torch.autograd.grad(gx.pow(2).sum() + ga.pow(2).sum(), leaves, allow_unused=True)

    mask = None
    if p > 0:
        torch.manual_seed(5)
        mask = dropout_mask(_draw_seed(x.device), 9, 12, p)
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, a, b)]
    yr = reference.lora_linear(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2], 1.3, bias.double(), p,
                               dropout_mask=mask)  # fmt: skip
    gxr, gar = torch.autograd.grad((yr * yr).sum(), [ref_leaves[0], ref_leaves[1]], create_graph=True)
    ref_second = torch.autograd.grad(gxr.pow(2).sum() + gar.pow(2).sum(), ref_leaves)
    for name, got, want in zip(("x", "A", "B"), second, ref_second):
        assert got is not None, f"second derivative wrt {name} is missing"
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=name)


def test_learnable_scaling_is_refused_by_the_kernels_and_differentiated_by_the_reference(device):
    x, w, a, b, _ = lora_inputs(5, 8, 6, 2, device=device)
    s = torch.tensor(2.0, device=device, requires_grad=True)
    with pytest.raises(TypeError, match="scaling requires grad"):
        fused_lora.lora_linear(x, w, a, b, s)
    with pytest.raises(TypeError, match="scaling is a meta tensor"):
        fused_lora.lora_linear(x, w, a, b, torch.tensor(2.0, device="meta"))
    with fused_lora.use_backend("reference"):
        y = fused_lora.lora_linear(x, w, a, b, s)
    y.sum().backward()
    expected = ((x @ a.t()) @ b.t()).sum()
    torch.testing.assert_close(s.grad, expected)


def test_nan_at_a_dropped_position_propagates_as_in_torch(device):
    """drop(x) = x·mask·scale: NaN·0 is NaN in torch's dropout, the reference and PEFT; the kernels must
    agree (before, they zeroed it and dA/dB came back finite where the reference's are NaN)."""
    x, w, a, b, bias = lora_inputs(12, 40, 9, 3, device=device)
    torch.manual_seed(3)
    mask = dropout_mask(_draw_seed(x.device), 12, 40, 0.5)
    row, col = (~mask).nonzero()[0].tolist()  # a dropped element
    x[row, col] = float("nan")
    dy = torch.randn(12, 9, device=device)
    grads = {}
    for backend in ("triton", "reference"):
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        with fused_lora.use_backend(backend):
            torch.manual_seed(3)
            if backend == "reference":
                y = reference.lora_linear(xs, w, as_, bs, 1.0, bias, 0.5, dropout_mask=mask)
            else:
                y = fused_lora.lora_linear(xs, w, as_, bs, 1.0, bias=bias, dropout_p=0.5)
            y.backward(dy)
        grads[backend] = (y.detach(), as_.grad, bs.grad)
    for got, want in zip(grads["triton"], grads["reference"]):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(grads["triton"][1]).any(), "dA must see the NaN"


def test_reference_does_not_round_float64_through_fp32_adapters():
    x = torch.tensor([[1.0 + 2.0**-30]], dtype=torch.float64)
    w = torch.zeros(1, 1, dtype=torch.float64)
    one = torch.ones(1, 1)
    y = reference.lora_linear(x, w, one, one, 1.0)
    assert y.dtype == torch.float64 and y.item() - 1.0 == 2.0**-30


@pytest.mark.parametrize("p", [1.5, float("nan"), "abc"])
def test_dropout_is_checked_in_eval_too(p, device):
    x, w, a, b, _ = lora_inputs(4, 8, 6, 2, device=device)
    with pytest.raises((ValueError, TypeError), match="dropout_p"):
        fused_lora.lora_linear(x, w, a, b, 1.0, dropout_p=p, training=False)


def test_scaling_outside_fp32_range_is_refused(device):
    """1e39 is a finite float but inf in fp32: the kernels would return NaN (inf·0) where the answer
    is finite. A clear error instead."""
    x, w, a, b, _ = lora_inputs(4, 8, 6, 2, device=device)
    with pytest.raises(ValueError, match="scaling must be within float32"):
        fused_lora.lora_linear(x, w, a, torch.zeros_like(b), 1e39)


def test_dtype_message_names_each_allowed_dtype_once(device):
    x, w, a, b, _ = lora_inputs(4, 8, 6, 2, device=device)
    with pytest.raises(TypeError) as err:
        fused_lora.lora_linear(x, w, a.half(), b.half(), 1.0)
    assert "torch.float32 or torch.float32" not in str(err.value) and "must be torch.float32" in str(err.value)


@pytest.mark.parametrize("which", ["x", "weight"])
def test_sparse_inputs_get_a_clear_error(which):
    x, w, a, b, _ = lora_inputs(4, 8, 6, 2)
    args = {"x": x, "weight": w}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} must be a dense"):
        fused_lora.lora_linear(args["x"], args["weight"], a, b, 1.0)


def test_bf16_under_the_interpreter_never_returns_garbage(device):
    """The interpreter's bf16 tl.dot is wrong: lora_linear runs the reference with a warning, and the
    kernels' launchers refuse bf16 outright."""
    if device != "cpu":
        pytest.skip("the interpreter runs on the CPU only")
    x, w, a, b, bias = lora_inputs(6, 16, 8, 2, dtype=torch.bfloat16)
    before = LAUNCHES.copy()
    with pytest.warns(RuntimeWarning, match="bf16 under TRITON_INTERPRET"):
        y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=bias)
    assert LAUNCHES - before == {}
    assert_close_to_ref("y", y, reference.lora_linear(*f64(x, w, a, b), 1.0, bias.double()),
                        reference.lora_linear(x, w, a, b, 1.0, bias))  # fmt: skip
    with pytest.raises(TypeError, match="bf16 tensors under TRITON_INTERPRET"):
        fused_lora.kernels.shrink(x, a)


@pytest.mark.parametrize("bits", [0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF])
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_nan_payloads_survive_tf32_rounding(device, bits, allow_tf32):
    """round_tf32 adds half an ulp to the fp32 bits: a NaN whose payload sits in the low mantissa bits
    used to become inf (0x7F800001) or even ±0 (0xFFFFFFFF, 0x7FFFFFFF) — dA and dX came back finite
    where torch's are NaN. Every NaN of x, dY or an adapter stays NaN in every output it reaches."""
    x, w, a, b, bias = lora_inputs(9, 20, 7, 3, device=device)
    x.view(torch.int32)[2, 5] = bits - 2**32 if bits >= 2**31 else bits
    assert torch.isnan(x[2, 5])
    dy = torch.randn(9, 7, device=device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        with fused_lora.use_backend("triton"):
            y = fused_lora.lora_linear(xs, w, as_, bs, 2.0, bias=bias)
            y.backward(dy)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    xr, ar, br = (t.clone().requires_grad_() for t in (x, a, b))
    yr = reference.lora_linear(xr, w, ar, br, 2.0, bias)
    yr.backward(dy)
    outputs = {"y": (y, yr), "x.grad": (xs.grad, xr.grad), "lora_A.grad": (as_.grad, ar.grad)}
    outputs["lora_B.grad"] = (bs.grad, br.grad)
    for name, (got, want) in outputs.items():
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs from torch's"


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch without fp32_precision")
@pytest.mark.parametrize("setting", ["matmul", "global"])
def test_tf32_set_through_torchs_new_api_is_honoured(device, setting):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (the API torch's docs now recommend) used to make
    every fp32 call raise: reading the legacy allow_tf32 flag after it is refused by torch."""
    from fused_lora.kernels.precision import TF32, TF32X3, lora_mode

    matmul = torch.backends.cuda.matmul
    target = matmul if setting == "matmul" else torch.backends
    before = matmul.fp32_precision, torch.backends.fp32_precision
    x, w, a, b, bias = lora_inputs(9, 20, 7, 3, device=device)
    try:
        matmul.fp32_precision = "none"  # inherit the global setting (the legacy flag sets "ieee"/"tf32")
        for value, mode in (("tf32", TF32), ("ieee", TF32X3)):
            target.fp32_precision = value
            assert lora_mode(torch.float32, torch.float32, kept=True)[0] == int(mode), value
            with fused_lora.use_backend("triton"):
                y = fused_lora.lora_linear(x, w, a, b, 2.0, bias=bias)
            ref = reference.lora_linear(*f64(x, w, a, b), 2.0, bias.double())
            torch.testing.assert_close(y.double().cpu(), ref, rtol=1e-2, atol=1e-2)
    finally:
        torch.backends.fp32_precision = before[1]
        matmul.fp32_precision = before[0]
