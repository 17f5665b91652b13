"""A whole decoder layer as a benchmark case (issue 16): what LoRA costs per training step, not per
projection.

The layer is transformers' own ``LlamaDecoderLayer``, built offline from a ``LlamaConfig`` at Llama-3-8B's
sizes (hidden 4096, 32 query heads and 8 key/value heads of 128, SiLU-gated MLP of 14336, RMSNorm),
attention through ``torch.nn.functional.scaled_dot_product_attention`` (causal, grouped-query: the
"sdpa" implementation), rotary embeddings real (``LlamaRotaryEmbedding``, computed once outside the
timed step, as a model computes them once for all its layers; applied inside the layer every step). x is
[batch, seq, hidden] with M = batch·seq tokens; bf16 weights and fp32 adapters by default (PEFT's default
under 16-bit weights), LoRA on q, k, v, o, gate, up and down. Providers, on identical weights:

    fused   fused_lora.inject_lora on the seven projections (LoRALinear), FUSED_LORA_IMPL=fused: the
            fused GEMM in every projection, forward and dX
    hybrid  the same layers, FUSED_LORA_IMPL=hybrid: our low-rank kernel, then cuBLAS addmm
    auto    the same layers, FUSED_LORA_IMPL=auto: the per-shape choice (what users get by default)
    peft    ``peft.get_peft_model(layer, LoraConfig(target_modules=the seven))``: PEFT's own lora.Linear
            (adapters fp32 through PEFT's ``autocast_adapter_dtype``; x cast to fp32 for the low-rank path)
    floor   the bare layer, no adapter: every parameter frozen, x requires grad (dX only)

Naming: in the linear case (providers.py) "fused" is the per-shape choice and "fused-tma" the forced
fused GEMM; here, as issue 16 names them, "fused" forces the fused GEMM and "auto" is the choice.

Only the step is timed: the layer's base weights are frozen (LoRA training), the norms' weights too, and
backward produces dX and the adapters' gradients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import model
from .providers import Fused as _LinearFused
from .providers import NotApplicable, Provider, _load

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "intermediate": 14336}
# The CPU smoke run and tests: every size odd or uneven where the layer allows (head_dim must be even
# for the rotary halves), grouped-query attention kept (2 query heads per key/value head).
TINY = {"hidden": 48, "heads": 4, "kv_heads": 2, "head_dim": 12, "intermediate": 70}
PROVIDERS = model.DECODER_PROVIDERS


@dataclass(frozen=True)
class DecoderCase:
    shape: str
    batch: int
    seq: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout: float
    device: str

    @property
    def M(self) -> int:
        return self.batch * self.seq

    @property
    def alpha(self) -> float:
        return 2.0 * self.r  # s = 2 (r = 16, alpha = 32)

    @property
    def dims(self) -> model.DecoderDims:
        return model.DecoderDims(self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate,
                                 self.batch, self.seq)  # fmt: skip

    def describe(self) -> str:
        return (f"Llama decoder layer: hidden {self.hidden}, {self.heads}/{self.kv_heads} heads of {self.head_dim}, "
                f"MLP {self.intermediate}")  # fmt: skip

    def fields(self) -> dict:
        """The case's columns in a results row (K = N = hidden: the layer maps hidden to hidden)."""
        text = f"{self.shape}, {self.batch} x {self.seq} tokens ({self.describe()})"
        return {"shape": self.shape, "M": self.M, "K": self.hidden, "N": self.hidden, "r": self.r,
                "dtype": str(self.dtype).removeprefix("torch."),
                "adapter_dtype": str(self.adapter_dtype).removeprefix("torch."), "dropout": self.dropout,
                "batch": self.batch, "seq": self.seq, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "intermediate": self.intermediate, "case_text": text}  # fmt: skip


def make_case(M: int, seq: int, r: int, dtype: torch.dtype, adapter_dtype: torch.dtype, dropout: float, device: str,
              dims: dict = LLAMA3_8B, shape: str = "decoder-8b") -> DecoderCase:  # fmt: skip
    """M tokens as M / seq sequences of `seq` (one sequence of M when M < seq)."""
    seq = min(seq, M)
    if M % seq:
        raise ValueError(f"M = {M} tokens is not a whole number of sequences of {seq}")
    return DecoderCase(shape, M // seq, seq, **dims, r=r, dtype=dtype, adapter_dtype=adapter_dtype, dropout=dropout,
                       device=device)  # fmt: skip


def _transformers():
    try:
        import transformers
        from transformers import LlamaConfig
        from transformers.models.llama import modeling_llama
    except ImportError as e:
        raise NotApplicable(f"needs transformers ({e})") from None
    return transformers, LlamaConfig, modeling_llama


def llama_config(case: DecoderCase):
    """A LlamaConfig of the case's sizes, attention through SDPA; nothing is downloaded."""
    _, LlamaConfig, _ = _transformers()
    return LlamaConfig(
        hidden_size=case.hidden, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
        head_dim=case.head_dim, intermediate_size=case.intermediate, hidden_act="silu", rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=max(8192, case.seq), attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )  # fmt: skip


def base_layer(case: DecoderCase, w: dict) -> nn.Module:
    """A LlamaDecoderLayer holding the case's base weights (no random initialisation), all frozen."""
    _, _, modeling_llama = _transformers()
    with torch.device("meta"):
        layer = modeling_llama.LlamaDecoderLayer(llama_config(case), layer_idx=0)
    layer = layer.to(dtype=case.dtype).to_empty(device=case.device)
    if case.device != "meta":
        layer.load_state_dict(w["layer"])
    return layer.requires_grad_(False)


def make_weights(case: DecoderCase, seed: int = 0) -> dict:
    """The layer's base weights (nn.Linear's own uniform ±1/√fan_in, norms 1), the adapters
    (A ~ N(0, 1/K), B ~ N(0, 0.1²): trained-looking, never zero), x and dY ~ N(0, 1) [batch, seq, hidden],
    and the rotary cos / sin [batch, seq, head_dim], on the case's device."""
    dev = case.device
    g = None if dev == "meta" else torch.Generator(device=dev).manual_seed(seed)

    def rnd(shape, dtype, std=1.0, uniform=False):
        if dev == "meta":
            return torch.empty(shape, device=dev, dtype=dtype)
        draw = torch.rand if uniform else torch.randn
        t = draw(shape, generator=g, device=dev)
        t = t * 2 - 1 if uniform else t
        return (t * std).to(dtype)

    meta = base_layer(dataclasses.replace(case, device="meta"), {})
    layer = {
        name: torch.ones(p.shape, device=dev, dtype=case.dtype) if name.endswith("norm.weight") and dev != "meta"
        else rnd(tuple(p.shape), case.dtype, p.shape[-1] ** -0.5, uniform=True)
        for name, p in meta.state_dict().items()
    }  # fmt: skip
    a, b = {}, {}
    for name, K, N in _projections(case):
        a[name] = rnd((case.r, K), case.adapter_dtype, K**-0.5)
        b[name] = rnd((N, case.r), case.adapter_dtype, 0.1)
    x = rnd((case.batch, case.seq, case.hidden), case.dtype)
    dy = rnd((case.batch, case.seq, case.hidden), case.dtype)
    return {"layer": layer, "A": a, "B": b, "x": x, "dy": dy, **_rotary(case, x)}


def _projections(case: DecoderCase) -> list[tuple[str, int, int]]:
    """(module name, in, out) of the adapted projections, in TARGETS order."""
    return [(t, K, N) for t, (_, K, N) in zip(TARGETS, case.dims.projections())]


def _rotary(case: DecoderCase, x: torch.Tensor) -> dict:
    shape = (case.batch, case.seq, case.head_dim)
    if case.device == "meta":
        return {"cos": torch.empty(shape, device="meta", dtype=case.dtype),
                "sin": torch.empty(shape, device="meta", dtype=case.dtype)}  # fmt: skip
    _, _, modeling_llama = _transformers()
    rope = modeling_llama.LlamaRotaryEmbedding(config=llama_config(case)).to(case.device)
    positions = torch.arange(case.seq, device=case.device).expand(case.batch, -1)
    cos, sin = rope(x, positions)
    return {"cos": cos, "sin": sin}


class Step(nn.Module):
    """x -> layer(x, position_embeddings=(cos, sin)): the timed step (transformers 4.x returns a tuple)."""

    def __init__(self, layer: nn.Module, w: dict) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = (w["cos"], w["sin"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x, position_embeddings=self.rotary)
        return out[0] if isinstance(out, tuple) else out


class Floor(Provider):
    name = "floor"

    def build(self, case, w):
        self.state = (w["cos"], w["sin"])  # inputs shared by every step: not kept "for" backward
        self.impl = f"transformers {_transformers()[0].__version__} LlamaDecoderLayer, no adapter"
        return Step(base_layer(case, w), w)


class Peft(Provider):
    name = "peft"

    def build(self, case, w):
        try:
            import peft
        except ImportError as e:
            raise NotApplicable(f"needs peft ({e})") from None
        layer = base_layer(case, w)
        config = peft.LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout,
                                 target_modules=list(TARGETS))  # fmt: skip
        net = peft.get_peft_model(layer, config, autocast_adapter_dtype=case.adapter_dtype == torch.float32)
        found = set()
        for name, module in net.named_modules():
            short = name.rsplit(".", 1)[-1]
            if short in TARGETS and hasattr(module, "lora_A"):
                for adapters, key in ((module.lora_A, "A"), (module.lora_B, "B")):
                    adapters["default"].to(case.adapter_dtype)
                    _load(adapters["default"].weight, w[key][short])
                found.add(short)
        if found != set(TARGETS):
            raise RuntimeError(f"get_peft_model adapted {sorted(found)}, expected {list(TARGETS)}")
        self.state = (w["cos"], w["sin"])
        self.impl = (f"peft {peft.__version__} get_peft_model on transformers {_transformers()[0].__version__} "
                     "LlamaDecoderLayer")  # fmt: skip
        return Step(net, w)


class Fused(_LinearFused):
    """inject_lora's LoRALinear layers; `choice` = (FUSED_LORA_IMPL, GEMM path) while a step runs."""

    name, impl, choice = "fused", "fused_lora inject_lora, FUSED_LORA_IMPL=fused", ("fused", None)

    def build(self, case, w):
        from fused_lora import LoRALinear, inject_lora

        layer = base_layer(case, w)
        inject_lora(layer, list(TARGETS), r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout,
                    lora_dtype=case.adapter_dtype)  # fmt: skip
        for name, module in layer.named_modules():
            if isinstance(module, LoRALinear):
                short = name.rsplit(".", 1)[-1]
                _load(module.lora_A, w["A"][short]), _load(module.lora_B, w["B"][short])
        self.state = (w["cos"], w["sin"])
        return Step(layer, w)


class Hybrid(Fused):
    name, impl, choice = "hybrid", "fused_lora inject_lora, FUSED_LORA_IMPL=hybrid", ("hybrid", None)


class Auto(Fused):
    name, impl, choice = "auto", "fused_lora inject_lora, FUSED_LORA_IMPL=auto", ("auto", None)


PROVIDER_CLASSES = {p.name: p for p in (Fused, Hybrid, Auto, Peft, Floor)}


def build(name: str, case: DecoderCase, weights: dict) -> Provider:
    return PROVIDER_CLASSES[name](case, weights)


def adapter_grads(prov: Provider) -> dict[str, torch.Tensor]:
    """{"q_proj.A": dA, "q_proj.B": dB, ...} of a LoRA provider's last backward (PEFT's and ours alike)."""
    out = {}
    for name, p in prov.module.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        target = next(t for t in reversed(parts) if t in TARGETS)
        kind = "A" if "lora_A" in parts else "B"
        out[f"{target}.{kind}"] = p.grad
    return out
