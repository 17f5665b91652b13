"""Tests that need a CUDA GPU: bf16 parity (the interpreter's bf16 tl.dot is wrong), the compiled kernels
at realistic sizes with autotuning, no recompilation for a new sequence length, CUDA graphs, and the
device guard. Without a GPU they are skipped, visibly (pytest -rs lists them)."""

from __future__ import annotations

import pytest
import torch

import fused_lora
from fused_lora import LoRALinear

from helpers import lora_inputs
from test_parity import check_parity

pytestmark = pytest.mark.gpu

BF16 = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("r", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("dtypes", BF16, ids=["bf16", "bf16+fp32A"])
@pytest.mark.parametrize(("bias", "p"), [(True, 0.0), (False, 0.0), (True, 0.1), (False, 0.1)])
def test_bf16_parity_odd_shape(r, dtypes, bias, p):
    x, w, a, b, bb = lora_inputs(37, 53, 41, r, *dtypes, bias=bias, device="cuda")
    check_parity(x, w, a, b, bb, 1.7, p)


@pytest.mark.parametrize(
    "dtypes",
    [*BF16, (torch.float16, torch.float32), (torch.float32, torch.float32)],
    ids=["bf16", "bf16+fp32A", "fp16+fp32A", "fp32"],
)
@pytest.mark.parametrize("r", [16, 100])
def test_realistic_size_parity(dtypes, r):
    """Past every block size and through the autotuner: 1000 x 1536 -> 1048 (not multiples of 128)."""
    x, w, a, b, bb = lora_inputs(0, 1536, 1048, r, *dtypes, device="cuda", lead=(4, 250))
    check_parity(x, w, a, b, bb, 2.0, 0.1)


def _compiled_count() -> int:
    from fused_lora.kernels.lora_gemm import _lora_gemm_kernel
    from fused_lora.kernels.shrink import _shrink_kernel

    return sum(len(c[0]) for k in (_lora_gemm_kernel, _shrink_kernel) for c in k.device_caches.values())


def test_new_sequence_length_does_not_recompile():
    layer = LoRALinear(512, 384, r=8, device="cuda", dtype=torch.bfloat16)
    layer(torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16))
    before = _compiled_count()
    for m in (1001, 777, 513):  # same bucket (1024), divisibility by 16 varying
        layer(torch.randn(m, 512, device="cuda", dtype=torch.bfloat16))
    assert _compiled_count() == before


def test_cuda_graph_training_step():
    """A forward+backward with dropout captures into a CUDA graph (the seed is drawn on the device, so
    no host sync) and replays to the same result as eager with the same RNG state."""
    layer = LoRALinear(256, 192, r=8, lora_dropout=0.1, device="cuda")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(64, 256, device="cuda")
    for _ in range(2):  # warm up: autotune and compile outside the capture
        layer(x).sum().backward()
    layer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device():
    layer = LoRALinear(64, 48, r=4, device="cuda:1")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(10, 64, device="cuda:1")
    with torch.cuda.device(0):
        y = layer(x)
    assert y.device == torch.device("cuda:1")
    with fused_lora.use_backend("reference"):
        torch.testing.assert_close(y, layer(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("implementation", ["fused", "hybrid"])
@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtypes", BF16, ids=["bf16", "bf16+fp32A"])
def test_every_implementation_and_path_at_a_realistic_size(implementation, path, dtypes):
    """Both implementations, both tile-loading paths, bf16, through the tuner: 1000 x 1536 -> 1048."""
    from fused_lora.kernels import tuning

    x, w, a, b, bb = lora_inputs(0, 1536, 1048, 16, *dtypes, device="cuda", lead=(4, 250))
    with fused_lora.use_impl(implementation), tuning.force("gemm_path", path):
        check_parity(x, w, a, b, bb, 2.0, 0.1)


def test_hopper_runs_the_tma_path():
    from fused_lora.kernels.lora_gemm import tma_path

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper GPU")
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    assert tma_path(x, w.t(), torch.empty(256, 384, device="cuda", dtype=torch.bfloat16))


def test_auto_times_both_implementations_once(tmp_path, monkeypatch):
    from fused_lora.kernels import tuning

    monkeypatch.setenv("FUSED_LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_LORA_AUTOTUNE", raising=False)
    tuning.reset_caches()
    layer = LoRALinear(1024, 768, r=16, lora_alpha=16, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fused_lora.use_impl("auto"):
        layer(x).sum().backward()
    timed = [k for k in tuning.timings() if k[0] == "impl"]
    assert len(timed) == 2  # forward and backward, each timed once
    assert all(set(t) == {"fused", "hybrid"} for t in (tuning.timings()[k] for k in timed))
    assert list(tmp_path.glob("choices-*.json"))
    tuning.reset_caches()


def test_compile_reduce_overhead_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures the fused layers in CUDA graphs and replays them;
    dropout draws its seed on the device (no host sync), so the graph is valid."""
    torch._dynamo.reset()
    layer = LoRALinear(256, 192, r=8, lora_alpha=16, lora_dropout=0.1, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lora_B)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):  # warm-up runs, then recorded and replayed graphs
        y = compiled(x)
        y.float().sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora_A.grad).all()
