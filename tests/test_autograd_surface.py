"""What autograd, torch.func and FSDP-style hooks see of the fused layers.

- Every layer's output is a tensor of its own, not a view of the custom operator's output: an in-place
  op on a view rebases the graph past the view's node and drops a hook registered on the output (FSDP2's
  pre-backward unshard hangs there; tests/test_distributed.py runs FSDP2 itself).
- Forward mode (torch.func.jvp / jacfwd, torch.autograd.forward_ad) gives the reference's tangents,
  never a silent zero, with the kernels' own dropout mask.
- torch.func.grad / jacrev / hessian / vmap(grad) (per-sample gradients) give the reference's answers.
- ``use_impl`` applies to the backward of a forward run inside the block, whichever thread runs the
  backward (on CUDA autograd runs it on a worker thread; here a thread of our own shows the same).
The transform tests check that the kernels ran (launch counters), so a reference fallback cannot pass
for them; the operators pass torch.library.opcheck.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.func as tf
import torch.nn as nn

import fused_lora
from fused_lora import ops
from fused_lora.kernels import LAUNCHES

K, N, R, S = 8, 5, 3, 1.5
TOL = dict(rtol=1e-4, atol=1e-5)


def inputs(lead=(2, 3), bias=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, K, generator=g)
    w, a, b = torch.randn(N, K, generator=g) / 3, torch.randn(R, K, generator=g) / 3, torch.randn(N, R, generator=g)
    return x, w, (torch.randn(N, generator=g) if bias else None), a, b


def linear(x, w, bias, a, b, p=0.0):
    return fused_lora.lora_linear(x, w, a, b, S, bias, dropout_p=p)


def reference(fn):
    """fn run on the reference backend."""

    def run(*args):
        with fused_lora.use_backend("reference"):
            return fn(*args)

    return run


def kernel_mask(seed: int, x: torch.Tensor, p: float) -> torch.Tensor:
    """The mask the kernels draw for x after torch.manual_seed(seed) (function._draw_seed's draw)."""
    torch.manual_seed(seed)
    s = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    return ops.dropout_mask(s, x.shape[:-1].numel(), x.shape[-1], p).view(x.shape)


def masked_reference(x, w, bias, a, b, mask, p):
    return fused_lora.reference.lora_linear(x, w, a, b, S, bias, p, dropout_mask=mask)


@pytest.fixture
def launched():
    """The kernels launched inside the test (a dict filled at teardown's check)."""
    before = LAUNCHES.copy()
    yield lambda: LAUNCHES - before


# ---------------------------------------------------------------- outputs are not views


def _layers():
    from fused_lora.integrations.peft_patch import patch_peft_model

    torch.manual_seed(0)
    yield "LoRALinear 3-D", fused_lora.LoRALinear(K, N, r=R, lora_alpha=2), torch.randn(2, 3, K)
    yield "LoRALinear 2-D", fused_lora.LoRALinear(K, N, r=R, lora_alpha=2, lora_dropout=0.2), torch.randn(4, K)
    yield "LoRALinear fan_in_fan_out", fused_lora.LoRALinear(K, N, r=R, fan_in_fan_out=True), torch.randn(3, 1, K)
    yield "MergedLinear", fused_lora.MergedLinear(K, 6, r=2, enable_lora=[True, False, True]), torch.randn(2, 3, K)
    yield "Embedding", fused_lora.Embedding(11, 6, r=R, lora_alpha=2, padding_idx=0), torch.randint(0, 11, (2, 5))
    yield "Conv1d", fused_lora.Conv1d(3, 4, 3, r=2), torch.randn(2, 3, 7)
    yield "Conv2d", fused_lora.Conv2d(3, 4, 3, r=2, lora_dropout=0.2), torch.randn(2, 3, 5, 5)
    yield "Conv3d", fused_lora.Conv3d(2, 3, 2, r=2), torch.randn(1, 2, 3, 3, 3)
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(11, K), nn.Linear(K, N)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=R, target_modules=["emb", "fc"]))
    report = patch_peft_model(model)
    assert sorted(report.patched) == ["base_model.model.emb", "base_model.model.fc"], report
    emb, fc = model.base_model.model.emb, model.base_model.model.fc
    yield "PEFT Embedding (patched)", emb, torch.randint(0, 11, (2, 5))
    yield "PEFT Linear (patched)", fc, torch.randn(2, 5, K)


def _randomize(layer):
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.5)


@pytest.mark.parametrize("case", [name for name, _, _ in _layers()])
def test_layer_output_is_not_a_view_and_keeps_hooks_through_in_place_ops(case):
    """The output has no base, and a hook registered on it (as FSDP2 registers its pre-backward unshard)
    still fires when an in-place op follows; gradients equal an out-of-place run's. Failed before: the
    kernel path returned ``y2.view(...)``, and ``h.mul_(2)`` dropped the hook."""
    name, layer, x = next(c for c in _layers() if c[0] == case)
    layer.train()
    _randomize(layer)

    def grads(in_place: bool):
        layer.zero_grad(set_to_none=True)
        fired = []
        h = layer(x)
        view = h._base is not None or h._is_view()
        h.register_hook(lambda g: fired.append(1))
        if in_place:
            h.mul_(2)
            h += 1.0
            torch.relu_(h)
        else:
            h = torch.relu(h * 2 + 1.0)
        h.square().sum().backward()
        assert fired, f"{name}: the hook on the output never fired"
        assert not view, f"{name}: the output is a view"
        return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    torch.manual_seed(3)
    in_place = grads(True)
    torch.manual_seed(3)
    out_of_place = grads(False)
    assert out_of_place.keys() == in_place.keys() and any("lora_" in n for n in in_place)
    for n in in_place:
        torch.testing.assert_close(in_place[n], out_of_place[n], msg=n)


def test_functional_outputs_are_not_views():
    x, w, bias, a, b = inputs()
    r0 = (a[:0], b[:, :0])  # r = 0: the plain linear path
    for y in (linear(x, w, bias, a, b), linear(x[0].t().t(), w, None, a, b, p=0.3), linear(x, w, bias, *r0)):
        assert y._base is None and not y._is_view()
    x.requires_grad_()
    fused_lora.function.linear(x, w, bias).mul_(2).sum().backward()
    torch.testing.assert_close(x.grad, 2 * w.sum(0).expand_as(x))
    table, ea, eb = torch.randn(9, 4), torch.randn(2, 9), torch.randn(4, 2)
    y = fused_lora.lora_embedding(torch.randint(0, 9, (3, 2)), table, ea, eb, 2.0)
    assert y._base is None and not y._is_view()


def test_embedding_reads_strided_indices():
    """A strided 1-D index tensor reached the kernel as if contiguous (wrong rows, silently); fixed by
    the operator making its flat indices contiguous."""
    table, ea, eb = torch.randn(30, 4), torch.randn(2, 30), torch.randn(4, 2)
    idx = torch.arange(30)[::3]
    got = fused_lora.lora_embedding(idx, table, ea, eb, 2.0)
    torch.testing.assert_close(got, reference(fused_lora.lora_embedding)(idx, table, ea, eb, 2.0))


# ---------------------------------------------------------------- forward mode


def _tangents(x, w, bias, a, b):
    g = torch.Generator().manual_seed(9)
    return tuple(torch.randn(t.shape, generator=g) for t in (x, w, bias, a, b))


def test_jvp_through_lora_linear_equals_reference(launched):
    """torch.func.jvp in every input at once: the reference's tangent. Failed before: a zero tangent."""
    primals = inputs()
    tangents = _tangents(*primals)
    y, t = tf.jvp(linear, primals, tangents)
    assert launched()["_shrink_kernel"] == 1
    y_ref, t_ref = tf.jvp(reference(linear), primals, tangents)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(t, t_ref, **TOL)
    assert t.abs().max() > 0.1
    for i in range(5):  # each input's tangent alone (the rule's branches)
        only = tuple(tt if j == i else torch.zeros_like(tt) for j, tt in enumerate(tangents))
        torch.testing.assert_close(tf.jvp(linear, primals, only)[1], tf.jvp(reference(linear), primals, only)[1], **TOL)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_forward_ad_dual_tensors_with_dropout(p, launched):
    """torch.autograd.forward_ad: duals for x and both adapters; with dropout the tangent uses the kernels'
    own mask (the reference fed that mask agrees). Failed before: the tangent was None."""
    import torch.autograd.forward_ad as fwAD

    x, w, bias, a, b = inputs()
    dx, _, _, da, db = _tangents(x, w, bias, a, b)
    with fwAD.dual_level():
        torch.manual_seed(4)
        y = linear(fwAD.make_dual(x, dx), w, bias, fwAD.make_dual(a, da), fwAD.make_dual(b, db), p)
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None and launched()["_shrink_kernel"] == 1
    mask = kernel_mask(4, x, p) if p else None
    f = lambda x, a, b: masked_reference(x, w, bias, a, b, mask, p)
    y_ref, t_ref = tf.jvp(f, (x, a, b), (dx, da, db))
    torch.testing.assert_close(primal, y_ref, **TOL)
    torch.testing.assert_close(tangent, t_ref, **TOL)


def test_jacfwd_equals_jacrev_and_reference(launched):
    x, w, bias, a, b = inputs(lead=(2, 2))
    f = lambda x, a, b: linear(x, w, bias, a, b)
    fwd = tf.jacfwd(f, argnums=(0, 1, 2))(x, a, b)
    rev = tf.jacrev(f, argnums=(0, 1, 2))(x, a, b)
    ref = tf.jacrev(reference(f), argnums=(0, 1, 2))(x, a, b)
    assert launched()["_shrink_kernel"] == 2
    for got_f, got_r, want in zip(fwd, rev, ref):
        torch.testing.assert_close(got_f, want, **TOL)
        torch.testing.assert_close(got_r, want, **TOL)


def test_embedding_forward_mode_equals_reference(launched):
    """jvp and forward_ad through lora_embedding (table, A and B tangents; padding_idx and
    scale_grad_by_freq change only the reverse mode, as in F.embedding). Failed before: zero / None."""
    import torch.autograd.forward_ad as fwAD

    g = torch.Generator().manual_seed(2)
    idx = torch.tensor([[1, 0, 4], [4, 7, 1]])
    table, ea, eb = torch.randn(9, 4, generator=g), torch.randn(2, 9, generator=g), torch.randn(4, 2, generator=g)
    tangents = tuple(torch.randn(t.shape, generator=g) for t in (table, ea, eb))
    f = lambda t, a, b: fused_lora.lora_embedding(idx, t, a, b, 2.0, padding_idx=0, scale_grad_by_freq=True)
    y, t = tf.jvp(f, (table, ea, eb), tangents)
    assert launched()["_lora_embedding_fwd_kernel"] == 1
    y_ref, t_ref = tf.jvp(reference(f), (table, ea, eb), tangents)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(t, t_ref, **TOL)
    with fwAD.dual_level():
        dual = f(table, fwAD.make_dual(ea, tangents[1]), eb)
        t_a = fwAD.unpack_dual(dual).tangent
    only_a = (torch.zeros_like(table), tangents[1], torch.zeros_like(eb))
    torch.testing.assert_close(t_a, tf.jvp(reference(f), (table, ea, eb), only_a)[1], **TOL)
    for jac in (tf.jacfwd, tf.jacrev):  # the two differ where padding_idx / scale_grad_by_freq act, as in torch
        for got, want in zip(jac(f, argnums=(1, 2))(table, ea, eb), jac(reference(f), argnums=(1, 2))(table, ea, eb)):
            torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------- torch.func reverse mode


def _module_loss(layer, x):
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}

    def loss(params, x):
        return tf.functional_call(layer, params, (x,)).square().sum()

    return loss, params


def test_func_grad_jacrev_hessian_on_a_layer(launched):
    """torch.func.grad, jacrev and hessian of a LoRALinear's loss in its adapters: the reference
    backend's answers. Failed before: RuntimeError 'must override the setup_context staticmethod'."""
    layer = fused_lora.LoRALinear(K, N, r=R, lora_alpha=2)
    _randomize(layer)
    x = inputs()[0]
    loss, params = _module_loss(layer, x)
    got = tf.grad(loss)(params, x)
    jac = tf.jacrev(lambda a: tf.functional_call(layer, {**params, "lora_A": a}, (x,)))(params["lora_A"])
    hess = tf.hessian(lambda b: loss({**params, "lora_B": b}, x))(params["lora_B"])
    assert launched()["_shrink_kernel"] >= 3
    want = reference(tf.grad(loss))(params, x)
    want_jac = reference(tf.jacrev(lambda a: tf.functional_call(layer, {**params, "lora_A": a}, (x,))))(
        params["lora_A"]
    )
    want_hess = reference(tf.hessian(lambda b: loss({**params, "lora_B": b}, x)))(params["lora_B"])
    assert got.keys() == want.keys() == {"bias", "lora_A", "lora_B"}
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL)
    torch.testing.assert_close(jac, want_jac, **TOL)
    torch.testing.assert_close(hess, want_hess, **TOL)
    assert hess.abs().max() > 0.1


def test_func_grad_with_dropout_uses_the_kernels_mask(launched):
    x, w, bias, a, b = inputs()
    f = lambda x, a, b: linear(x, w, bias, a, b, p=0.3).square().sum()
    torch.manual_seed(6)
    got = tf.grad(f, argnums=(0, 1, 2))(x, a, b)
    assert launched()["_shrink_kernel"] == 1
    mask = kernel_mask(6, x, 0.3)
    want = tf.grad(lambda x, a, b: masked_reference(x, w, bias, a, b, mask, 0.3).square().sum(), argnums=(0, 1, 2))(
        x, a, b
    )
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL)


def test_per_sample_gradients_vmap_of_grad(launched):
    """vmap(grad(...)) over a batch of inputs (per-sample gradients, as DP-SGD takes them): a batch of x
    is folded into rows, one kernel launch for the whole batch."""
    layer = fused_lora.LoRALinear(K, N, r=R, lora_alpha=2)
    _randomize(layer)
    xs = torch.randn(4, 3, K)
    loss, params = _module_loss(layer, xs[0])
    got = tf.vmap(tf.grad(loss), in_dims=(None, 0))(params, xs)
    assert launched()["_shrink_kernel"] == 1
    for i in range(xs.shape[0]):
        want = reference(tf.grad(loss))(params, xs[i])
        for n in want:
            torch.testing.assert_close(got[n][i], want[n], **TOL, msg=f"sample {i} {n}")


def test_vmap_over_adapters_and_embedding(launched):
    """vmap over a stack of adapters (one call per element) and over a batch of indices (one call)."""
    x, w, bias, a, b = inputs()
    bs = torch.stack([b, 2 * b, -b])
    got = tf.vmap(lambda b: linear(x, w, bias, a, b))(bs)
    for i in range(3):
        torch.testing.assert_close(got[i], reference(linear)(x, w, bias, a, bs[i]), **TOL)
    table, ea, eb = torch.randn(9, 4), torch.randn(2, 9), torch.randn(4, 2)
    ids = torch.randint(0, 9, (5, 2, 3))
    before = launched()["_lora_embedding_fwd_kernel"]
    y = tf.vmap(lambda i: fused_lora.lora_embedding(i, table, ea, eb, 2.0))(ids)
    assert launched()["_lora_embedding_fwd_kernel"] - before == 1
    torch.testing.assert_close(y, reference(fused_lora.lora_embedding)(ids, table, ea, eb, 2.0), **TOL)


def test_func_grad_and_hessian_on_embedding(launched):
    emb = fused_lora.Embedding(9, 4, r=2, lora_alpha=3, padding_idx=1)
    _randomize(emb)
    idx = torch.tensor([[1, 2, 2], [8, 1, 0]])
    loss, params = _module_loss(emb, idx)
    got = tf.grad(loss)(params, idx)
    hess = tf.hessian(lambda b: loss({**params, "lora_B": b}, idx))(params["lora_B"])
    assert launched()["_lora_embedding_fwd_kernel"] >= 2
    want = reference(tf.grad(loss))(params, idx)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TOL)
    torch.testing.assert_close(
        hess, reference(tf.hessian(lambda b: loss({**params, "lora_B": b}, idx)))(params["lora_B"])
    )
    assert got["lora_A"][:, 1].abs().max() == 0, "padding_idx's column of A gets no gradient"


def _compositions():
    x, w, _, a, b = inputs()
    v = torch.randn(a.shape, generator=torch.Generator().manual_seed(8))
    cube = lambda a, b: linear(x, w, None, a, b).pow(3).sum()
    yield "grad(grad)", lambda: tf.grad(lambda b: tf.grad(cube, argnums=1)(a, b).sum())(b)
    yield "grad(jvp)", lambda: tf.grad(lambda a: tf.jvp(lambda a2: cube(a2, b), (a,), (v,))[1])(a)
    yield "jvp(jvp)", lambda: tf.jvp(lambda a: tf.jvp(lambda a2: cube(a2, b), (a,), (v,))[1], (a,), (v,))[1]
    yield "jvp(vmap)", lambda: tf.jvp(tf.vmap(lambda x: linear(x, w, None, a, b)), (x,), (x.flip(0),))[1]
    y_of_x = lambda x: linear(x, w, None, a, b)
    yield "autograd.functional.jacobian", lambda: torch.autograd.functional.jacobian(y_of_x, x, vectorize=True)
    cot = torch.eye(x.shape[:-1].numel() * N).view(-1, *x.shape[:-1], N)

    def batched_grads():  # torch.autograd.grad(is_grads_batched=True): the backward operator under vmap
        xr = x.clone().requires_grad_()
        return torch.autograd.grad(y_of_x(xr), xr, cot, is_grads_batched=True)[0]

    yield "is_grads_batched", batched_grads


@pytest.mark.parametrize("case", [name for name, _ in _compositions()])
def test_transform_compositions_equal_reference(case, launched):
    fn = dict(_compositions())[case]
    got = fn()
    assert launched()["_shrink_kernel"] >= 1
    want = reference(fn)()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_per_sample_gradients_with_dropout(randomness, launched):
    """vmap(grad) with dropout: each sample's gradient is the reference's with that sample's kernel mask
    ('same': one seed for all, 'different': a seed per sample, drawn as vmap draws them)."""
    layer = fused_lora.LoRALinear(K, N, r=R, lora_alpha=2, lora_dropout=0.3)
    _randomize(layer)
    xs = torch.randn(3, 4, K)
    loss, params = _module_loss(layer, xs[0])
    torch.manual_seed(11)
    got = tf.vmap(tf.grad(loss), in_dims=(None, 0), randomness=randomness)(params, xs)
    assert launched()["_shrink_kernel"] == 3  # dropout: one launch per sample
    torch.manual_seed(11)
    seeds = torch.randint(0, 2**62, (3 if randomness == "different" else 1, 1), dtype=torch.int64)
    for i in range(3):
        seed = seeds[i if randomness == "different" else 0]
        mask = ops.dropout_mask(seed, 4, K, 0.3)
        ref = lambda p, x, mask=mask: (
            fused_lora.reference.lora_linear(
                x, layer.weight, p["lora_A"], p["lora_B"], layer.scaling, p["bias"], 0.3, dropout_mask=mask
            )
            .square()
            .sum()
        )
        want = tf.grad(ref)(params, xs[i])
        for n in want:
            torch.testing.assert_close(got[n][i], want[n], **TOL, msg=f"sample {i} {n}")


def test_merged_linear_jvp_and_grad_equal_reference(launched):
    m = fused_lora.MergedLinear(K, 6, r=2, lora_alpha=3, enable_lora=[True, False, True])
    _randomize(m)
    x = inputs()[0]
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    f = lambda p: tf.functional_call(m, p, (x,))
    got = tf.jvp(f, (params,), (tangents,))[1], tf.grad(lambda p: f(p).square().sum())(params)
    assert launched()["_shrink_kernel"] == 2
    want = reference(lambda: (tf.jvp(f, (params,), (tangents,))[1], tf.grad(lambda p: f(p).square().sum())(params)))()
    torch.testing.assert_close(got[0], want[0], **TOL)
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], **TOL, msg=n)


# ---------------------------------------------------------------- the implementation setting and threads


def _dx_kernels(run_backward) -> dict:
    x, w, bias, a, b = inputs()
    x.requires_grad_()
    fused_lora.set_impl("fused")
    try:
        with fused_lora.use_impl("hybrid"):
            y = linear(x, w, bias, a, b)
        before = LAUNCHES.copy()
        run_backward(y.square().sum())
        return LAUNCHES - before
    finally:
        fused_lora.set_impl(None)


def test_use_impl_governs_the_backward_of_its_forward_on_another_thread():
    """The forward ran inside use_impl('hybrid') with the process set to 'fused'; a backward run on
    another thread (as CUDA's autograd worker threads run it) must still be hybrid's: dX by the
    low-rank kernel + addmm, not the fused GEMM. Failed before: that thread read the process setting."""

    def on_thread(loss):
        errors = []
        t = threading.Thread(target=lambda: _catch(errors, loss.backward))
        t.start(), t.join()
        assert not errors, errors

    here, there = _dx_kernels(lambda loss: loss.backward()), _dx_kernels(on_thread)
    assert here == there, (here, there)
    assert there["_low_rank_kernel"] == 1 and "_lora_gemm_kernel" not in there, there


def _catch(errors, fn):
    try:
        fn()
    except Exception as e:  # reported by the test's thread
        errors.append(e)


@pytest.mark.gpu
def test_use_impl_governs_a_cuda_backward():
    """On CUDA autograd runs the backward on its device thread: the forward's use_impl must hold there."""
    with fused_lora.use_backend("triton"):
        x, w, bias, a, b = (t.cuda() if t is not None else None for t in inputs(lead=(64,)))
        x.requires_grad_()
        fused_lora.set_impl("fused")
        try:
            with fused_lora.use_impl("hybrid"):
                y = linear(x, w, bias, a, b)
            before = LAUNCHES.copy()
            y.square().sum().backward()
            ran = LAUNCHES - before
        finally:
            fused_lora.set_impl(None)
    assert ran["_low_rank_kernel"] == 1 and "_lora_gemm_kernel" not in ran, ran


# ---------------------------------------------------------------- the operators, as torch.library checks them


def _op_cases():
    x, w, bias, a, b = inputs()
    x, a, b = x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    yield "lora_linear_fwd", ops.lora_linear_fwd, (x, w, None, a, b, None, S, 0.0, False, 0, None, "fused")
    yield "lora_linear_fwd dropout", ops.lora_linear_fwd, (x, w, bias, a, b, seed, S, 0.2, True, 0, None, "hybrid")
    xa = ops.lora_linear_fwd(x.detach(), w, bias, a.detach(), b.detach(), seed, S, 0.2, False, 0, None, "fused")[1]
    dy = torch.randn(*x.shape[:-1], N)
    bwd = (dy, x.detach(), w, a.detach(), b.detach(), xa, seed, S, 0.2, False, True, True, True, "fused")
    yield "lora_linear_bwd", ops.lora_linear_bwd, bwd
    yield "dropout_mask", ops.dropout_mask, (seed, 4, K, 0.3)
    from fused_lora import embedding_ops

    idx, table = torch.randint(0, 9, (2, 3)), torch.randn(9, 4)
    ea, eb = torch.randn(2, 9, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    yield "lora_embedding_fwd", embedding_ops.lora_embedding_fwd, (idx, table, ea, eb, 2.0, 0, True, False)
    dy = torch.randn(2, 3, 4)
    ebwd = (dy, idx, ea.detach(), eb.detach(), 2.0, 0, None, True, True, False)
    yield "lora_embedding_bwd", embedding_ops.lora_embedding_bwd, ebwd


OPS = ["lora_linear_fwd", "lora_linear_fwd dropout", "lora_linear_bwd", "dropout_mask", "lora_embedding_fwd",
       "lora_embedding_bwd"]  # fmt: skip


@pytest.mark.parametrize("case", OPS)
def test_operators_pass_torch_library_opcheck(case):
    """Schema, fake implementation (shapes and strides), autograd registration and AOT dispatch, as
    torch.library.opcheck tests a custom operator."""
    _, op, args = next(c for c in _op_cases() if c[0] == case)
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("case", ["LoRALinear r=0", "LoRALinear merged", "MergedLinear merged"])
def test_plain_and_merged_paths_do_not_return_views(case):
    """The r = 0 and merged forwards ran F.linear, whose output for a 3-D input with a bias is a view (an
    in-place op then drops FSDP2's pre-backward hook); now fused_lora.function.linear. Failed before."""
    x = torch.randn(2, 3, K, requires_grad=True)
    if case == "LoRALinear r=0":
        layer = fused_lora.LoRALinear(K, N, r=0)
    elif case == "LoRALinear merged":
        layer = fused_lora.LoRALinear(K, N, r=R, lora_alpha=2)
        layer.merge()
    else:
        layer = fused_lora.MergedLinear(K, 6, r=2, enable_lora=[True, False, True])
        layer.merge()
    h = layer(x)
    assert h._base is None and not h._is_view(), case
    fired = []
    h.register_hook(lambda g: fired.append(1))
    h.mul_(2)
    h.sum().backward()
    assert fired and x.grad is not None, case
