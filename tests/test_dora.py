"""DoRA on the fused path (fused_lora.dora) and PEFT's DoRA ``lora.Linear`` layers under patch_peft_model.

Checked against the peer that defines it — PEFT's own DoRA layer, in float64 as the truth and in the
same dtype as the tolerance yardstick (helpers' rule) — forward and the gradients of x, A, B and the
magnitude m; against the float64 formula with the kernels' own mask when dropout is on; the factored
weight norm against the direct one, its cancellation guard, and its cache of ‖W‖² after W changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fused_lora
from fused_lora import dora, reference
from fused_lora.function import _draw_seed
from fused_lora.kernels import LAUNCHES, dropout_mask

from helpers import assert_close_to_ref

peft = pytest.importorskip("peft")


def _direct_norm(w, a, b, s):
    return (w.double() + s * b.double() @ a.double()).norm(dim=1)


# ------------------------------------------------------------------------------------------ the norm


@pytest.mark.parametrize(("out", "inp", "r"), [(37, 53, 1), (64, 130, 7), (29, 16, 16), (41, 70, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_factored_norm_matches_the_direct_one(out, inp, r, dtype):
    """n_j = ‖W_j + s·(B·A)_j‖ without B·A, to fp32 rounding of the float64 direct norm (W in its dtype,
    adapters fp32), also for W stored transposed (GPT-2's Conv1D: a transposed view)."""
    g = torch.Generator().manual_seed(out + r)
    w = torch.randn(out, inp, generator=g).to(dtype)
    a, b = torch.randn(r, inp, generator=g) / 3, torch.randn(out, r, generator=g) / 5
    for weight in (w, w.t().contiguous().t()):
        n = dora.dora_norm(weight, a, b, 1.7)
        want = _direct_norm(weight, a, b, 1.7)
        assert n.dtype == torch.float32 and n.shape == (out,)
        err = ((n.double() - want).abs() / want).max().item()
        assert err <= 4 * 2.0**-24, f"relative error {err:.3g}"


def test_cancellation_rows_are_recomputed_directly(monkeypatch):
    """Rows where the adapter cancels W_j almost exactly (n_j ≪ ‖W_j‖): the factored form's error bound
    exceeds n_j², and those rows are recomputed in float64. W·Aᵀ is taken at the GPU path's precision
    (fp32 products, its ε), as on a GPU with 16-bit W; without the guard those rows are wrong by orders
    of magnitude (so the test sees the guard)."""
    monkeypatch.setattr(
        dora, "_w_times_at", lambda w, a: ((w.float() @ a.float().t()).double(), 2.0**-16 + w.shape[1] * 2.0**-24)
    )
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g)
    a, b, s = torch.randn(6, 64, generator=g), torch.randn(40, 6, generator=g), 0.5
    delta = s * (b @ a)
    w[5] = -delta[5] + 1e-5 * torch.randn(64, generator=g)  # n_5 ~ 1e-4 against ‖W_5‖ ~ 20
    w[9] = -delta[9]
    want = _direct_norm(w, a, b, s)
    got = dora.dora_norm(w, a, b, s).double()
    rel = (got - want).abs() / want.clamp_min(1e-30)
    assert rel[5] < 1e-5, rel[5]
    assert (got[9] - want[9]).abs() < 1e-6
    assert rel[[i for i in range(40) if i not in (5, 9)]].max() < 1e-6
    monkeypatch.setattr(dora, "GUARD_ROWS", 0)
    unguarded = dora.dora_norm(w.clone(), a, b, s).double()
    assert (unguarded[5] - want[5]).abs() / want[5] > 1e-3


def test_weight_norm_cache_follows_the_weight(monkeypatch):
    """‖W_j‖² is computed once per weight version: an in-place change to W refreshes it (a stale cache
    would give the old norm), a transposed view shares its base's entry."""
    calls = []
    real = dora._sq_norms
    monkeypatch.setattr(dora, "_sq_norms", lambda w: calls.append(1) or real(w))
    w = torch.nn.Parameter(torch.randn(12, 20), requires_grad=False)
    a, b = torch.randn(3, 20), torch.randn(12, 3) / 4
    first = dora.dora_norm(w, a, b, 1.0)
    dora.dora_norm(w, a, b, 1.0)
    assert len(calls) == 1
    with torch.no_grad():
        w.mul_(2.0)
    again = dora.dora_norm(w, a, b, 1.0)
    assert len(calls) == 2
    torch.testing.assert_close(again.double(), _direct_norm(w, a, b, 1.0), rtol=1e-6, atol=0)
    assert not torch.allclose(again, first)
    wt = torch.randn(20, 12)
    dora.dora_norm(wt.t(), a, b, 1.0)
    dora.dora_norm(wt.t(), a, b, 1.0)  # a new view object of the same tensor: still a hit
    assert len(calls) == 3
    # a weight whose version does not follow its values (FSDP2's unsharded copies): cache=False
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(w):
        w.mul_(0.5)
    stale = dora.dora_norm(w, a, b, 1.0)  # the cache cannot see this change ...
    assert len(calls) == 3 and not torch.allclose(stale.double(), _direct_norm(w, a, b, 1.0), rtol=1e-3)
    fresh = dora.dora_norm(w, a, b, 1.0, cache=False)  # ... which is why fsdp_managed layers pass cache=False
    assert len(calls) == 4
    torch.testing.assert_close(fresh.double(), _direct_norm(w, a, b, 1.0), rtol=1e-6, atol=0)


def test_dora_layer_output_is_not_a_view():
    """FSDP2 hangs its pre-backward hook on a unit's output; an in-place op on a view drops it (garbage
    gradients). The column-scale kernels' output came back as a .view of the [M, out] result."""
    layer = fused_lora.LoRALinear(20, 12, 3, 6, use_dora=True)
    x = torch.randn(2, 5, 20)
    for backend in ("triton", "reference"):
        with fused_lora.use_backend(backend):
            y = layer(x)
        assert y.shape == (2, 5, 12) and y._base is None, backend
        y.sum().backward()


def test_bad_magnitude_is_a_clear_error():
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"magnitude \[4\] must be \[out_features\] = \[5\]"):
        dora.dora_linear(x, w, a, b, torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        dora.dora_linear(x, w, a, b, [1.0] * 5, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        dora.dora_linear(x, w, a, b, torch.ones(5, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="formula"):
        dora.dora_linear(x, w, a, b, torch.ones(5), 1.0, formula="exact")


# --------------------------------------------------------------------------- against PEFT's own layer


class _Net(torch.nn.Module):
    def __init__(self, K: int, N: int, bias: bool, conv1d: bool = False) -> None:
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(N, K)
            if not bias:
                self.lin.bias = None
        else:
            self.lin = torch.nn.Linear(K, N, bias=bias)

    def forward(self, x):
        return self.lin(x)


def peft_dora(K, N, r, dtype, lora_dtype, bias=True, dropout=0.0, conv1d=False, alpha=9):
    """A PEFT model with one DoRA lora.Linear: B and m not at their initial values (B nonzero, m ≠ n),
    the base layer in `dtype`, adapters and magnitude in `lora_dtype`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(K * 7 + r)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=True, lora_dropout=dropout,
                     init_lora_weights=False, fan_in_fan_out=conv1d)  # fmt: skip
    model = get_peft_model(_Net(K, N, bias, conv1d), cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.3 * torch.rand_like(m))
    layer.get_base_layer().to(dtype)
    for mod in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        mod.to(lora_dtype)
    return model


def _run(model, x, dy):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    layer = model.base_model.model.lin
    grads = [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
             layer.lora_magnitude_vector["default"].weight.grad]  # fmt: skip
    return [y.detach(), x.grad] + [g.clone() for g in grads]


DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16+fp32A"]


@pytest.mark.parametrize("r", [1, 7, 16, 33])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_patched_dora_matches_peft(r, dtypes, bias):
    """Training mode, p = 0: y and the gradients of x, A, B, m from the patched layer (our kernels)
    against PEFT's DoRA in float64, within the rule's multiple of PEFT's own error in the same dtype."""
    dtype, lora_dtype = dtypes
    K, N = 53, 41
    ours = peft_dora(K, N, r, dtype, lora_dtype, bias)
    same = copy.deepcopy(ours)
    truth = copy.deepcopy(ours).double()
    report = fused_lora.patch_peft_model(ours)
    assert len(report.patched) == 1, report
    x = torch.randn(3, 13, K).to(dtype)
    dy = torch.randn(3, 13, N).to(dtype)
    before = LAUNCHES.copy()
    got = _run(ours, x, dy)
    assert LAUNCHES["_lora_gemm_kernel"] + LAUNCHES["_low_rank_kernel"] > before["_lora_gemm_kernel"] + before[
        "_low_rank_kernel"
    ], "the patched DoRA layer did not run the kernels"
    ref = _run(truth, x.double(), dy.double())
    yardstick = _run(same, x, dy)
    for name, g, r64, t in zip(("y", "dX", "dA", "dB", "dm"), got, ref, yardstick):
        # dA, dB: the kernels take dz = dY·m/n in x's dtype (as LoRA's take dY), where PEFT's promotion keeps
        # its DoRA term in fp32 with fp32 adapters: the floor is x's dtype's (fused_lora.dora, "Gradients")
        assert_close_to_ref(name, g, r64, t, dtype if name in ("dA", "dB") else None)


def test_patched_dora_matches_peft_with_fan_in_fan_out():
    """GPT-2's Conv1D (W stored [in, out]) with DoRA: the transposed weight view, norm and all."""
    ours = peft_dora(24, 18, 5, torch.float32, torch.float32, conv1d=True)
    truth = copy.deepcopy(ours).double()
    same = copy.deepcopy(ours)
    assert len(fused_lora.patch_peft_model(ours).patched) == 1
    x, dy = torch.randn(7, 24), torch.randn(7, 18)
    for name, g, r64, t in zip(("y", "dX", "dA", "dB", "dm"), _run(ours, x, dy), _run(truth, x.double(), dy.double()),
                               _run(same, x, dy)):  # fmt: skip
        assert_close_to_ref(name, g, r64, t)


def test_eval_with_dropout_configured_matches_peft():
    """p > 0 configured, eval mode: no dropout; the same output as PEFT's layer."""
    ours = peft_dora(40, 30, 6, torch.float32, torch.float32, dropout=0.3)
    theirs = copy.deepcopy(ours)
    fused_lora.patch_peft_model(ours)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=2e-5, atol=2e-5)


def test_dropout_fused_formula_against_float64_with_the_kernels_mask():
    """Training with p > 0, formula 'fused': y = (m/n)·(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + b with the kernels' own
    mask (regenerated from the same seed), forward and all gradients against float64 autograd."""
    K, N, r, s, p = 45, 33, 7, 1.3, 0.3
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 17, K, generator=g)
    w, bias = torch.randn(N, K, generator=g) / 6, torch.randn(N, generator=g)
    a, b = torch.randn(r, K, generator=g) / 5, torch.randn(N, r, generator=g) / 5
    m = _direct_norm(w, a, b, s).float() * (1 + 0.2 * torch.rand(N, generator=g))
    dy = torch.randn(2, 17, N, generator=g)

    def run(dtype, mask=None):
        xs, as_, bs, ms = (t.to(dtype).clone().requires_grad_() for t in (x, a, b, m))
        if mask is None:
            torch.manual_seed(5)
            y = dora.dora_linear(xs, w, as_, bs, ms, s, bias, p, formula="fused")
        else:
            n = _direct_norm(w, a, b, s).to(dtype)
            z = reference.lora_linear(xs, w.to(dtype), as_, bs, s, None, p, dropout_mask=mask)
            y = z * (ms / n) + bias.to(dtype)
        y.backward(dy.to(dtype))
        return [y.detach(), xs.grad, as_.grad, bs.grad, ms.grad]

    got = run(torch.float32)
    torch.manual_seed(5)
    mask = dropout_mask(_draw_seed(x.device), 34, K, p).reshape(x.shape)
    ref64, same = run(torch.float64, mask), run(torch.float32, mask)
    for name, gg, rr, tt in zip(("y", "dX", "dA", "dB", "dm"), got, ref64, same):
        assert_close_to_ref(name, gg, rr, tt)


def test_dropout_peft_formula_matches_peft_bit_for_bit_in_expectation_and_draws():
    """Training with p > 0 under dora_formula 'peft': PEFT's own formula (a second base GEMM on the
    dropped input, torch's dropout), so with the same torch RNG state the patched layer gives PEFT's
    output and gradients; under 'fused' it does not (a different formula, equal in expectation)."""
    ours = peft_dora(36, 28, 4, torch.float32, torch.float32, dropout=0.25)
    theirs = copy.deepcopy(ours)
    fused_lora.patch_peft_model(ours)
    x, dy = torch.randn(9, 36), torch.randn(9, 28)
    torch.manual_seed(21)
    want = _run(theirs, x, dy)
    with dora.use_dora_formula("peft"):
        torch.manual_seed(21)
        got = _run(ours, x, dy)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-5, atol=1e-5)
    torch.manual_seed(21)
    fused = _run(copy.deepcopy(ours), x, dy)
    assert not torch.allclose(fused[0], want[0], atol=1e-3)


def test_patched_dora_model_behaves_as_peft(tmp_path):
    """Merging, disable_adapter, save_pretrained / from_pretrained: PEFT's own machinery on the same
    parameters, and the patched forward again afterwards."""
    from peft import PeftModel

    ours = peft_dora(32, 24, 4, torch.float32, torch.float32)
    theirs = copy.deepcopy(ours)
    report = fused_lora.patch_peft_model(ours)
    assert "lora.Linear" in str(report) and not report.not_patched
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=2e-5, atol=2e-5)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(x), theirs(x))
        ours.save_pretrained(tmp_path / "a")
        base = _Net(32, 24, True)
        base.load_state_dict({k.replace("base_model.model.", "").replace(".base_layer", ""): v
                              for k, v in theirs.state_dict().items() if "lora_" not in k})  # fmt: skip
        loaded = PeftModel.from_pretrained(base, tmp_path / "a")
        fused_lora.patch_peft_model(loaded)
        torch.testing.assert_close(loaded(x), theirs(x), rtol=2e-5, atol=2e-5)
        merged = copy.deepcopy(ours).merge_and_unload()
        torch.testing.assert_close(merged(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_hybrid_and_reference_backends_agree():
    """The DoRA path on the hybrid implementation and on the reference backend gives the fused result."""
    K, N, r = 29, 22, 3
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(10, K, generator=g), torch.randn(N, K, generator=g)
    a, b, m = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g) / 3, torch.rand(N, generator=g) + 1
    fused = dora.dora_linear(x, w, a, b, m, 2.0, None)
    with fused_lora.use_impl("hybrid"):
        hybrid = dora.dora_linear(x, w, a, b, m, 2.0, None)
    with fused_lora.use_backend("reference"):
        ref = dora.dora_linear(x, w, a, b, m, 2.0, None)
    torch.testing.assert_close(hybrid, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, fused, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- LoRALinear(use_dora=True), adapter files


def _dora_layer(fan_in_fan_out=False, dtype=torch.float32, K=20, N=12, r=3):
    torch.manual_seed(4)
    layer = fused_lora.LoRALinear(K, N, r=r, lora_alpha=6, fan_in_fan_out=fan_in_fan_out, use_dora=True, dtype=dtype,
                                  lora_dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude))
    return layer


def test_lora_linear_dora_is_the_lora_layer_at_init_and_peft_after():
    """At creation m = ‖W_j‖ (B = 0), so the layer computes its LoRA twin's y; trained, it computes PEFT's
    DoRA layer with the same parameters (forward and the gradients of x, A, B, m)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    layer = fused_lora.LoRALinear.from_linear(copy.deepcopy(lin), r=4, lora_alpha=8, use_dora=True)
    twin = fused_lora.LoRALinear.from_linear(copy.deepcopy(lin), r=4, lora_alpha=8)
    with torch.no_grad():
        twin.lora_A.copy_(layer.lora_A)
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), twin(x), rtol=1e-6, atol=1e-6)
    theirs = peft_dora(24, 16, 4, torch.float32, torch.float32, alpha=8)
    peft_layer = theirs.base_model.model.lin
    with torch.no_grad():
        layer.weight.copy_(peft_layer.get_base_layer().weight)
        layer.bias.copy_(peft_layer.get_base_layer().bias)
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.lora_magnitude.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    dy = torch.randn(5, 16)
    want = _run(theirs, x, dy)
    xs = x.clone().requires_grad_()
    y = layer(xs)
    y.backward(dy)
    got = [y.detach(), xs.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad]
    for name, g, w in zip(("y", "dX", "dA", "dB", "dm"), got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=name)
    assert "use_dora=True" in repr(layer)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["nk", "fan_in_fan_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_lora_linear_dora_merge_round_trips_exactly(fan_in_fan_out, dtype):
    """eval() merges W' = (m/n)·(W + s·B·A): the output stays; train() gives W back bit for bit — also
    after deepcopy, pickling, and a merged state_dict (with its dora_norm) loaded into a fresh layer."""
    import pickle

    layer = _dora_layer(fan_in_fan_out, dtype)
    x = torch.randn(6, 20, dtype=dtype)
    w0, y0 = layer.weight.detach().clone(), layer(x).detach()
    layer.eval()
    assert layer.merged
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(layer(x), y0, rtol=tol, atol=tol)
    state = layer.state_dict()
    assert "dora_norm" in state and "unmerge_index" in state
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        copied.train()
        assert torch.equal(copied.weight, w0)
    fresh = _dora_layer(fan_in_fan_out, dtype)
    with torch.no_grad():
        fresh.lora_B.zero_()
    fresh.eval()
    fresh.load_state_dict(state)
    fresh.train()
    assert torch.equal(fresh.weight, w0)
    torch.testing.assert_close(fresh(x), y0, rtol=0, atol=0)
    layer.train()
    assert torch.equal(layer.weight, w0)
    incomplete = {k: v for k, v in state.items() if k != "dora_norm"}
    with pytest.raises(RuntimeError, match="dora_norm"):
        _dora_layer(fan_in_fan_out, dtype).eval().load_state_dict(incomplete)


def test_dora_adapter_files_both_ways(tmp_path):
    """save_adapter writes PEFT's DoRA file (use_dora, lora_magnitude_vector): PeftModel.from_pretrained
    computes what our model does; a file PEFT saved loads with load_adapter into a plain model."""
    from peft import PeftModel

    torch.manual_seed(1)
    model = _Net(20, 14, True)
    plain = copy.deepcopy(model)
    fused_lora.inject_lora(model, ["lin"], r=3, lora_alpha=6, use_dora=True)
    layer = model.lin
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.25)
    fused_lora.save_adapter(model, tmp_path / "ours")
    x = torch.randn(4, 20)
    theirs = PeftModel.from_pretrained(copy.deepcopy(plain), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=2e-5, atol=2e-5)
    peft_saved = peft_dora(20, 14, 3, torch.float32, torch.float32)
    peft_saved.save_pretrained(tmp_path / "peft")
    target = _Net(20, 14, True)
    target.lin.load_state_dict(peft_saved.base_model.model.lin.get_base_layer().state_dict())
    fused_lora.load_adapter(target, tmp_path / "peft")
    assert target.lin.use_dora
    with torch.no_grad():
        torch.testing.assert_close(target(x), peft_saved(x), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="use_dora=False"):
        lora_model = copy.deepcopy(plain)
        fused_lora.inject_lora(lora_model, ["lin"], r=3, lora_alpha=6)
        fused_lora.load_adapter(lora_model, tmp_path / "peft")


def test_dora_is_refused_where_it_is_not_built():
    with pytest.raises(TypeError, match="use_dora=True: DoRA is built for nn.Linear targets, not Embedding"):
        fused_lora.inject_lora(torch.nn.Sequential(torch.nn.Embedding(10, 4)), ["0"], use_dora=True)
    mixed = torch.nn.Sequential(fused_lora.LoRALinear(4, 4, r=2, use_dora=True), fused_lora.LoRALinear(4, 4, r=2))
    with pytest.raises(ValueError, match="mixes DoRA layers"):
        fused_lora.save_adapter(mixed, "/nonexistent")
    with pytest.raises(TypeError, match="use_dora must be"):
        fused_lora.LoRALinear(4, 4, r=2, use_dora="yes")


def test_dora_compiles_fullgraph_without_a_graph_break():
    """torch.compile(fullgraph=True) of a DoRA LoRALinear and of a patched PEFT DoRA model: no graph break
    (the ‖W‖² cache is bypassed while compiling), the same output and magnitude gradient as eager."""
    layer = _dora_layer()
    layer.merge_weights = False
    x = torch.randn(5, 20)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    y0 = layer(x)
    y0.sum().backward()
    g0 = layer.lora_magnitude.grad.clone()
    layer.lora_magnitude.grad = None
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude.grad, g0, rtol=1e-6, atol=1e-6)
    pm = peft_dora(20, 12, 3, torch.float32, torch.float32)
    fused_lora.patch_peft_model(pm)
    want = pm(x)
    torch.testing.assert_close(torch.compile(pm, backend="aot_eager", fullgraph=True)(x), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- PEFT's DoRA embeddings and convolutions


def _peft_dora_module(module, shape_or_vocab, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(torch.nn.Sequential(module), LoraConfig(r=3, lora_alpha=5, target_modules=["0"],
                                                                  use_dora=True, init_lora_weights=False))  # fmt: skip
    layer = model.base_model.model[0]
    with torch.no_grad():
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.3 * torch.rand_like(m))
    return model


def _grads(model, x, dy):
    if x.is_floating_point():
        x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    out = [y.detach()] + ([x.grad] if x.is_floating_point() else [])
    return out + [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (lambda: torch.nn.Embedding(50, 12, padding_idx=3), (4, 7)),
        (lambda: torch.nn.Conv1d(3, 5, 3, padding=1), (2, 3, 9)),
        (lambda: torch.nn.Conv2d(3, 5, 3, stride=2), (2, 3, 9, 8)),
        (lambda: torch.nn.Conv3d(2, 4, 2, bias=False), (1, 2, 5, 5, 4)),
    ],
    ids=["Embedding", "Conv1d", "Conv2d", "Conv3d"],
)
def test_patched_dora_embeddings_and_convolutions_match_peft(module, shape):
    """PEFT's DoRA lora.Embedding (norm per embedding column, over the vocabulary) and lora.Conv1d/2d/3d
    (per output channel, over C·k): patched, forward and every gradient against PEFT's layer in float64
    with its fp32 error as the yardstick."""
    ours = _peft_dora_module(module(), shape)
    same, truth = copy.deepcopy(ours), copy.deepcopy(ours).double()
    assert len(fused_lora.patch_peft_model(ours).patched) == 1
    x = torch.randint(0, 50, shape) if shape == (4, 7) else torch.randn(*shape)
    dy = torch.randn_like(same(x))
    got, yard = _grads(ours, x, dy), _grads(same, x, dy)
    ref = _grads(truth, x if not x.is_floating_point() else x.double(), dy.double())
    assert len(got) == len(ref)
    for i, (g, r64, t) in enumerate(zip(got, ref, yard)):
        assert_close_to_ref(f"output/gradient {i}", g, r64, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_column_scale_kernels_against_float64(dtype, bias):
    """fused_lora/kernels/column_scale.py: y = z ⊙ c + b and its backward (dz, dc, db) on odd shapes with leading
    dims, fp32 arithmetic (c fp32), against float64 autograd, within the rule; the kernels ran."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, 37, 53, generator=g).to(dtype)
    c = torch.rand(53, generator=g) + 0.5
    b = torch.randn(53, generator=g) if bias else None
    dy = torch.randn(3, 37, 53, generator=g).to(dtype)

    def run(zz, cc, bb, ddy):
        zz, cc = zz.clone().requires_grad_(), cc.clone().requires_grad_()
        bb = bb.clone().requires_grad_() if bb is not None else None
        y = dora.scale_columns(zz, cc, bb)
        y.backward(ddy)
        return [y.detach(), zz.grad, cc.grad] + ([bb.grad] if bb is not None else [])

    before = LAUNCHES.copy()
    got = run(z, c, b, dy)
    assert LAUNCHES["_scale_fwd_kernel"] == before["_scale_fwd_kernel"] + 1
    assert LAUNCHES["_scale_bwd_kernel"] == before["_scale_bwd_kernel"] + 1
    ref = run(z.double(), c.double(), b.double() if bias else None, dy.double())
    with fused_lora.use_backend("reference"):
        same = run(z, c, b, dy)
    for name, gg, rr, tt in zip(("y", "dz", "dc", "db"), got, ref, same):
        assert_close_to_ref(name, gg, rr, tt)


def test_dora_benchmark_providers():
    """fused-dora, peft-dora and peft-dora-compile (opt-in) run forward + backward on the smoke cases and
    match the fp64 LoRA reference at p = 0 (the initial magnitude makes DoRA's y the LoRA layer's); at full
    size (meta) ours keeps LoRA's tensors plus y, the output itself (one [M, N] 16-bit tensor, shared with
    a consumer that saves it); the model puts our DoRA step within 1.10x our LoRA's and PEFT's DoRA, eager
    and compiled, above it."""
    from fused_lora.bench import model, offline
    from fused_lora.bench.providers import Case

    rows = offline.smoke(["fused-dora", "peft-dora", "peft-dora-compile"])
    assert rows and all(r["result"] == "ok" for r in rows), rows
    case = Case("attn-7b", 8192, 4096, 4096, 16, torch.bfloat16, torch.float32, 0.1, "meta")
    saved = {r["provider"]: r for r in offline.memory_rows([case], ["fused", "fused-dora"], {}, progress=False)}
    extra = saved["fused-dora"]["saved_mb"] - saved["fused"]["saved_mb"]
    assert abs(extra - 8192 * 4096 * 2 / 1e6) < 0.1, saved
    ms = {p: model.roofline_ms(model.passes(p, "fwdbwd", 8192, 4096, 4096, 16, 2, 4, True), model.GPUS["h100"])
          for p in ("fused", "fused-dora", "peft-dora", "peft-dora-compile")}  # fmt: skip
    assert ms["fused"] < ms["fused-dora"] < ms["fused"] * 1.10 and ms["fused-dora"] < ms["peft-dora"] / 2, ms
    assert ms["fused-dora"] < ms["peft-dora-compile"] < ms["peft-dora"], ms
