"""lora_embedding (the Triton kernels) against the float64 reference: forward, dA, dB (and dW when the
table is trainable), odd sizes, ranks past one rank slice, padding_idx, repeated indices,
scale_grad_by_freq, int32 indices, deterministic mode; launch counts prove the kernels ran; bad input
gets a clear error. Under the interpreter in CI, compiled on a GPU."""

from __future__ import annotations

import pytest
import torch

import fused_lora
from fused_lora import IndexOutOfRangeError, reference_layers
from fused_lora.kernels import LAUNCHES
from fused_lora.kernels.embedding import lora_embedding_forward

from helpers import assert_close_to_ref

V, D = 37, 53
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32)]
DTYPE_IDS = ["fp32", "fp16", "fp16+fp32A"]


def tables(r, dtype=torch.float32, lora_dtype=None, device="cpu", v=V, d=D):
    """W [v, d], A [r, v], B [d, r], all non-zero (so every term is tested)."""
    lora_dtype = lora_dtype or dtype
    w = torch.randn(v, d).to(device=device, dtype=dtype)
    a = (torch.randn(r, v) * 0.5).to(device=device, dtype=lora_dtype)
    b = (torch.randn(d, r) * 0.5).to(device=device, dtype=lora_dtype)
    return w, a, b


def indices(shape=(3, 17), device="cpu", dtype=torch.int64, v=V):
    """Random indices with heavy repetition: index 2 fills a third of the tokens, 0 and v-1 appear."""
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, v, shape, generator=g)
    flat = idx.view(-1)
    flat[::3] = 2
    flat[1], flat[-1] = 0, v - 1
    return idx.to(device=device, dtype=dtype)


def run(fn, idx, w, a, b, s, dy, **opts):
    """y and the gradients of A, B (and W if it requires grad) through `fn`."""
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(w.requires_grad)
    y = fn(idx, w, a, b, s, **opts)
    y.backward(dy)
    return y.detach(), a.grad, b.grad, w.grad


def check(idx, w, a, b, s=1.7, **opts):
    """Kernels vs the float64 reference, by the tolerance rule (torch in the same dtype as the yardstick)."""
    dy = torch.randn(*idx.shape, w.shape[1]).to(device=w.device, dtype=w.dtype)
    got = run(fused_lora.lora_embedding, idx, w, a, b, s, dy, **opts)
    cpu = [t.detach().cpu().requires_grad_(t.requires_grad) for t in (w, a, b)]
    ref64 = run(reference_layers.lora_embedding, idx.cpu(), *(t.double() for t in cpu), s, dy.double().cpu(), **opts)
    same = run(reference_layers.lora_embedding, idx.cpu(), *cpu, s, dy.cpu(), **opts)
    names = ("y", "dA", "dB", "dW")
    for name, g, r64, t, dt in zip(names, got, ref64, same, (w.dtype, a.dtype, b.dtype, w.dtype)):
        if r64 is None:
            assert g is None, f"{name} computed but not needed"
            continue
        assert g.dtype == dt, f"{name} came back in {g.dtype}, expected {dt}"
        assert_close_to_ref(name, g, r64, t)
    return got


@pytest.mark.parametrize("r", [1, 7, 16, 37])
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_parity_odd_shape(r, dtypes, device):
    """V = 37, D = 53 (no multiple of a block), 51 tokens; r = 37 takes three rank slices in the forward
    and three rank blocks in the backward under the interpreter (16 columns each)."""
    w, a, b = tables(r, *dtypes, device=device)
    check(indices(device=device), w, a, b)


@pytest.mark.parametrize("padding_idx", [2, -1])
def test_padding_idx_gets_no_gradient(padding_idx, device):
    """padding_idx's column of A gets no gradient, even when it is the most repeated index; its tokens
    still contribute to dB (A[:, pad] is used in the forward, as in loralib)."""
    w, a, b = tables(5, device=device)
    idx = indices(device=device)
    got = check(idx, w, a, b, padding_idx=padding_idx)
    pad = padding_idx % V
    assert torch.count_nonzero(got[1][:, pad]) == 0
    assert torch.count_nonzero(got[1]) > 0


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_scale_grad_by_freq(padding_idx, device):
    w, a, b = tables(6, device=device)
    check(indices(device=device), w, a, b, padding_idx=padding_idx, scale_grad_by_freq=True)


def test_one_index_everywhere(device):
    """Every token the same index: dA's one column sums all of them (atomics on one address)."""
    w, a, b = tables(4, device=device)
    got = check(torch.full((2, 29), 11, device=device), w, a, b)
    assert torch.count_nonzero(got[1][:, :11]) == 0 and torch.count_nonzero(got[1][:, 12:]) == 0


def test_int32_indices_and_trainable_table(device):
    """int32 indices; a table the caller made trainable gets nn.Embedding's gradient."""
    w, a, b = tables(3, device=device)
    w.requires_grad_()
    got = check(indices(device=device, dtype=torch.int32), w, a, b, padding_idx=4, scale_grad_by_freq=True)
    assert got[3] is not None


def test_scalar_and_empty_inputs(device):
    w, a, b = tables(3, device=device)
    y = fused_lora.lora_embedding(torch.tensor(4, device=device), w, a, b, 2.0)
    assert y.shape == (D,)
    torch.testing.assert_close(y, reference_layers.lora_embedding(torch.tensor(4), w.cpu(), a.cpu(), b.cpu(), 2.0))
    a.requires_grad_()
    y = fused_lora.lora_embedding(torch.empty(2, 0, dtype=torch.long, device=device), w, a, b, 2.0)
    assert y.shape == (2, 0, D)
    y.sum().backward()
    assert torch.count_nonzero(a.grad) == 0


def test_launch_counts_prove_kernels_ran(device):
    """One launch forward (lookup + low-rank), one backward (dA and dB); none on the reference backend."""
    w, a, b = tables(4, device=device)
    a.requires_grad_()
    b.requires_grad_()
    idx = indices(device=device)
    before = LAUNCHES.copy()
    y = fused_lora.lora_embedding(idx, w, a, b, 2.0)
    assert LAUNCHES - before == {"_lora_embedding_fwd_kernel": 1}
    y.sum().backward()
    assert LAUNCHES - before == {"_lora_embedding_fwd_kernel": 1, "_lora_embedding_bwd_kernel": 1}
    before = LAUNCHES.copy()
    with fused_lora.use_backend("reference"):
        fused_lora.lora_embedding(idx, w, a, b, 2.0).sum().backward()
    assert LAUNCHES - before == {}


def test_deterministic_mode_matches_and_repeats(device):
    """torch.use_deterministic_algorithms: no atomics (per-band dB slices; dA summed per index in token
    order by the segment kernel); bit-identical from run to run, equal to the atomics path to rounding."""
    w, a, b = tables(21, device=device)
    idx = indices((4, 23), device=device)
    dy = torch.randn(4, 23, D, device=device)
    opts = dict(padding_idx=0, scale_grad_by_freq=True)  # index 2 repeats 31 times: several segment chunks
    atomics = run(fused_lora.lora_embedding, idx, w, a, b, 1.3, dy, **opts)
    before = LAUNCHES.copy()
    torch.use_deterministic_algorithms(True)
    try:
        det1 = run(fused_lora.lora_embedding, idx, w, a, b, 1.3, dy, **opts)
        det2 = run(fused_lora.lora_embedding, idx, w, a, b, 1.3, dy, **opts)
    finally:
        torch.use_deterministic_algorithms(False)
    assert (LAUNCHES - before)["_embedding_da_segments_kernel"] == 2
    assert torch.count_nonzero(det1[1][:, 2]) == det1[1].shape[0]
    for g1, g2, g0 in zip(det1[:3], det2[:3], atomics[:3]):
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)


def test_the_kernel_never_reads_outside_the_table(device):
    """Indices the host check would refuse (it is skipped under CUDA graph capture) give rows of zeros."""
    w, a, b = tables(3, device=device)
    idx = torch.tensor([1, -1, V, 5], device=device)
    y = lora_embedding_forward(idx, w, a, b, 1.0)
    ref = reference_layers.lora_embedding(torch.tensor([1, 5]), w.cpu(), a.cpu(), b.cpu(), 1.0)
    torch.testing.assert_close(y[[0, 3]].cpu(), ref)
    assert torch.count_nonzero(y[1:3]) == 0


@pytest.mark.parametrize("bad", [-1, V, V + 100])
def test_out_of_range_indices(bad, device):
    w, a, b = tables(3, device=device)
    idx = torch.tensor([[0, 1, 2], [3, bad, 4]], device=device)
    with pytest.raises(IndexOutOfRangeError, match=rf"index {bad} at position \(1, 1\), outside \[0, {V}\)"):
        fused_lora.lora_embedding(idx, w, a, b, 1.0)
    with pytest.raises(IndexError):  # what nn.Embedding raises, for code that catches that
        fused_lora.lora_embedding(idx, w, a, b, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16, torch.uint8, torch.bool])
def test_wrong_index_dtypes(dtype, device):
    w, a, b = tables(3, device=device)
    with pytest.raises(TypeError, match=r"int64 or int32 indices.*got torch\."):
        fused_lora.lora_embedding(torch.zeros(4, dtype=dtype, device=device), w, a, b, 1.0)
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor of indices, got list"):
        fused_lora.lora_embedding([1, 2], w, a, b, 1.0)


@pytest.mark.parametrize(
    ("mutate", "error", "pattern"),
    [
        (lambda w, a, b: (w, a[:, :-1], b), ValueError, r"lora_A \[3, 36\] must be \[r, num_embeddings\] = \[r, 37\]"),
        (lambda w, a, b: (w, a, b[:-1]), ValueError, r"lora_B \[52, 3\] must be \[embedding_dim, r\] = \[53, 3\]"),
        (lambda w, a, b: (w[0], a, b), ValueError, r"weight must be 2-D, got shape \[53\]"),
        (lambda w, a, b: (w, a.double(), b), TypeError, r"lora_A .* and lora_B .* must share a dtype"),
        (lambda w, a, b: (w, a.half(), b.half()), TypeError, r"with weight in torch.float32 they must be"),
        (lambda w, a, b: (w.long(), a, b), TypeError, r"weight must be a floating-point tensor"),
        (lambda w, a, b: (w, a.to("meta"), b), ValueError, r"lora_A \(meta\)"),
    ],
)
def test_bad_tables(mutate, error, pattern, device):
    w, a, b = tables(3, device=device)
    with pytest.raises(error, match=pattern):
        fused_lora.lora_embedding(torch.tensor([1, 2], device=device), *mutate(w, a, b), 1.0)


def test_bad_options(device):
    w, a, b = tables(3, device=device)
    idx = torch.tensor([1, 2], device=device)
    with pytest.raises(ValueError, match="padding_idx 37 must be within num_embeddings = 37"):
        fused_lora.lora_embedding(idx, w, a, b, 1.0, padding_idx=37)
    with pytest.raises(ValueError, match="sparse=True is not supported"):
        fused_lora.lora_embedding(idx, w, a, b, 1.0, sparse=True)
    with pytest.raises(TypeError, match="scaling"):
        fused_lora.lora_embedding(idx, w, a, b, float("nan"))
    with pytest.raises(TypeError, match="reference"):
        fused_lora.lora_embedding(idx, w.double(), a.double(), b.double(), 1.0)
    with fused_lora.use_backend("reference"):
        assert fused_lora.lora_embedding(idx.cpu(), *(t.double().cpu() for t in (w, a, b)), 1.0).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "bf16+fp32A"])
@pytest.mark.parametrize("r", [1, 16, 100])
def test_bf16_parity_on_gpu(lora_dtype, r):
    """bf16 tables (the interpreter's bf16 tl.dot is wrong, so this needs a GPU), odd and realistic sizes,
    through the autotuner; deterministic mode too."""
    for v, d, shape in ((V, D, (3, 17)), (50257, 1000, (4, 1001))):
        w, a, b = tables(r, torch.bfloat16, lora_dtype, device="cuda", v=v, d=d)
        idx = indices(shape, device="cuda", v=v)
        check(idx, w, a, b, padding_idx=2)
        torch.use_deterministic_algorithms(True)
        try:
            check(idx, w, a, b, scale_grad_by_freq=True)
        finally:
            torch.use_deterministic_algorithms(False)


def test_every_embedding_config_is_compiled_and_served():
    """compile_check compiles every shipped embedding configuration (its jobs name them all), and every
    table dtype and rank bucket has a configuration the filters admit, on both architectures."""
    from fused_lora.compile_check import SIZES
    from fused_lora.compile_jobs import all_jobs
    from fused_lora.kernels import configs

    jobs = [j for j in all_jobs(SIZES) if j.module == "embedding"]
    for kernel, table in (("_lora_embedding_fwd_kernel", configs.EMBEDDING_FWD),
                          ("_lora_embedding_bwd_kernel", configs.EMBEDDING_BWD)):  # fmt: skip
        names = {j.config for j in jobs if j.kernel == kernel}
        assert len(names) == len(table), (kernel, names)
    assert any(j.kernel == "_embedding_da_segments_kernel" for j in jobs)
    for arch in (80, 90):
        for elem in (2, 4):
            for r_pad in (16, 32, 64, 128, 256):
                assert any(configs.keep_embedding(c, elem, r_pad, arch) for c in configs.EMBEDDING_FWD), (
                    arch,
                    elem,
                    r_pad,
                )
            r_block = configs.EMBEDDING_R_BLOCK[elem]
            assert any(configs.keep_embedding(c, elem, r_block, arch) for c in configs.EMBEDDING_BWD), (arch, elem)


@pytest.mark.parametrize("which", [0, 1])
def test_each_configuration_computes_the_same(which, device):
    """Whichever configuration the tuner picks (forced here: on the CPU it always takes the first), the
    results pass the parity rule: tile shapes, the D split and the band height change nothing."""
    from fused_lora.kernels import configs, tuning

    fwd, bwd = configs.embedding_table("fwd")[which], configs.embedding_table("bwd")[which]
    w, a, b = tables(19, device=device)
    before = LAUNCHES.copy()
    with tuning.force("embedding_fwd", configs.name(fwd)), tuning.force("embedding_bwd", configs.name(bwd)):
        check(indices(device=device), w, a, b, padding_idx=2, scale_grad_by_freq=True)
    assert (LAUNCHES - before)["_lora_embedding_bwd_kernel"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 limitation")
def test_bf16_under_the_interpreter_never_returns_garbage():
    """The interpreter's bf16 tl.dot is wrong: lora_embedding runs the reference with a warning (as
    lora_linear does), and the kernels' launchers refuse bf16 outright."""
    w, a, b = tables(3, torch.bfloat16, torch.float32)
    idx = indices()
    before = LAUNCHES.copy()
    with pytest.warns(RuntimeWarning, match="bf16 under TRITON_INTERPRET"):
        y = fused_lora.lora_embedding(idx, w, a, b, 2.0)
    assert LAUNCHES - before == {}
    torch.testing.assert_close(y, reference_layers.lora_embedding(idx, w, a, b, 2.0))
    with pytest.raises(TypeError, match="bf16 tensors under TRITON_INTERPRET"):
        lora_embedding_forward(idx.view(-1), w, a, b, 2.0)
