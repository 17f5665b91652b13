"""The ways people run a LoRA linear layer, built on identical weights, for side-by-side measurement.

    fused      — ours as users get it: LoRALinear on the Triton kernels, implementation chosen per shape
    fused-tma  — ours, the fused GEMM forced, its Hopper path (TMA descriptors)
    fused-ptr  — ours, the fused GEMM forced, its pointer path (what Ampere and unaligned views run)
    hybrid     — ours, the hybrid forced: our low-rank kernel, then cuBLAS addmm
    peft   — Hugging Face PEFT's own lora.Linear when peft is installed, else the same formula in plain
             PyTorch (fused_lora.reference); the row says which
    addmm  — Unsloth's cuBLAS chain: y = x@Wᵀ; y.addmm_(x@Aᵀ, Bᵀ, alpha=s), with the matching backward
             (no dropout: Unsloth's fast path requires lora_dropout = 0); adapters in another dtype than x
             (fp32 under bf16) are cast to x's for each step, as torch.autocast casts them
    floor  — the bare base GEMM(s) through cuBLAS: what the layer costs with no adapter at all

The base weight is frozen and there is no bias (Llama's projections), x requires grad (every layer but
the first needs dX).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

import fused_lora
from fused_lora import reference

SHAPES = {  # name: (in K, out N), from real models
    "attn-7b": (4096, 4096),
    "mlp-up-7b": (4096, 11008),
    "mlp-down-7b": (11008, 4096),
    "mlp-up-8b": (4096, 14336),
    "mlp-down-8b": (14336, 4096),
    "attn-70b": (8192, 8192),
    "mlp-up-70b": (8192, 28672),
    "mlp-down-70b": (28672, 8192),
}


@dataclass(frozen=True)
class Case:
    shape: str
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout: float
    device: str

    @property
    def alpha(self) -> float:
        return 2.0 * self.r  # s = 2, a common choice; the value does not change the cost

    def fields(self) -> dict:
        """The case's columns in a results row."""
        return {"shape": self.shape, "M": self.M, "K": self.K, "N": self.N, "r": self.r,
                "dtype": str(self.dtype).removeprefix("torch."),
                "adapter_dtype": str(self.adapter_dtype).removeprefix("torch."), "dropout": self.dropout}  # fmt: skip


class Provider:
    """A module and an input; `forward()`, `backward()` (of the last forward), `fwdbwd()`."""

    name = "?"
    impl = ""

    def __init__(self, case: Case, weights: dict[str, torch.Tensor]) -> None:
        self.case = case
        self.module = self.build(case, weights)
        self.x = weights["x"].detach().clone().requires_grad_()
        self.dy = weights["dy"]
        self.y: torch.Tensor | None = None

    def build(self, case: Case, w: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def trainable(self) -> list[torch.Tensor]:
        return [self.x, *[p for p in self.module.parameters() if p.requires_grad]]

    def forward(self) -> torch.Tensor:
        self.y = self.module(self.x)
        return self.y

    def backward(self) -> None:
        self.y.backward(self.dy, retain_graph=True)

    def fwdbwd(self) -> None:
        self.module(self.x).backward(self.dy)


class Fused(Provider):
    name, impl = "fused", "fused_lora (Triton, FUSED_LORA_IMPL=auto)"
    choice: tuple[str, str | None] = ("auto", None)  # (implementation, GEMM path) forced while it runs

    def build(self, case, w):
        layer = fused_lora.LoRALinear(
            case.K,
            case.N,
            r=case.r,
            lora_alpha=case.alpha,
            lora_dropout=case.dropout,
            bias=False,
            device=case.device,
            dtype=case.dtype,
            lora_dtype=case.adapter_dtype,
        )
        _load(layer.weight, w["W"]), _load(layer.lora_A, w["A"]), _load(layer.lora_B, w["B"])
        return layer

    def _scope(self):
        from fused_lora.kernels import tuning

        stack = contextlib.ExitStack()
        stack.enter_context(fused_lora.use_backend("triton"))
        stack.enter_context(fused_lora.use_impl(self.choice[0]))
        if self.choice[1]:
            stack.enter_context(tuning.force("gemm_path", self.choice[1]))
        return stack

    def forward(self):
        with self._scope():
            return super().forward()

    def backward(self):
        with self._scope():
            super().backward()

    def fwdbwd(self):
        with self._scope():
            super().fwdbwd()


class FusedTMA(Fused):
    name, impl, choice = "fused-tma", "fused_lora fused GEMM, TMA path", ("fused", "tma")


class FusedPointer(Fused):
    name, impl, choice = "fused-ptr", "fused_lora fused GEMM, pointer path", ("fused", "pointer")


class Hybrid(Fused):
    name, impl, choice = "hybrid", "fused_lora low-rank kernel + cuBLAS addmm", ("hybrid", None)


class Peft(Provider):
    name = "peft"

    def build(self, case, w):
        base = nn.Linear(case.K, case.N, bias=False, device=case.device, dtype=case.dtype)
        _load(base.weight, w["W"])
        base.weight.requires_grad_(False)
        try:
            layer = _peft_linear(base, case)
            self.impl = "peft " + __import__("peft").__version__
        except ModuleNotFoundError as e:  # peft absent; any other ImportError (a broken install) is raised
            if (e.name or "").partition(".")[0] != "peft":
                raise
            self.impl = "reference formula (peft not installed)"
            return _ReferenceLoRA(base, case, w)
        _load(layer.lora_A["default"].weight, w["A"])
        _load(layer.lora_B["default"].weight, w["B"])
        return layer


class Addmm(Provider):
    name, impl = "addmm", "cuBLAS chain (Unsloth)"

    def build(self, case, w):
        if case.dropout > 0:
            raise NotApplicable("Unsloth's cuBLAS path requires lora_dropout = 0")
        if case.adapter_dtype != case.dtype:
            self.impl += ", adapters cast to x's dtype per step"
        return _AddmmLoRA(case, w)


class Floor(Provider):
    name, impl = "floor", "cuBLAS base GEMM only"

    def build(self, case, w):
        base = nn.Linear(case.K, case.N, bias=False, device=case.device, dtype=case.dtype)
        _load(base.weight, w["W"])
        base.weight.requires_grad_(False)
        return base


class NotApplicable(Exception):
    """This provider cannot run this case (the message says why)."""


PROVIDER_CLASSES = {p.name: p for p in (Fused, FusedTMA, FusedPointer, Hybrid, Peft, Addmm, Floor)}


def make_weights(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (never zero: zeros run faster) x, dY, W, A, B for a case, on its device."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, dtype, std=1.0):
        if case.device == "meta":
            return torch.empty(shape, device="meta", dtype=dtype)
        return (torch.randn(shape, generator=g) * std).to(case.device, dtype)

    return {
        "x": rnd(case.M, case.K, dtype=case.dtype),
        "dy": rnd(case.M, case.N, dtype=case.dtype),
        "W": rnd(case.N, case.K, dtype=case.dtype, std=case.K**-0.5),
        "A": rnd(case.r, case.K, dtype=case.adapter_dtype, std=case.K**-0.5),
        "B": rnd(case.N, case.r, dtype=case.adapter_dtype, std=0.1),
    }


def build(name: str, case: Case, weights: dict[str, torch.Tensor]) -> Provider:
    return PROVIDER_CLASSES[name](case, weights)


def _load(param: torch.Tensor, value: torch.Tensor) -> None:
    if param.device.type != "meta":
        with torch.no_grad():
            param.copy_(value)


def _peft_linear(base: nn.Linear, case: Case) -> nn.Module:
    from peft.tuners.lora import Linear, LoraConfig  # ImportError when peft is absent

    kwargs = {"r": case.r, "lora_alpha": case.alpha}
    if "config" in inspect.signature(Linear.__init__).parameters:  # peft >= 0.18
        kwargs["config"] = LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout)
    else:
        kwargs["lora_dropout"] = case.dropout
    layer = Linear(base, "default", **kwargs)
    for adapters in (layer.lora_A, layer.lora_B):  # PEFT keeps adapters in fp32 when asked to
        adapters["default"].to(case.adapter_dtype)
    return layer


class _ReferenceLoRA(nn.Module):
    def __init__(self, base: nn.Linear, case: Case, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base, self.case = base, case
        self.lora_A = nn.Parameter(w["A"].clone())
        self.lora_B = nn.Parameter(w["B"].clone())

    def forward(self, x):
        return reference.lora_linear(
            x, self.base.weight, self.lora_A, self.lora_B, self.case.alpha / self.case.r, None, self.case.dropout
        )


class _AddmmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, s):
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ weight.t()
        xa = x2 @ lora_A.t()
        y.addmm_(xa, lora_B.t(), alpha=s)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.s = s
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        g = dy2 @ lora_B
        dx = dy2 @ weight
        dx.addmm_(g, lora_A, alpha=ctx.s)
        d_a = (g.t() @ x2).mul_(ctx.s)
        d_b = (dy2.t() @ xa).mul_(ctx.s)
        return dx.view(x.shape), None, d_a, d_b, None


class _AddmmLoRA(nn.Module):
    def __init__(self, case: Case, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(w["W"].clone(), requires_grad=False)
        self.lora_A = nn.Parameter(w["A"].clone())
        self.lora_B = nn.Parameter(w["B"].clone())
        self.s = case.alpha / case.r

    def forward(self, x):
        # the chain runs in one dtype (cuBLAS has no mixed addmm): a no-op cast when the adapters are x's
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return _AddmmFunction.apply(x, self.weight, a, b, self.s)


# ======================================================================================================
# QLoRA (issue 17). Appended block: opt-in providers with a 4-bit NF4 base weight (blocksize 64, double
# quantisation), quantised from the case's W by bitsandbytes where it is installed, else random nibbles and
# scales of W's magnitude (the same bytes to move: values do not change the speed of a dequantisation).
#
#     qlora       — ours: LoRALinear4bit (dequantise into the shared scratch, fused GEMM + LoRA epilogue;
#                   dequantise again for dX)
#     peft-qlora  — PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit, unpatched (needs bitsandbytes)
#     dequant     — the dequantisation kernel alone, once per direction (as a QLoRA layer runs it): compare
#                   its time with the bandwidth floor, model_mb / the GPU's TB/s
# ======================================================================================================


def _quantized(case: Case, w: torch.Tensor):
    """(QuantizedWeight, bitsandbytes Linear4bit or None) for the case's W [N, K]."""
    from fused_lora.quant import NestedAbsmax, QuantizedWeight

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if bnb is not None and case.device != "meta":
        lin = bnb.nn.Linear4bit(case.K, case.N, bias=False, compute_dtype=case.dtype, quant_type="nf4",
                                compress_statistics=True, device="cpu")  # fmt: skip
        lin.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)  # fmt: skip
        lin = lin.to(case.device)
        return QuantizedWeight.from_bnb(lin.weight), lin
    T, dev = case.N * case.K, case.device
    blocks = -(-T // 64)
    if dev == "meta":
        rnd = lambda *s, dtype: torch.empty(s, dtype=dtype, device=dev)
        packed, codes = rnd((T + 1) // 2, dtype=torch.uint8), rnd(blocks, dtype=torch.uint8)
        nested = NestedAbsmax(rnd(-(-blocks // 256), dtype=torch.float32), rnd(256, dtype=torch.float32), 256,
                              rnd(1, dtype=torch.float32))  # fmt: skip
    else:
        g = torch.Generator().manual_seed(0)
        packed = torch.randint(0, 256, ((T + 1) // 2,), dtype=torch.uint8, generator=g).to(dev)
        codes = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=g).to(dev)
        code2 = torch.linspace(-1, 1, 256).to(dev)
        scale = float(w.float().abs().max()) if w.numel() else 1.0
        nested = NestedAbsmax(torch.full((-(-blocks // 256),), scale / 2, device=dev), code2, 256,
                              torch.full((1,), scale / 2, device=dev))  # fmt: skip
    return QuantizedWeight(packed, codes, (case.N, case.K), "nf4", 64, case.dtype, nested), None


class QLoRA(Fused):
    name, impl = "qlora", "fused_lora LoRALinear4bit (our dequantisation + fused GEMM)"

    def build(self, case, w):
        from fused_lora import LoRALinear4bit

        q, lin = _quantized(case, w["W"])
        kwargs = dict(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout, lora_dtype=case.adapter_dtype)
        layer = (
            LoRALinear4bit.from_linear4bit(lin, **kwargs)
            if lin is not None
            else LoRALinear4bit.from_quantized(q, **kwargs)
        )
        _load(layer.lora_A, w["A"]), _load(layer.lora_B, w["B"])
        self.quantized, self.state = q, _state(q)
        return layer

    def expected(self) -> torch.Tensor:
        """y in fp64 from the plain-PyTorch reference on the dequantised W (what the smoke run checks)."""
        return _expected_4bit(self)


class PeftQLoRA(Provider):
    name = "peft-qlora"

    def build(self, case, w):
        try:
            from peft.tuners.lora.bnb import Linear4bit
        except ImportError as e:
            raise NotApplicable(f"needs peft and bitsandbytes ({e})") from None
        q, lin = _quantized(case, w["W"])
        if lin is None:
            raise NotApplicable("needs bitsandbytes and a real device (it quantises on the move there)")
        self.impl = f"peft {__import__('peft').__version__} + bitsandbytes {__import__('bitsandbytes').__version__}"
        self.quantized, self.state = q, _state(q)
        kwargs = {"r": case.r, "lora_alpha": case.alpha}
        if "config" in inspect.signature(Linear4bit.__init__).parameters:  # peft >= 0.18
            from peft import LoraConfig

            kwargs["config"] = LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout)
        else:
            kwargs["lora_dropout"] = case.dropout
        layer = Linear4bit(lin, "default", **kwargs)
        for adapters in (layer.lora_A, layer.lora_B):
            adapters["default"].to(case.adapter_dtype)
        _load(layer.lora_A["default"].weight, w["A"]), _load(layer.lora_B["default"].weight, w["B"])
        return layer.train()

    def expected(self) -> torch.Tensor:
        return _expected_4bit(self)


def _state(q) -> list[torch.Tensor]:
    """A 4-bit weight's scales: its own state (like a parameter), not bytes kept for backward."""
    n = q.nested
    return [q.absmax, *((n.absmax, n.code, n.offset) if n is not None else ())]


def _expected_4bit(prov: Provider) -> torch.Tensor:
    from fused_lora.quant import dequantize_reference

    w = dequantize_reference(prov.quantized, prov.case.dtype).double()
    a, b = (p.detach().double() for p in prov.module.parameters() if p.requires_grad)
    if a.shape[1] != w.shape[1]:  # lora_B listed first
        a, b = b, a
    return reference.lora_linear(prov.x.detach().double(), w, a, b, prov.case.alpha / prov.case.r)


class _DequantOnly(nn.Module):
    def __init__(self, q) -> None:
        super().__init__()
        self.q = q
        self.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)

    def forward(self, x):
        with fused_lora.use_backend("triton"):
            return self.q.dequantize(self.q.dtype, out=self.out)


class Dequant(Provider):
    name, impl = "dequant", "fused_lora 4-bit dequantisation kernel alone (NF4, bs 64, nested)"

    def build(self, case, w):
        q, _ = _quantized(case, w["W"])
        return _DequantOnly(q)

    def trainable(self) -> list[torch.Tensor]:
        return []

    def backward(self) -> None:  # a QLoRA layer's backward dequantises once more (x.grad: zero, for readers)
        self.module(self.x)
        if self.x.grad is None:
            self.x.grad = torch.zeros_like(self.x)

    def expected(self) -> torch.Tensor:
        from fused_lora.quant import dequantize_reference

        return dequantize_reference(self.module.q).double()

    def fwdbwd(self) -> None:
        self.module(self.x)
        self.module(self.x)


PROVIDER_CLASSES |= {p.name: p for p in (QLoRA, PeftQLoRA, Dequant)}


# ======================================================================================================
# DoRA (issue 18). Appended block: opt-in providers, the same weights; the magnitude is PEFT's initial
# one, ‖W_j + s·(B·A)_j‖, so both compute the LoRA layer's y (the smoke run's reference holds).
# ======================================================================================================


class FusedDoRA(Fused):
    name, impl = "fused-dora", "fused_lora LoRALinear(use_dora=True): m/n in the fused GEMM's epilogue, factored norm"

    def build(self, case, w):
        layer = fused_lora.LoRALinear(case.K, case.N, r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout,
                                      bias=False, device=case.device, dtype=case.dtype, lora_dtype=case.adapter_dtype,
                                      use_dora=True)  # fmt: skip
        _load(layer.weight, w["W"]), _load(layer.lora_A, w["A"]), _load(layer.lora_B, w["B"])
        if case.device != "meta":
            layer.reset_magnitude()
        return layer


class PeftDoRA(Provider):
    name = "peft-dora"

    def build(self, case, w):
        try:
            from peft.tuners.lora import Linear, LoraConfig
        except ImportError as e:
            raise NotApplicable(f"needs peft ({e})") from None
        if "config" not in inspect.signature(Linear.__init__).parameters:
            raise NotApplicable("needs peft >= 0.18")
        base = nn.Linear(case.K, case.N, bias=False, device=case.device, dtype=case.dtype)
        _load(base.weight, w["W"])
        base.weight.requires_grad_(False)
        if case.device == "meta":
            raise NotApplicable("PEFT's DoRA initialises its magnitude from W's values (no meta tensors)")
        config = LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout, use_dora=True)
        layer = Linear(base, "default", r=case.r, lora_alpha=case.alpha, config=config, use_dora=True)
        for adapters in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            adapters["default"].to(case.adapter_dtype)
        _load(layer.lora_A["default"].weight, w["A"]), _load(layer.lora_B["default"].weight, w["B"])
        from fused_lora.dora import dora_norm

        m = dora_norm(base.weight, w["A"], w["B"], case.alpha / case.r)
        _load(layer.lora_magnitude_vector["default"].weight, m.to(case.adapter_dtype))
        self.impl = "peft " + __import__("peft").__version__ + " DoRA"
        return layer.train()


class PeftDoRACompiled(PeftDoRA):
    """PEFT's DoRA layer under ``torch.compile`` (inductor, static shapes), the other way users speed it up."""

    name = "peft-dora-compile"

    def build(self, case, w):
        layer = super().build(case, w)
        self.impl += " under torch.compile"
        return torch.compile(layer, dynamic=False)


PROVIDER_CLASSES |= {p.name: p for p in (FusedDoRA, PeftDoRA, PeftDoRACompiled)}
