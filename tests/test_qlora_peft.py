"""patch_peft_model on a real QLoRA stack: a tiny Llama loaded in 4 bits by transformers on the CPU
(BitsAndBytesConfig: NF4, double quantisation), wrapped by PEFT (``peft.tuners.lora.bnb.Linear4bit``
layers). The patched layers run the fused path; losses, gradients, parameters, state_dict,
save_pretrained, adapter switching and disable_adapter() match PEFT's own."""

from __future__ import annotations

import pickle

import pytest
import torch

import fused_lora
from fused_lora.kernels import LAUNCHES

from models import ALL, batch, randomize_lora

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    # hidden and intermediate sizes multiples of the blocksize (64): bitsandbytes' AVX-512 CPU dequantiser,
    # which PEFT's own forward runs here, misindexes blocks that straddle rows
    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.LlamaConfig(**sizes, num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def qlora_model(model_dir, dropout=0.0, compute_dtype=torch.float32):
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, device_map="cpu")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=dropout)
    model = peft.get_peft_model(base, cfg)
    randomize_lora(model)
    return model.train()


def twins(model_dir, **kw):
    """Two identical QLoRA models (the adapters copied: PEFT draws lora_A from the global generator)."""
    ours, theirs = qlora_model(model_dir, **kw), qlora_model(model_dir, **kw)
    adapters = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(adapters[n])
    return ours, theirs


def loss_and_grads(model, seed=5):
    torch.manual_seed(seed)
    loss = model(**batch()).loss
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patched_linear4bit_layers_match_peft(model_dir):
    ours, theirs = twins(model_dir)
    report = fused_lora.patch_peft_model(ours)
    assert len(report.patched) == 14 and not report.not_patched, report
    assert all(type(m).__name__ == "FusedLoraLinear4bit" for n, m in ours.named_modules() if n in report.patched)
    before = LAUNCHES["_dequant4bit_kernel"]
    loss, grads = loss_and_grads(ours)
    # once per layer forward, once per layer for dX but for the first block's q/k/v, whose input (the frozen
    # embedding's output) needs no gradient
    assert LAUNCHES["_dequant4bit_kernel"] - before == 14 + 11
    loss_ref, grads_ref = loss_and_grads(theirs)
    assert set(grads) == set(grads_ref) and all("lora_" in n for n in grads)
    assert torch.allclose(loss, loss_ref, rtol=1e-5), (loss, loss_ref)
    for n in grads:
        scale = grads_ref[n].abs().max()
        assert (grads[n] - grads_ref[n]).abs().max() <= 1e-4 * scale + 1e-7, n


def test_peft_surface_unchanged(model_dir, tmp_path):
    ours, theirs = twins(model_dir)
    keys = list(theirs.state_dict())
    fused_lora.patch_peft_model(ours)
    assert list(ours.state_dict()) == keys
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    ours.save_pretrained(tmp_path / "a")
    theirs.save_pretrained(tmp_path / "b")
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "a" / "adapter_model.safetensors"),
        load_file(tmp_path / "b" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    inputs = batch()["input_ids"]
    with torch.no_grad():  # disable_adapter(): the 4-bit base model, through PEFT's forward
        with ours.disable_adapter():
            y0 = ours(inputs).logits
        with theirs.disable_adapter():
            y0_ref = theirs(inputs).logits
    assert torch.allclose(y0, y0_ref, atol=1e-5)

    for m in (ours, theirs):  # a second adapter, switched to; new layers are patched too
        torch.manual_seed(11)
        m.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        randomize_lora(m, seed=9)
        m.set_adapter("other")
    assert sum(type(x).__name__ == "FusedLoraLinear4bit" for x in ours.modules()) == 14
    with torch.no_grad():
        y1, y1_ref = ours(inputs).logits, theirs(inputs).logits
    assert torch.allclose(y1, y1_ref, atol=1e-4)
    for m in (ours, theirs):  # merging is PEFT's (dequantise, add, requantise, with its rounding warning)
        with pytest.warns(UserWarning, match="rounding"):
            m.merge_adapter()
    with torch.no_grad():
        assert torch.equal(ours(inputs).logits, theirs(inputs).logits)
    ours.unmerge_adapter()
    assert fused_lora.unpatch_peft_model(ours) == 14
    assert not any(type(x).__name__ == "FusedLoraLinear4bit" for x in ours.modules())


def test_dropout_and_fp16_inputs_train(model_dir):
    model = qlora_model(model_dir, dropout=0.1)
    fused_lora.patch_peft_model(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(3):
        loss = model(**batch()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    layer = next(m for m in model.modules() if type(m).__name__ == "FusedLoraLinear4bit")
    x = torch.randn(3, 64).half()
    assert layer(x).dtype == torch.float16  # fp16 in, computed in the base layer's compute dtype (fp32)


def test_eval_mode_falls_back_after_bitsandbytes_repacks(model_dir):
    """bitsandbytes' eval-mode CPU forward repacks a weight into a layout we cannot read: PEFT's forward
    (which ran it, through disable_adapter) keeps serving that layer, correctly."""
    ours = qlora_model(model_dir).eval()
    fused_lora.patch_peft_model(ours)
    inputs = batch()["input_ids"]
    with torch.no_grad():
        y = ours(inputs).logits
        with ours.disable_adapter():
            ours(inputs)
        y_after = ours(inputs).logits  # bf16 CPU kernel where bitsandbytes repacked
    assert torch.allclose(y, y_after, atol=0.1 * y.abs().max())


def test_patched_qlora_model_pickles(model_dir):
    model = qlora_model(model_dir)
    fused_lora.patch_peft_model(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "FusedLoraLinear4bit")
    assert pickle.loads(pickle.dumps(type(layer))) is type(layer)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_one_peft_linear4bit_layer_forward_and_grads(p):
    """PEFT's own lora.bnb.Linear4bit layer, patched vs not, on one bitsandbytes Linear4bit: y, dX, dA, dB
    (fp64 reference on the dequantised weight as the bound; PEFT's own result as the same-dtype error)."""
    import inspect

    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    from fused_lora import reference
    from fused_lora.integrations.peft_qlora import fused_linear4bit_class
    from fused_lora.kernels import dropout_mask

    from helpers import assert_close_to_ref, f64

    torch.manual_seed(0)
    K, N, r = 128, 40, 6
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    base = base.to("cpu")
    kwargs = {"r": r, "lora_alpha": 12}
    if "config" in inspect.signature(Linear4bit.__init__).parameters:
        kwargs["config"] = peft.LoraConfig(r=r, lora_alpha=12, lora_dropout=p)
    else:
        kwargs["lora_dropout"] = p
    layer = Linear4bit(base, "default", **kwargs).train()
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    x, dy = torch.randn(3, 7, K), torch.randn(3, 7, N)

    def run(cls):
        layer.__class__ = cls
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        torch.manual_seed(4)
        y = layer(xg)
        y.backward(dy)
        return (
            y.detach(),
            xg.grad,
            layer.lora_A["default"].weight.grad.clone(),
            layer.lora_B["default"].weight.grad.clone(),
        )

    ours = run(fused_linear4bit_class())
    mask = None
    if p > 0:  # PEFT's own forward draws torch's dropout mask: compare ours with the reference on our mask
        torch.manual_seed(4)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        mask = dropout_mask(seed, 21, K, p).reshape(x.shape)
    theirs = run(Linear4bit) if p == 0 else None
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x64, w64, a64, b64, bias64 = f64(x, w, a, b, base.bias.detach())
    for t in (x64, a64, b64):
        t.requires_grad_()
    y64 = reference.lora_linear(x64, w64, a64, b64, 2.0, bias64, p, dropout_mask=mask)
    y64.backward(dy.double())
    if theirs is None:  # with dropout PEFT draws its own mask: the same-dtype error is fp32 torch's on ours
        x32, a32, b32 = (t.clone().requires_grad_() for t in (x, a, b))
        y32 = reference.lora_linear(x32, w, a32, b32, 2.0, base.bias.detach(), p, dropout_mask=mask)
        y32.backward(dy)
        theirs = (y32.detach(), x32.grad, a32.grad, b32.grad)
    for name, got, ref, t in zip(("y", "dX", "dA", "dB"), ours, (y64, x64.grad, a64.grad, b64.grad), theirs):
        assert_close_to_ref(name, got, ref, t)
