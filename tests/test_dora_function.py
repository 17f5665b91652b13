"""DoRA with the column scale in the GEMM's epilogue (fused_lora/dora_function.py): y = (x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ)
⊙ m/n on the fused GEMM (the scale in its epilogue) or the hybrid (cuBLAS's x·Wᵀ, then one pass adding the
term and scaling), y saved instead of z, the magnitude's gradient recovered from y (and recomputed from x
where m_j = 0).

Checked against float64 autograd of the formula with the kernels' own dropout mask (the tolerance rule of
helpers: a multiple of plain torch's error in the same dtype), on odd shapes and ranks that are not powers
of two, fp32 / fp16 and mixed adapters, both implementations; which kernels run (so a swap for the
reference, or for the unfused composition, fails); what is saved; double backward; the tuner's keys.
"""

from __future__ import annotations

import types

import pytest
import torch

import fused_lora
from fused_lora import dora, reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import LAUNCHES, dropout_mask, tuning

from helpers import assert_close_to_ref

DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16+fp32A"]


def _inputs(M, K, N, r, s, dead=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    a, b = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / 3
    n = (w.double() + s * b.double() @ a.double()).norm(dim=1)
    m = (n * (1 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64))).float()
    m[list(dead)] = 0.0
    dy = torch.randn(2, M, N, generator=g)
    return x, w, a, b, m, n, dy


def _ours(x, w, a, b, m, s, p, dy, dtype, lora_dtype, impl="fused"):
    xs = x.to(dtype).detach().clone().requires_grad_()
    as_, bs, ms = (t.to(lora_dtype).detach().clone().requires_grad_() for t in (a, b, m))
    with fused_lora.use_impl(impl):
        torch.manual_seed(5)
        y = dora.dora_linear(xs, w.to(dtype), as_, bs, ms, s, None, p)
        y.backward(dy.to(dtype))
    return [y.detach(), xs.grad, as_.grad, bs.grad, ms.grad]


def _formula(x, w, a, b, m, n, s, p, dy, dtype, lora_dtype, mask):
    """torch autograd of (x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) ⊙ m/n with a given mask, in `dtype` (float64: the truth)."""
    lo = torch.promote_types(dtype, lora_dtype)
    xs = x.to(dtype).detach().clone().requires_grad_()
    as_, bs, ms = (t.to(lora_dtype).detach().clone().requires_grad_() for t in (a, b, m))
    z = reference.lora_linear(xs, w.to(dtype), as_, bs, s, None, p, dropout_mask=mask)
    y = (z.to(lo) * (ms.to(lo) / n.to(lo))).to(dtype)
    y.backward(dy.to(dtype))
    return [y.detach(), xs.grad, as_.grad, bs.grad, ms.grad]


def _mask(x, p):
    if p == 0.0:
        return None
    torch.manual_seed(5)
    return dropout_mask(_draw_seed(x.device), x.shape[0] * x.shape[1], x.shape[2], p).reshape(x.shape)


@pytest.mark.parametrize("impl", ["fused", "hybrid"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", [7, 33])
def test_epilogue_scale_against_float64(r, dtypes, p, impl):
    """y and the gradients of x, A, B, m against float64 with the kernels' mask; m_j = 0 in two columns
    (their dm recomputed from x: y is zero there)."""
    dtype, lora_dtype = dtypes
    s = 1.7
    x, w, a, b, m, n, dy = _inputs(19, 45, 41, r, s, dead=(3, 40))
    before = LAUNCHES.copy()
    got = _ours(x, w, a, b, m, s, p, dy, dtype, lora_dtype, impl)
    ran = LAUNCHES - before
    gemm = "_lora_gemm_kernel" if impl == "fused" else "_low_rank_kernel"
    # y, then dX: the GEMM (or the hybrid's pass) twice; dz and dm's sums in the grad pass; no pass of its own
    assert ran[gemm] == 2 and ran["_lora_grad_kernel"] == 1 and ran["_dead_columns_kernel"] == 1, ran
    assert not {"_scale_fwd_kernel", "_scale_bwd_kernel"} & set(ran), f"the column scale ran as its own pass: {ran}"
    mask = _mask(x, p)
    ref64 = _formula(x, w, a, b, m, n, s, p, dy, torch.float64, torch.float64, mask)
    same = _formula(x, w, a, b, m, n.to(torch.float32), s, p, dy, dtype, lora_dtype, mask)
    for name, g, r64, t in zip(("y", "dX", "dA", "dB", "dm"), got, ref64, same):
        assert_close_to_ref(name, g, r64, t)
    assert got[4][[3, 40]].abs().min() > 0.01 * got[4].abs().max(), "dm of a zero-magnitude column was lost"


def test_many_zero_magnitudes_whole_blocks_included():
    """Zero magnitudes in a whole 16-column block and scattered elsewhere: each one's dm = Σ dY·z / n from
    the recomputation, the others' from y."""
    s = 0.9
    dead = (*range(16, 32), 5, 47, 70)
    x, w, a, b, m, n, dy = _inputs(23, 40, 71, 5, s, dead=dead, seed=4)
    got = _ours(x, w, a, b, m, s, 0.0, dy, torch.float32, torch.float32)
    ref64 = _formula(x, w, a, b, m, n, s, 0.0, dy, torch.float64, torch.float64, None)
    same = _formula(x, w, a, b, m, n.float(), s, 0.0, dy, torch.float32, torch.float32, None)
    for name, g, r64, t in zip(("y", "dX", "dA", "dB", "dm"), got, ref64, same):
        assert_close_to_ref(name, g, r64, t)
    assert (got[0][..., list(dead)] == 0).all()


@pytest.mark.parametrize("trains", ["m", "m+x", "m+A+B"])
def test_whichever_inputs_train(trains):
    """Only m (the column-scale pass alone), m and x (dz for dX, no dA/dB), m, A and B (no dX: dz not
    written): each gradient against float64."""
    s = 1.1
    x, w, a, b, m, n, dy = _inputs(11, 30, 26, 6, s, dead=(2,), seed=7)
    leaves = {"x": x.clone(), "A": a.clone(), "B": b.clone(), "m": m.clone()}
    for k, t in leaves.items():
        t.requires_grad_(k in trains)
    y = dora.dora_linear(leaves["x"], w, leaves["A"], leaves["B"], leaves["m"], s)
    y.backward(dy)
    ref64 = _formula(x, w, a, b, m, n, s, 0.0, dy, torch.float64, torch.float64, None)
    same = _formula(x, w, a, b, m, n.float(), s, 0.0, dy, torch.float32, torch.float32, None)
    for i, k in enumerate(("x", "A", "B", "m"), start=1):
        if k in trains:
            assert_close_to_ref("d" + k, leaves[k].grad, ref64[i], same[i])
        else:
            assert leaves[k].grad is None


def test_the_output_is_what_is_saved():
    """Beyond LoRA's x, xa, seed: c [N] and y itself (the same storage as the returned output), no z."""
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.0)
    xs = x.requires_grad_()
    ms = m.requires_grad_()
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        y = dora.dora_linear(xs, w, a, b, ms, 1.0)
    ptr = lambda t: t.untyped_storage().data_ptr()
    big = [t for t in seen if t.numel() >= y.numel() and ptr(t) != ptr(w)]  # activation-sized, W aside
    outputs = [t for t in big if ptr(t) == ptr(y)]
    inputs = [t for t in big if ptr(t) == ptr(xs)]
    assert len(outputs) == 1 and len(outputs) + len(inputs) == len(big), [tuple(t.shape) for t in big]


def test_an_in_place_edit_of_the_output_is_refused_not_used():
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.0)
    ms = m.requires_grad_()
    y = dora.dora_linear(x, w, a, b, ms, 1.0)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_with_bias_the_composition_runs():
    """A bias keeps the unfused composition (z saved; a bias-dominated column would lose z's digits in y)."""
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.0)
    before = LAUNCHES.copy()
    dora.dora_linear(x, w, a, b, m, 1.0, torch.randn(20))
    assert (LAUNCHES - before)["_scale_fwd_kernel"] == 1


def test_double_backward_matches_the_reference_backend():
    """create_graph=True: the backward is built from differentiable ops with the kernels' mask, so a
    gradient of a gradient equals the reference backend's (p = 0: the same draws either way)."""
    x, w, a, b, m, n, dy = _inputs(7, 20, 18, 4, 1.3)

    def second(backend):
        xs, as_, bs, ms = (t.clone().requires_grad_() for t in (x, a, b, m))
        with fused_lora.use_backend(backend):
            y = dora.dora_linear(xs, w, as_, bs, ms, 1.3)
            gx, = torch.autograd.grad(y, xs, dy, create_graph=True)
        (gx.square().sum()).backward()
        return [as_.grad, bs.grad, ms.grad]

    for name, g, want in zip(("A", "B", "m"), second("triton"), second("reference")):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5, msg=lambda s: f"d²/d{name}: {s}")


def test_the_tuner_keys_on_dora(monkeypatch):
    keys = []
    real = tuning.Choices.pick

    def spy(self, key, candidates, bench, device):
        keys.append((self.name, key))
        return real(self, key, candidates, bench, device)

    monkeypatch.setattr(tuning.Choices, "pick", spy)
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.0)
    with fused_lora.use_impl("fused"):
        dora.dora_linear(x, w, a, b, m, 1.0)
    assert any(name == "gemm" and "col_scale" in key for name, key in keys), keys
    with fused_lora.use_impl("hybrid"):
        dora.dora_linear(x, w, a, b, m, 1.0)
    assert any(name == "low_rank" and "col_scale" in key and "base" in key for name, key in keys), keys


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize(
    "dtype, lora_dtype, r", [(torch.float32, torch.float32, 5), (torch.float16, torch.float32, 12),
                             (torch.float32, torch.float32, 70)],  # fmt: skip  (r = 70 in fp32: three rank blocks)
)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_grad_pass_writes_dz_and_the_column_sums(split, dtype, lora_dtype, r, deterministic):
    """kernels.lora_grad with `dora`: dz = dY ⊙ c rounded once to dY's dtype (bit for bit), Σ_m dY·y per
    column against float64, g / dA / dB those of the scaled B — whole or split, one rank block or three
    (only the first writes), atomics or the deterministic slices."""
    from fused_lora.kernels import configs, lora_grad

    M, N, K, s = 37, 150, 130, 0.7
    g = torch.Generator().manual_seed(2)
    dy, y, x = (torch.randn(M, cols, generator=g).to(dtype) for cols in (N, N, K))
    B, xa = (torch.randn(N, r, generator=g) / 4).to(lora_dtype), torch.randn(M, r, generator=g)
    c = torch.rand(N, generator=g) + 0.5
    dz, sums = torch.full_like(dy, float("nan")), torch.full((N,), float("nan"))
    name = configs.name(configs.GRAD_INTERPRET[0]) + (f" split{split}" if split else "")
    with tuning.force("grad", name):
        got = lora_grad(dy, B, xa, x, scaling=s, deterministic=deterministic, dora=(c, y, dz, sums))
        plain = lora_grad(dy, B, xa, x, scaling=s, deterministic=deterministic)
    assert torch.equal(dz, (dy.float() * c).to(dtype)), "dz is not dY ⊙ c rounded once"
    want = (dy.double() * y.double()).sum(0)
    err = (sums.double() - want).abs().max().item()
    assert err <= 8 * M * 2.0**-24 * (dy.double().abs() * y.double().abs()).sum(0).max().item(), err
    for a, b in zip(got, plain):
        assert torch.equal(a, b) if deterministic else torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "hybrid"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["bf16", "bf16+fp32A"])  # fmt: skip
@pytest.mark.parametrize("shape", [(19, 45, 41, 7), (250, 1536, 1048, 16)], ids=["odd", "realistic"])
def test_bf16_epilogue_scale_on_the_gpu(shape, dtypes, p, impl):
    """bf16 (GPU only: the interpreter's bf16 products are wrong), an odd shape and one past every block
    size through the autotuner, zero magnitudes included: y and all gradients against float64."""
    M, K, N, r = shape
    dtype, lora_dtype = dtypes
    s = 2.0
    cpu = _inputs(M, K, N, r, s, dead=(3, N - 1))
    x, w, a, b, m, n, dy = (t.cuda() for t in cpu)
    got = _ours(x, w, a, b, m, s, p, dy, dtype, lora_dtype, impl)
    mask = _mask(x, p)
    ref64 = _formula(x, w, a, b, m, n, s, p, dy, torch.float64, torch.float64, mask)
    same = _formula(x, w, a, b, m, n.float(), s, p, dy, dtype, lora_dtype, mask)
    for name, g, r64, t in zip(("y", "dX", "dA", "dB", "dm"), got, ref64, same):
        assert_close_to_ref(name, g, r64, t)


# ------------------------------------------------------------------- defects found by review (each failed before)


@pytest.mark.parametrize("how", ["sum", "transposed"])
def test_zero_magnitude_columns_with_a_strided_dy(how):
    """dY as autograd hands it: y.sum() gives an expanded dY (strides 0, 0), a transposed loss a transposed
    one; the zero-magnitude columns' recomputation read dY as if its columns were contiguous."""
    s = 1.2
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, s, dead=(4, 11), seed=1)
    x = x[0]  # [9, 24]: dY keeps the loss's strides (a leading dim would make the reshape copy it)
    weights = torch.randn(20, 9)
    loss = (lambda y: y.sum()) if how == "sum" else (lambda y: (y.t() * weights).sum())
    ms = m.clone().requires_grad_()
    loss(dora.dora_linear(x, w, a, b, ms, s)).backward()
    m64 = m.double().requires_grad_()
    z = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), s, None, 0.0)
    loss(z * (m64 / n)).backward()
    torch.testing.assert_close(ms.grad.double(), m64.grad, rtol=1e-5, atol=1e-5)


def test_the_hybrid_survives_the_tuner_timing_it(monkeypatch):
    """The tuner times a candidate by running it several times on the real inputs; the hybrid's pass ran
    in place on cuBLAS's output, so every run scaled the previous one's result again (y off by 10x)."""
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "measure", lambda fn: [fn() for _ in range(3)] and 1.0)
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.3, seed=2)
    for name in ("low_rank", "gemm", "impl"):
        monkeypatch.setattr(tuning.table(name), "_memory", {})
    monkeypatch.setattr(tuning, "_disk", lambda: types.SimpleNamespace(get=lambda *a: None, put=lambda *a: None))
    want = reference.lora_linear(x.double(), w.double(), a.double(), b.double(), 1.3, None, 0.0) * (m.double() / n)
    for impl in ("hybrid", "fused", "auto"):
        with fused_lora.use_impl(impl):
            y = dora.dora_linear(x, w, a, b, m, 1.3)
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5, msg=lambda s: f"{impl}: {s}")


def test_fp16_tiny_and_huge_scales_keep_dm():
    """fp16 y = z ⊙ c underflows where c is tiny but not zero (c = 1e-8: y = 0; 1e-5: subnormal) and
    overflows where c is huge (1e5: y = inf): m's gradient there is recomputed from x, not read from y."""
    s = 1.3
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, s, seed=3)
    m = m.clone()
    m[[2, 7]], m[4], m[5] = n[[2, 7]].float() * 1e-8, n[4].float() * 1e-5, n[5].float() * 1e5
    got = _ours(x, w, a, b, m, s, 0.0, dy, torch.float16, torch.float32)
    assert torch.isfinite(got[4]).all(), got[4]
    ref64 = _formula(x.half(), w.half(), a, b, m, n, s, 0.0, dy.half(), torch.float64, torch.float64, None)
    same = _formula(x.half(), w.half(), a, b, m, n.float(), s, 0.0, dy.half(), torch.float32, torch.float32, None)
    assert_close_to_ref("dm", got[4], ref64[4], same[4], torch.float16)


def test_fp16_adapters_small_scaled_rows_keep_their_digits():
    """fp16 adapters, small B and c = 1e-3: c ⊙ B rounded to fp16 fell into its subnormals (dA off by 2 %);
    it is kept in fp32."""
    s = 1.0
    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, s, seed=4)
    b = b * 3e-3
    n = (w.half().double() + s * b.half().double() @ a.half().double()).norm(dim=1)
    m = (n * 1e-3).float()
    got = _ours(x, w, a, b, m, s, 0.0, dy, torch.float16, torch.float16)
    ref64 = _formula(x.half(), w.half(), a.half(), b.half(), m, n, s, 0.0, dy.half(), torch.float64, torch.float64,
                     None)  # fmt: skip
    same = _formula(x.half(), w.half(), a.half(), b.half(), m, n.float(), s, 0.0, dy.half(), torch.float16,
                    torch.float16, None)  # fmt: skip
    for name, g, r64, t in zip(("dA", "dB"), got[2:4], ref64[2:4], same[2:4]):
        assert_close_to_ref(name, g, r64, t)


@pytest.mark.parametrize("impl", ["fused", "hybrid"])
def test_a_training_step_reads_nothing_back_to_the_host(impl):
    """CUDA-graph safe: forward and backward (dropout, a zero magnitude, the factored norm and its guard)
    make no host sync — item(), tolist(), nonzero, a bool-mask index — seen on CPU tensors too."""
    from helpers import host_syncs

    x, w, a, b, m, n, dy = _inputs(9, 24, 20, 3, 1.1, dead=(5,), seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, m)]

    def step():
        with fused_lora.use_impl(impl):
            y = dora.dora_linear(leaves[0], w, leaves[1], leaves[2], leaves[3], 1.1, dropout_p=0.2)
            y.backward(dy)

    step()
    assert host_syncs(step) == []
