"""The two implementations (fused GEMM, hybrid) on both tile-loading paths (TMA descriptors, pointers),
the per-shape choice between them, the tuner behind it, and the 16-bit dropout draws.

Under the interpreter nothing can be timed, so the choosing logic is driven with a fake timer; the
kernels themselves run for real (TMA descriptors included: the interpreter executes them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_function import fused

import fused_lora
from fused_lora import impl
from fused_lora.kernels import LAUNCHES, configs, dropout_mask, effective_dropout_p, tuning
from fused_lora.kernels.lora_gemm import tma_path

from helpers import lora_inputs
from test_parity import DTYPE_IDS, DTYPES, check_parity


@pytest.fixture(params=["tma", "pointer"])
def path(request):
    with tuning.force("gemm_path", request.param):
        yield request.param


@pytest.fixture(params=["fused", "hybrid"])
def implementation(request):
    with impl.use_impl(request.param):
        yield request.param


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("r", "bias", "p"), [(7, True, 0.3), (16, False, 0.0), (33, True, 0.0)])
def test_parity_every_path_and_implementation(path, implementation, dtypes, r, bias, p, device):
    x, w, a, b, bb = lora_inputs(37, 53, 41, r, *dtypes, bias=bias, device=device)
    check_parity(x, w, a, b, bb, 1.7, p)


def test_implementations_launch_what_they_say(device):
    """fused: shrink + GEMM forward, grad + GEMM backward; hybrid: the low-rank kernel instead of the
    GEMM (cuBLAS does the product), the same shrink and grad."""
    x, w, a, b, bb = lora_inputs(21, 33, 17, 4, device=device)
    for name, gemm in (("fused", "_lora_gemm_kernel"), ("hybrid", "_low_rank_kernel")):
        xs, as_ = x.clone().requires_grad_(), a.clone().requires_grad_()
        before = LAUNCHES.copy()
        with impl.use_impl(name):
            fused_lora.lora_linear(xs, w, as_, b, 2.0, bias=bb, dropout_p=0.1).sum().backward()
        assert LAUNCHES - before == {"_shrink_kernel": 1, gemm: 2, "_lora_grad_kernel": 1}, name


def test_forward_and_backward_agree_on_the_mask_whatever_the_tiles(device):
    """Forward with one set of tile shapes, backward with another (every kernel): the mask is a
    function of (seed, m, k) only, so the gradients equal those of a run with the same tiles both ways."""
    x, w, a, b, bias = lora_inputs(45, 70, 38, 6, device=device)
    dy = torch.randn(45, 38, device=device)
    tables = {"gemm": configs.gemm_table(), "shrink": configs.shrink_table(), "grad": configs.grad_table()}
    names = {t: [configs.name(c) for c in table] for t, table in tables.items()}

    def run(fwd: int, bwd: int, which: str = "fused"):
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        with (
            impl.use_impl(which),
            tuning.force("gemm", names["gemm"][fwd]),
            tuning.force("shrink", names["shrink"][fwd]),
        ):
            y = fused(xs, w, as_, bs, bias)
        with impl.use_impl(which), tuning.force("gemm", names["gemm"][bwd]), tuning.force("grad", names["grad"][bwd]):
            y.backward(dy)
        return y.detach(), xs.grad, as_.grad, bs.grad

    same, mixed, hybrid = run(0, 0), run(0, 1), run(1, 0, "hybrid")
    for g_same, g_mixed, g_hybrid in zip(same, mixed, hybrid):
        torch.testing.assert_close(g_mixed, g_same, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_hybrid, g_same, rtol=1e-5, atol=1e-5)


def test_tma_path_needs_aligned_row_major_operands(device):
    x, w, _, _, _ = lora_inputs(64, 32, 48, 4, device=device)
    out = torch.empty(64, 48, device=device)
    assert tma_path(x, w.t(), out) and tma_path(x, w.t().contiguous(), out)
    assert not tma_path(x.t().contiguous().t(), w.t(), out)  # x column-major
    odd = torch.randn(64 * 33 + 1, device=device)[1:].view(64, 33)[:, :32]  # base 4 bytes off 16
    assert not tma_path(odd, w.t(), out)
    assert not tma_path(torch.randn(64, 30, device=device)[:, :29], torch.randn(29, 48, device=device), out)


# ---------------------------------------------------------------- dropout draws


def _philox(seed: int, c0: np.ndarray, c1: np.ndarray) -> list[np.ndarray]:
    """Philox4x32-10, written from the paper's constants, in numpy: the spec of keep_mask's words."""
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    c = [c0.astype(np.uint64), c1.astype(np.uint64), np.zeros_like(c0, np.uint64), np.zeros_like(c0, np.uint64)]
    key = [np.uint64(k0), np.uint64(k1)]
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c[0], np.uint64(0xCD9E8D57) * c[2]
        c = [
            ((p1 >> np.uint64(32)) ^ c[1] ^ key[0]) & np.uint64(0xFFFFFFFF),
            p1 & np.uint64(0xFFFFFFFF),
            ((p0 >> np.uint64(32)) ^ c[3] ^ key[1]) & np.uint64(0xFFFFFFFF),
            p0 & np.uint64(0xFFFFFFFF),
        ]
        key = [(key[0] + np.uint64(0x9E3779B9)) & np.uint64(0xFFFFFFFF),
               (key[1] + np.uint64(0xBB67AE85)) & np.uint64(0xFFFFFFFF)]  # fmt: skip
    return c


def test_mask_is_the_documented_16_bit_draw(device):
    """Element (m, k) keeps when half h = (k % 8) % 2 of word j = (k % 8) // 2 of Philox((k // 8, m)) is
    >= round(p·2^16): one Philox call per 8 elements."""
    seed, M, K, p = (1 << 40) + 12345, 19, 70, 0.3
    got = dropout_mask(torch.tensor([seed], device=device), M, K, p).cpu().numpy()
    m, k = np.meshgrid(np.arange(M), np.arange(K), indexing="ij")
    words = _philox(seed, (k // 8).astype(np.uint32), m.astype(np.uint32))
    j, h = (k % 8) // 2, (k % 8) % 2
    word = np.choose(j, words)
    draw = (word >> (16 * h).astype(np.uint64)) & np.uint64(0xFFFF)
    assert np.array_equal(got, draw >= round(p * 65536))


def test_dropout_probability_is_quantised_to_2_pow_minus_16(device):
    assert effective_dropout_p(0.1) == 6554 / 65536 and abs(effective_dropout_p(0.1) - 0.1) <= 2**-17
    m = dropout_mask(torch.tensor([3], device=device), 512, 512, 0.1)
    assert abs(1 - m.float().mean().item() - effective_dropout_p(0.1)) < 0.005
    assert dropout_mask(torch.tensor([3], device=device), 64, 64, 1 - 2**-18).sum() == 0  # rounds to all-drop


# ---------------------------------------------------------------- choosing (impl and configs)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """A tuner that 'times' on any device with a scripted timer, its disk cache in tmp_path."""
    monkeypatch.setenv("FUSED_LORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSED_LORA_AUTOTUNE", raising=False)  # gpu_check.sh runs the suite with it at 0
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    tuning.reset_caches()
    calls = []

    def timer(fn):
        out = fn()
        name = out if isinstance(out, str) else fn.__name__  # impl's candidates are functions named for it
        if name in ("fast", "slow", "fused", "hybrid"):
            calls.append(name)
        return {"fast": 1.0, "slow": 2.0, "fused": 3.0, "hybrid": 1.5}.get(name, 5.0)

    monkeypatch.setattr(tuning, "measure", timer)
    yield calls
    tuning.reset_caches()


def test_tuner_times_once_then_remembers_in_memory_and_on_disk(fake_gpu, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    table = tuning.table("test-table")
    bench = lambda name: lambda: name
    assert table.pick(("k",), ["slow", "fast"], bench, cpu) == "fast"
    assert fake_gpu == ["slow", "fast"]
    assert table.pick(("k",), ["slow", "fast"], bench, cpu) == "fast" and len(fake_gpu) == 2  # memory
    assert list(tmp_path.glob("choices-*.json"))
    tuning.reset_caches()  # a new process: the disk answers
    assert tuning.table("test-table").pick(("k",), ["slow", "fast"], bench, cpu) == "fast" and len(fake_gpu) == 2
    with tuning.force("test-table", "slow"):
        assert table.pick(("k",), ["slow", "fast"], bench, cpu) == "slow"
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "0")
    assert table.pick(("other",), ["slow", "fast"], bench, cpu) == "slow" and len(fake_gpu) == 2


def test_tuner_never_times_inside_a_graph_capture(fake_gpu, monkeypatch):
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    table = tuning.table("capture-table")
    bench = lambda name: lambda: name
    assert table.pick(("k",), ["slow", "fast"], bench, torch.device("cpu")) == "slow"  # the default
    assert fake_gpu == []
    monkeypatch.setattr(tuning, "capturing", lambda device: False)
    assert table.pick(("k",), ["slow", "fast"], bench, torch.device("cpu")) == "fast"  # not cached before


def test_auto_picks_the_faster_implementation_per_direction(fake_gpu, device):
    """auto times fused and hybrid (here: scripted, hybrid faster) once per problem and runs the winner;
    deterministic mode runs fused whatever was timed; an explicit choice wins over both."""
    x, w, a, b, bb = lora_inputs(21, 33, 17, 4, device=device)
    x.requires_grad_()
    with impl.use_impl("auto"):
        before = LAUNCHES.copy()
        fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb).sum().backward()
        ran = LAUNCHES - before
    assert ran["_low_rank_kernel"] >= 2 and set(fake_gpu) == {"fused", "hybrid"}
    timed = len(fake_gpu)
    with impl.use_impl("auto"):
        before = LAUNCHES.copy()
        fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb).sum().backward()
        assert LAUNCHES - before == {"_shrink_kernel": 1, "_low_rank_kernel": 2, "_lora_grad_kernel": 1}
    assert len(fake_gpu) == timed  # remembered
    torch.use_deterministic_algorithms(True)
    try:
        with impl.use_impl("auto"):
            before = LAUNCHES.copy()
            fused_lora.lora_linear(x, w, a, b, 2.0, bias=bb)
            assert (LAUNCHES - before)["_lora_gemm_kernel"] == 1
    finally:
        torch.use_deterministic_algorithms(False)


def test_impl_selection_rules(monkeypatch):
    import contextvars

    def fresh():
        monkeypatch.setenv("FUSED_LORA_IMPL", "hybrid")
        assert impl.get_impl() == "hybrid"
        impl.set_impl("fused")
        try:
            assert impl.get_impl() == "fused"
            with impl.use_impl("auto"):
                assert impl.get_impl() == "auto"
            assert impl.get_impl() == "fused"
        finally:
            impl.set_impl(None)
        monkeypatch.setenv("FUSED_LORA_IMPL", "bogus")
        with pytest.raises(ValueError, match="FUSED_LORA_IMPL must be one of"):
            impl.get_impl()

    contextvars.Context().run(fresh)
    with pytest.raises(ValueError, match="impl must be one of"):
        impl.use_impl("cublas").__enter__()


def test_fp32_adapters_cancelling_term_stays_finite(path, implementation, device):
    """fp16 x with fp32 adapters, x·Wᵀ = -60000 and the low-rank term +70000 (beyond fp16's 65504): y is
    10000 and must come out finite by both implementations. The hybrid used to round the term to fp16
    before cuBLAS added x·Wᵀ (inf); likewise T = g·A against dY·W in the backward's dX."""
    K, N, r = 16, 16, 4
    x = torch.ones(2, K, dtype=torch.float16, device=device, requires_grad=True)
    w = torch.full((N, K), -60000.0 / K, device=device).half()
    a = torch.full((r, K), 1.0 / K, device=device)
    b = torch.full((N, r), 70000.0 / r, device=device)
    y = fused_lora.lora_linear(x, w, a, b, 1.0, bias=torch.full((N,), 0.5, device=device))
    torch.testing.assert_close(y.float(), torch.full_like(y, 10000.5, dtype=torch.float32), rtol=2e-3, atol=0)

    w2 = torch.full((N, K), -60000.0 / N, device=device).half()  # dY·W = -60000 with dY = ones
    a2 = torch.full((r, K), 70000.0 / (r * N), device=device)  # g·A = +70000 (g = dY·B = N with B = 1)
    fused_lora.lora_linear(x, w2, a2, torch.ones(N, r, device=device), 1.0).backward(
        torch.ones(2, N, dtype=torch.float16, device=device)
    )
    torch.testing.assert_close(x.grad.float(), torch.full((2, K), 10000.0, device=device), rtol=2e-3, atol=0)


@pytest.mark.parametrize("content", ["[]", "null", "42", '"x"', "{}", '{"choices": []}', "SCOPED_LIST", "SCOPED_NULL"])
def test_tuner_treats_a_cache_file_of_the_wrong_shape_as_empty(fake_gpu, tmp_path, content):
    """Valid JSON that is not {"scope": ..., "choices": {...}} used to raise AttributeError out of every
    call; it is an empty cache, then overwritten by the next choice."""
    scope = json.dumps(tuning._scope())
    content = {"SCOPED_LIST": f'{{"scope": {scope}, "choices": []}}', "SCOPED_NULL": f'{{"scope": {scope}}}'}.get(
        content, content
    )
    disk = tuning._disk()
    disk.path.write_text(content)
    bench = lambda name: lambda: name
    assert tuning.table("shape-table").pick(("k",), ["slow", "fast"], bench, torch.device("cpu")) == "fast"
    assert json.loads(disk.path.read_text())["choices"]


def test_tuner_keeps_choices_in_memory_when_the_cache_cannot_be_read(fake_gpu, monkeypatch):
    """An OSError from the cache file (a directory one may not enter, a name too long) must not escape:
    the choice is timed and kept in memory."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    tuning._disk()  # the scope (a hash of the kernels' source) is read first; the cache file is not
    for name in ("is_file", "exists", "read_text", "write_text", "stat", "mkdir"):
        monkeypatch.setattr(Path, name, refuse)
    table = tuning.table("noaccess-table")
    bench = lambda name: lambda: name
    assert table.pick(("k",), ["slow", "fast"], bench, torch.device("cpu")) == "fast"
    assert table.pick(("k",), ["slow", "fast"], bench, torch.device("cpu")) == "fast" and len(fake_gpu) == 2


def test_cache_dir_expands_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FUSED_LORA_CACHE_DIR", "~/fl_cache")
    assert tuning.cache_dir() == tmp_path / "fl_cache"
    monkeypatch.setenv("FUSED_LORA_CACHE_DIR", " OFF ")
    assert tuning.cache_dir() is None


@pytest.mark.parametrize(("value", "on"), [("0", False), (" off\n", False), ("FALSE", False), ("no", False),
                                           ("1", True), ("On", True), ("true ", True), ("", True)])  # fmt: skip
def test_autotune_variable_is_parsed_as_a_boolean(monkeypatch, value, on):
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", value)
    assert tuning.autotune_enabled() is on


def test_autotune_variable_rejects_anything_else(monkeypatch):
    monkeypatch.setenv("FUSED_LORA_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match=r"FUSED_LORA_AUTOTUNE must be one of .*got 'maybe'"):
        tuning.autotune_enabled()


def test_tuner_choices_belong_to_one_gpu_model(fake_gpu, monkeypatch):
    """One process may drive two GPU models: a choice timed on one is not reused on the other (the key
    used to carry no device identity)."""
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(tuning, "_cuda_name", lambda index: names[index], raising=False)
    table = tuning.table("test-devices")
    bench = lambda name: lambda: name
    for index in (0, 1, 0, 1):
        assert table.pick(("k",), ["slow", "fast"], bench, torch.device("cuda", index)) == "fast"
    assert fake_gpu == ["slow", "fast"] * 2, "timed once per GPU model, then remembered"


def test_tma_is_never_asked_to_address_overlapping_rows():
    """An expanded x or dY (row stride 0: one row broadcast to M) or rows closer than their length used
    to pass tma_compatible (0 is a multiple of 16 bytes) and would have gone to a descriptor on Hopper;
    they take the pointer path now. Ordinary and row-padded views still qualify."""
    from fused_lora.kernels.utils import row_padded, tma_compatible

    base = torch.zeros(4096, dtype=torch.bfloat16)
    assert not tma_compatible(base[:64].expand(32, 64))
    assert not tma_compatible(base.as_strided((32, 64), (8, 1)))  # rows 16 bytes apart, 128 bytes long
    assert tma_compatible(base[:2048].view(32, 64)) and tma_compatible(row_padded(5, 12, "cpu"))
    assert tma_compatible(base[:64].expand(1, 64))  # one row: nothing overlaps


_CACHE_WRITER = """
import sys, torch
from fused_lora.kernels import tuning
tuning.can_time = lambda device: True
tuning.capturing = lambda device: False
tuning.measure = lambda fn: {"fast": 1.0, "slow": 2.0}[fn()]
table = tuning.table("race")
for j in range(300):
    table.pick((sys.argv[1], j), ["slow", "fast"], lambda n: (lambda: n), torch.device("cpu"))
"""


def test_processes_sharing_the_cache_directory_keep_every_choice(tmp_path):
    """Two processes caching 300 choices each into one directory: read-merge-replace without a lock
    between processes lost the other's entries (420 of 600 in one run); with the lock none is lost."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "FUSED_LORA_CACHE_DIR": str(tmp_path), "TRITON_INTERPRET": "1"}
    env.pop("FUSED_LORA_AUTOTUNE", None)
    procs = [subprocess.Popen([sys.executable, "-c", _CACHE_WRITER, str(i)], env=env) for i in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    (cache,) = tmp_path.glob("choices-*.json")
    assert len(json.loads(cache.read_text())["choices"]) == 600
