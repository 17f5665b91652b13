"""The 4-bit dequantisation kernel (fused_lora/kernels/dequant.py) and the plain-PyTorch reference (fused_lora/quant.py):
bit-exact with bitsandbytes' ``dequantize_4bit`` for NF4 / FP4, every blocksize, plain and double-quantised
scales, fp16 / bf16 / fp32 output, odd shapes; and with each other where bitsandbytes is not installed (the
GPU machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fused_lora.kernels import LAUNCHES
from fused_lora.kernels.dequant import dequantize_4bit as kernel_dequant
from fused_lora.quant import BLOCKSIZES, NestedAbsmax, QuantizedWeight, code_values, dequantize_reference

OUT = (torch.float16, torch.bfloat16, torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bit_exact(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Every element's bits equal, except that ±0 count as one (bitsandbytes' own backends disagree on the
    sign of FP4's zero code 0b1000: see fused_lora/quant.py)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{name}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
    )
    got, want = got.cpu(), want.cpu()
    bad = (bits(got) != bits(want)) & ~((got == 0) & (want == 0))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, first at {idx}: "
                             f"got {got[tuple(idx)].item()!r}, want {want[tuple(idx)].item()!r}")  # fmt: skip


def random_quantized(N, K, quant_type="nf4", blocksize=64, nested=False, device=DEVICE, dtype=torch.float32):
    """Arbitrary packed bytes and scales: dequantisation is defined for any bytes, so no quantiser (and no
    bitsandbytes) is needed to test it."""
    T = N * K
    blocks = -(-T // blocksize)
    packed = torch.randint(0, 256, ((T + 1) // 2,), dtype=torch.uint8, device=device)
    if not nested:
        absmax = (torch.rand(blocks, device=device) + 0.05) * 3
        return QuantizedWeight(packed, absmax, (N, K), quant_type, blocksize, dtype)
    codes = torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device)
    n = NestedAbsmax(torch.rand(-(-blocks // 256), device=device) + 0.1, torch.randn(256, device=device).sort()[0],
                     256, torch.tensor(0.7, device=device))  # fmt: skip
    return QuantizedWeight(packed, codes, (N, K), quant_type, blocksize, dtype, n)


# --------------------------------------------------------------------- kernel vs reference (no bitsandbytes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_kernel_matches_reference_every_blocksize(quant_type, nested, blocksize):
    q = random_quantized(9, 341, quant_type, blocksize, nested)  # odd K: blocks and bytes straddle rows
    for dtype in OUT:
        before = LAUNCHES["_dequant4bit_kernel"]
        got = q.dequantize(dtype)
        assert LAUNCHES["_dequant4bit_kernel"] == before + 1, "one launch per dequantisation"
        assert_bit_exact(f"{quant_type} bs{blocksize} nested={nested} {dtype}", got, dequantize_reference(q, dtype))


@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (3, 5), (37, 53), (2, 4096)])
def test_kernel_odd_shapes(shape):
    for blocksize in (32, 4096):
        q = random_quantized(*shape, "nf4", blocksize, nested=True)
        assert_bit_exact(
            f"{shape} bs{blocksize}", q.dequantize(torch.bfloat16), dequantize_reference(q, torch.bfloat16)
        )


def test_into_a_larger_buffer_and_fp32_reference_widened():
    q = random_quantized(7, 30, "fp4", 32)
    buf = torch.full((7 * 30 + 50,), 5.0, device=DEVICE)
    w = q.dequantize(torch.float32, out=buf)
    assert w.data_ptr() == buf.data_ptr() and w.shape == (7, 30)
    assert (buf[7 * 30 :] == 5.0).all(), "nothing written past N·K"
    assert torch.equal(q.dequantize(torch.float64).cpu(), w.double().cpu())


def test_fp4_zero_code_is_negative_zero_as_cuda():
    """bitsandbytes' CUDA kernel computes FP4 code 0b1000 as 0 · (−1) · absmax = −0.0."""
    assert bits(code_values("fp4"))[8].item() == -(2**31)
    packed = torch.tensor([0x80, 0x08], dtype=torch.uint8, device=DEVICE)
    q = QuantizedWeight(packed, torch.ones(1, device=DEVICE), (1, 4), "fp4", 32)
    w = q.dequantize(torch.float16).cpu()
    assert torch.signbit(w).view(-1).tolist() == [True, False, False, True]


def test_kernel_nan_scale_stays_nan_in_bf16():
    q = random_quantized(2, 64, "nf4", 32)
    q.absmax[0] = float("nan")
    w = q.dequantize(torch.bfloat16).float().cpu()
    assert w.view(-1)[32:].isfinite().all()
    ref = dequantize_reference(q, torch.bfloat16).float().cpu()
    assert torch.equal(w.isnan(), ref.isnan())


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(blocksize=48), "blocksize"),
        (dict(quant_type="int4"), "quant_type"),
        (dict(shape=(8, 65)), "packed holds"),
        (dict(absmax=torch.ones(2)), "absmax"),
        (dict(packed=torch.zeros(128, dtype=torch.int8)), "uint8"),
        (dict(dtype=torch.float64), "dtype"),
    ],
)
def test_bad_quantized_weight_is_refused(change, match):
    q = random_quantized(8, 64, device="cpu")
    fields = dict(packed=q.packed, absmax=q.absmax, shape=q.shape, quant_type="nf4", blocksize=64) | change
    with pytest.raises(ValueError, match=match):
        QuantizedWeight(**fields)


def test_launcher_refuses_a_strided_out():
    q = random_quantized(8, 64)
    with pytest.raises(ValueError, match="contiguous"):
        kernel_dequant(q.packed, q.absmax, torch.empty(64, 8, device=DEVICE).t(), quant_type="nf4", blocksize=64)


# --------------------------------------------------------------------- against bitsandbytes (where installed)


@pytest.fixture
def bnb_functional():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


def _bnb_cpu_misindexes(K: int, blocksize: int) -> bool:
    """bitsandbytes 0.50's AVX-512 CPU dequantiser indexes absmax per row (row · (K // blocksize) + k //
    blocksize), which is wrong when blocks straddle rows (K % blocksize != 0); its CUDA kernel, its
    scalar CPU code and its Python fallback index the flat blocks its quantiser wrote."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and K % 16 == 0 and K % blocksize and blocksize < 2048


def _bnb_flat(F, packed, qs, dtype):
    """bitsandbytes' own Python dequantiser (its 'default' backend), which indexes blocks as its CUDA kernel."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, _get_4bit_code(qs.quant_type, "cpu"),
                                    qs.blocksize, qs.shape, dtype)  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bit_exact_with_bitsandbytes(bnb_functional, quant_type, nested, blocksize):
    F = bnb_functional
    shapes = [(9, 341), (64, 48)] if blocksize in (32, 64) else [(9, 341)]
    for N, K in shapes:
        for dtype in OUT:
            w = torch.randn(N, K, dtype=dtype) * 0.3
            packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
            ours = QuantizedWeight.from_bnb(packed, qs)
            want = F.dequantize_4bit(packed, qs)  # in qs.dtype
            name = f"{quant_type} bs{blocksize} nested={nested} [{N}, {K}] {dtype}"
            flat = _bnb_flat(F, packed, qs, dtype)
            if _bnb_cpu_misindexes(K, blocksize):
                assert not torch.equal(want, flat), "bitsandbytes' CPU dequantiser was fixed: drop the exception"
                want = flat
            assert_bit_exact(name + " reference", dequantize_reference(ours), want)
            got = _on_device(ours).dequantize()
            assert_bit_exact(name + " kernel", got, want)
            for out in OUT if dtype == torch.float32 else ():  # straight to another dtype, as gemm_4bit does
                other = torch.ops.bitsandbytes.dequantize_4bit.default(packed, _scales(F, qs), blocksize, quant_type,
                                                                       qs.shape, out)  # fmt: skip
                if not _bnb_cpu_misindexes(K, blocksize):
                    assert_bit_exact(name + f" -> {out}", _on_device(ours).dequantize(out), other)


def _scales(F, qs):
    return F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax


def _on_device(q: QuantizedWeight) -> QuantizedWeight:
    if DEVICE == "cpu":
        return q
    n = q.nested
    move = lambda t: t.to(DEVICE)
    nested = NestedAbsmax(move(n.absmax), move(n.code), n.blocksize, move(n.offset)) if n else None
    return QuantizedWeight(move(q.packed), move(q.absmax), q.shape, q.quant_type, q.blocksize, q.dtype, nested)


@pytest.mark.integration
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage_is_read_as_bytes(storage):
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(64, 32)
    p = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", quant_storage=storage)
    p = p.to("cpu")
    if p.quant_state is None:  # quantised on the first move to a device
        p = p._quantize("cpu")
    assert p.dtype == storage
    want = bnb.functional.dequantize_4bit(p.data, p.quant_state)
    assert_bit_exact(f"storage {storage}", QuantizedWeight.from_bnb(p).dequantize(), want)


@pytest.mark.integration
def test_cpu_repacked_layout_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX-512 bf16: bitsandbytes did not repack the weight")
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        QuantizedWeight.from_bnb(layer.weight)


_FMA_PROBE = r"""
import importlib, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_lora.compile_check import _spec
from fused_lora.compile_jobs import dequant_jobs
job = next(j for j in dequant_jobs() if "nested" in j.variant and "bf16" in j.variant)
fn = importlib.import_module("fused_lora.kernels.dequant")._dequant4bit_kernel
sig, ce, attrs = _spec(fn, job.args, dict(job.meta))
for fusion in (job.options["enable_fp_fusion"], True):
    k = triton.compile(ASTSource(fn, sig, ce, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": job.num_warps, "num_stages": 1, "enable_fp_fusion": fusion})
    print(len(re.findall(r"\bfma\.rn\.f32", k.asm["ptx"])))
"""


@pytest.mark.compile
def test_nested_scale_is_compiled_without_fma():
    """The nested scale fl(fl(code2·absmax2) + offset) must round twice, as bitsandbytes' does: compiled as
    launched (enable_fp_fusion=False) the PTX holds no fma; with fusion on it holds one (the check can fail)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _FMA_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "1"], out.stdout
