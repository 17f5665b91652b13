"""LoRALinear4bit against bitsandbytes' own Linear4bit (where bitsandbytes is installed): forward and the
gradients of x, A, B; inject_lora on Linear4bit targets, save_adapter / load_adapter, merging refused,
state_dict, torch.compile of the module."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fused_lora
from fused_lora import LoRALinear4bit, reference
from fused_lora.kernels import LAUNCHES, dropout_mask

from helpers import assert_close_to_ref, f64

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.integration


def linear4bit(K, N, bias=True, quant_type="nf4", nested=True, compute_dtype=torch.float32, blocksize=64):
    lin = nn.Linear(K, N, bias=bias)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=quant_type,
                          compress_statistics=nested)  # fmt: skip
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=nested, blocksize=blocksize)  # fmt: skip
    if bias:
        q.bias = nn.Parameter(lin.bias.data.clone())
    return q.to("cpu")  # quantised on the move


def _bnb_lora(lin, x, a, b, s, mask, p):
    """bitsandbytes' layer for the base (its own dequantisation and GEMM), the LoRA term beside it, as PEFT."""
    xd = x * mask / (1 - p) if mask is not None else x
    return lin(x) + (xd.to(a.dtype) @ a.t() @ b.t() * s).to(x.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("r", [3, 8])
def test_parity_with_bitsandbytes_linear4bit(quant_type, nested, bias, p, r):
    torch.manual_seed(0)
    K, N = 128, 37  # K a multiple of the blocksize: bitsandbytes' AVX-512 CPU dequantiser is right there
    lin = linear4bit(K, N, bias, quant_type, nested)
    layer = LoRALinear4bit.from_linear4bit(lin, r=r, lora_alpha=2 * r, lora_dropout=p)
    nn.init.normal_(layer.lora_B, std=0.3)
    layer.train()
    x = torch.randn(2, 5, K)
    dy = torch.randn(2, 5, N)

    xg = x.clone().requires_grad_()
    torch.manual_seed(7)
    before = LAUNCHES["_dequant4bit_kernel"]
    y = layer(xg)
    y.backward(dy)
    assert LAUNCHES["_dequant4bit_kernel"] - before == 2
    mask = None
    if p > 0:
        torch.manual_seed(7)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        mask = dropout_mask(seed, 10, K, p).reshape(x.shape)

    a, b = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    xb = x.clone().requires_grad_()
    yb = _bnb_lora(lin, xb, a, b, layer.scaling, mask, p)
    yb.backward(dy)

    w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    x64, w64, a64, b64, bias64 = f64(
        *(t.detach() if t is not None else None for t in (x, w, layer.lora_A, layer.lora_B, lin.bias))
    )
    x64.requires_grad_(), a64.requires_grad_(), b64.requires_grad_()
    m64 = mask.cpu() if mask is not None else None
    y64 = reference.lora_linear(x64, w64, a64, b64, layer.scaling, bias64, p, dropout_mask=m64)
    y64.backward(dy.double())
    for name, ours, ref, theirs in (("y", y, y64, yb), ("dX", xg.grad, x64.grad, xb.grad),
                                    ("dA", layer.lora_A.grad, a64.grad, a.grad),
                                    ("dB", layer.lora_B.grad, b64.grad, b.grad)):  # fmt: skip
        assert_close_to_ref(name, ours.detach(), ref, theirs.detach())


def test_fp16_input_computes_in_the_layers_compute_dtype_as_bitsandbytes():
    lin = linear4bit(64, 24, compute_dtype=torch.float32)
    layer = LoRALinear4bit.from_linear4bit(lin, r=4)
    x = torch.randn(3, 64).half()
    y = layer(x)
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), lin(x).float(), atol=2e-3)  # B = 0: the base layer's output


def test_inject_save_load_and_the_16_bit_deploy_path(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    def four_bit():
        m = nn.Sequential(linear4bit(64, 64), nn.ReLU(), linear4bit(64, 32))
        for i in (0, 2):
            m[i].weight = bnb.nn.Params4bit(dense[i].weight.data.clone(), requires_grad=False,
                                            quant_type="nf4").to("cpu")  # fmt: skip
            m[i].bias = nn.Parameter(dense[i].bias.data.clone())
        return m

    model = four_bit()
    report = fused_lora.inject_lora(model, "all-linear", r=4, lora_alpha=8)
    assert all(isinstance(model[i], LoRALinear4bit) for i in (0, 2)), report
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    x = torch.randn(5, 64)
    y = model(x)
    y.sum().backward()
    assert model[0].lora_A.grad is not None and model[0].weight.grad is None
    fused_lora.save_adapter(model, tmp_path)

    fresh = four_bit()
    fused_lora.load_adapter(fresh, tmp_path)
    assert isinstance(fresh[0], LoRALinear4bit)
    assert torch.equal(fresh(x), y.detach())

    with pytest.raises(ValueError, match="4-bit"):
        fused_lora.merge_lora(fresh)
    with pytest.raises(ValueError, match="4-bit"):
        fresh[0].merge()

    dense16 = dense  # the deploy path: the adapter on the 16-bit base, merged exactly there
    fused_lora.load_adapter(dense16, tmp_path)
    unmerged = dense16(x)
    assert fused_lora.merge_lora(dense16) == 2 and dense16[0].merged
    assert torch.allclose(dense16(x), unmerged, atol=1e-5)
    assert (unmerged - y).abs().max() < 0.5 * y.abs().max()  # the same model, up to 4-bit rounding of W


def test_state_dict_has_bitsandbytes_entries_and_loads_adapters():
    lin = linear4bit(64, 24)
    keys_bnb = set(lin.state_dict())
    layer = LoRALinear4bit.from_linear4bit(lin, r=4)
    state = layer.state_dict()
    assert keys_bnb | {"lora_A", "lora_B"} == set(state)
    other = LoRALinear4bit.from_linear4bit(linear4bit(64, 24), r=4)
    with pytest.raises(RuntimeError, match="different 4-bit weight"):
        other.load_state_dict(state)
    again = LoRALinear4bit.from_linear4bit(lin, r=4)
    nn.init.normal_(layer.lora_B)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.lora_B, layer.lora_B)
    missing = again.load_state_dict({"lora_A": layer.lora_A, "lora_B": layer.lora_B}, strict=False).missing_keys
    assert missing == ["bias"]


def test_refusals_are_clear():
    lin = linear4bit(64, 32)  # bitsandbytes' CPU repacking needs N % 32 == 0
    with pytest.raises(ValueError, match="merge_weights"):
        LoRALinear4bit.from_linear4bit(lin, merge_weights=True)
    with pytest.raises(TypeError, match="Linear4bit"):
        LoRALinear4bit.from_linear4bit(nn.Linear(4, 4))
    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 64))
    if getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        with pytest.raises(ValueError, match="packing_format_for_cpu"):
            LoRALinear4bit.from_linear4bit(lin)


def test_torch_compile_fullgraph_module():
    torch._dynamo.reset()
    layer = LoRALinear4bit.from_linear4bit(linear4bit(64, 24), r=4, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 64)
    torch.manual_seed(1)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.manual_seed(1)
    assert torch.allclose(y, layer(x), atol=1e-6)
