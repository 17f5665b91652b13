"""torch.compile traces models of fused layers — plain LoRALinear models and patched PEFT models — with
fullgraph=True and no graph break; the kernels run inside the compiled graph (custom operators), and
outputs, gradients and dropout masks equal eager ones.

On the CPU the kernels run under Triton's interpreter inside the compiled graph. Dropout seeds are
drawn by torch's generator as an ordinary traced op: aot_eager draws exactly what eager draws; inductor
replaces random ops with its own generator unless ``torch._inductor.config.fallback_random`` is set,
which restores eager's masks (documented in the README).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora.kernels import LAUNCHES


class TwoLayers(nn.Module):
    def __init__(self, device) -> None:
        super().__init__()
        self.a = fused_lora.LoRALinear(24, 20, r=4, lora_alpha=8, lora_dropout=0.1, device=device)
        self.b = fused_lora.LoRALinear(20, 12, r=3, lora_alpha=6, device=device)
        for layer in (self.a, self.b):
            nn.init.normal_(layer.lora_B)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def run(model, x, seed=1):
    """y and every gradient after one forward+backward with a fixed torch seed (the dropout mask)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-5, msg=name)


def test_no_graph_break(device):
    model = TwoLayers(device)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, 24, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_aot_eager_equals_eager_with_dropout(device):
    torch._dynamo.reset()
    model = TwoLayers(device)
    x = torch.randn(2, 5, 24, device=device)
    eager = run(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    before = LAUNCHES.copy()
    got = run(compiled, x)
    ran = LAUNCHES - before
    assert ran["_shrink_kernel"] == 2 and ran["_lora_grad_kernel"] == 2, ran  # the kernels ran in the graph
    assert_same(got, eager)
    assert not torch.equal(run(compiled, x, seed=2)[0], got[0]), "a new seed must give a new mask"


def test_fullgraph_inductor_equals_eager_with_fallback_random(device):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = TwoLayers(device)
    x = torch.randn(3, 24, device=device)
    eager = run(model, x)
    before = LAUNCHES.copy()
    # The config's own patch() (a per-thread override in torch 2.13), not monkeypatch's set-and-restore
    with inductor_config.patch(fallback_random=True):
        got = run(torch.compile(model, backend="inductor", fullgraph=True), x)
    assert (LAUNCHES - before)["_lora_gemm_kernel"] >= 2
    assert_same(got, eager)
    assert inductor_config.fallback_random is False


def test_fallback_random_is_a_per_thread_setting():
    """What the README says of torch 2.13: inductor's config values are per thread (ContextVars), so
    fallback_random must be set in the thread that compiles; patch() restores it, leaving it readable."""
    import threading

    import torch._inductor.config as inductor_config

    seen = {}
    with inductor_config.patch(fallback_random=True):
        worker = threading.Thread(target=lambda: seen.setdefault("other thread", inductor_config.fallback_random))
        worker.start()
        worker.join()
        seen["this thread"] = inductor_config.fallback_random
    assert seen == {"this thread": True, "other thread": False}
    assert inductor_config.fallback_random is False


def test_patched_peft_model_compiles_fullgraph(device):
    pytest.importorskip("peft")
    import peft
    from test_integrations import batch, randomize_lora, tiny_llama

    torch._dynamo.reset()
    model = tiny_llama(device)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(pm)
    report = fused_lora.patch_peft_model(pm)
    assert len(report.patched) == 4
    inputs = batch(device)
    explanation = torch._dynamo.explain(pm)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = pm(**inputs).loss
    before = LAUNCHES.copy()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)
    loss = compiled(**inputs).loss
    assert (LAUNCHES - before)["_shrink_kernel"] == 4
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)


def test_model_with_every_fused_layer_compiles_fullgraph(device):
    """Embedding (its kernels as custom operators too), MergedLinear, LoRALinear and a Conv1d in one model:
    no graph break, the same loss and gradients as eager."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = fused_lora.Embedding(50, 24, r=4, lora_alpha=8, padding_idx=0, device=device)
            self.qkv = fused_lora.MergedLinear(
                24, 36, r=3, lora_alpha=6, enable_lora=[True, False, True], device=device
            )
            self.conv = fused_lora.Conv1d(36, 12, 1, r=2, lora_alpha=4, device=device)
            self.out = fused_lora.LoRALinear(12, 7, r=2, lora_alpha=4, device=device)
            for m in (self.emb, self.qkv, self.conv, self.out):
                nn.init.normal_(m.lora_B)

        def forward(self, ids):
            h = self.qkv(self.emb(ids))
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            return self.out(torch.relu(h))

    torch._dynamo.reset()
    model = Model()
    ids = torch.tensor([[0, 3, 7, 49, 3], [1, 2, 3, 4, 5]], device=device)
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    def step(m):
        m.zero_grad(set_to_none=True)
        y = m(ids)
        y.square().sum().backward()
        return y.detach(), {n.removeprefix("_orig_mod."): p.grad for n, p in m.named_parameters() if p.grad is not None}

    eager = step(model)
    before = LAUNCHES.copy()
    got = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    ran = LAUNCHES - before
    assert ran["_shrink_kernel"] == 2 and any("embedding" in k for k in ran), ran
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(got[1][name], eager[1][name], rtol=1e-5, atol=1e-5, msg=name)
