"""The FLOP and byte model of every provider, pass by pass, and the roofline time it implies.

A *pass* is one kernel (or one cuBLAS call) with the FLOPs it must do and the fewest bytes it must move
(each operand read once, each output written once). Its roofline time is max(FLOPs / peak, bytes / BW);
a provider's time is the sum over its passes (they run one after another). See docs/design.md for the
same arithmetic written out at M=8192, K=N=4096, r=16.

Shapes: x [M, K], W [N, K], A [r, K], B [N, r]; e = bytes per activation element, ea = per adapter
element; d = dropout on. The base weight is frozen (no dW), as in LoRA training.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "bwd", "fwdbwd")
# fused: ours as users get it (FUSED_LORA_IMPL=auto: per-shape choice); fused-tma / fused-ptr: our fused
# GEMM forced, through TMA descriptors or pointer loads; hybrid: our low-rank kernel + cuBLAS addmm.
PROVIDERS = ("fused", "fused-tma", "fused-ptr", "hybrid", "peft", "addmm", "floor")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    tflops: float  # dense 16-bit tensor-core peak (datasheet)
    tbps: float  # HBM bandwidth, TB/s (datasheet)


GPUS = {
    "h100": GPUSpec("H100 SXM", 989.0, 3.35),
    "h200": GPUSpec("H200", 989.0, 4.8),
    "a100": GPUSpec("A100 SXM", 312.0, 2.04),
}


def gpu_spec_for(device_name: str | None) -> GPUSpec:
    """The spec whose key appears in a CUDA device name ('NVIDIA H100 80GB HBM3' -> h100); H100 else."""
    name = (device_name or "").lower()
    return next((spec for key, spec in GPUS.items() if key in name), GPUS["h100"])


@dataclass(frozen=True)
class Pass:
    name: str
    flops: float
    bytes: float

    def ms(self, gpu: GPUSpec) -> float:
        return max(self.flops / (gpu.tflops * 1e12), self.bytes / (gpu.tbps * 1e12)) * 1e3


def useful_flops(mode: str, M: int, K: int, N: int, r: int) -> float:
    """The math a LoRA layer must do (base + low-rank), the same for every provider: TFLOP/s divide this.
    Forward 2MNK + 2MKr + 2MNr; backward dX (2MNK), g = dY·B and dB (2MNr each), dA and g·A (2MKr each)."""
    fwd = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    bwd = 2 * M * N * K + 4 * M * N * r + 4 * M * K * r
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def floor_flops(mode: str, M: int, K: int, N: int) -> float:
    gemm = 2 * M * N * K
    return {"fwd": gemm, "bwd": gemm, "fwdbwd": 2 * gemm}[mode]


def passes(
    provider: str, mode: str, M: int, K: int, N: int, r: int, e: int = 2, ea: int = 2, dropout: bool = False
) -> list[Pass]:
    """The passes `provider` runs for `mode`."""
    fwd, bwd = _PASSES[provider](M, K, N, r, e, ea, dropout)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


def roofline_ms(ps: list[Pass], gpu: GPUSpec) -> float:
    return sum(p.ms(gpu) for p in ps)


def _gemm(name, M, N, K, e, out_e=None):
    """out [M, N] = a [M, K] · b [K, N]."""
    return Pass(name, 2 * M * N * K, e * (M * K + K * N) + (out_e or e) * M * N)


def _floor(M, K, N, r, e, ea, d):
    return [_gemm("x·Wᵀ", M, N, K, e)], [_gemm("dY·W", M, K, N, e)]


def _fused(M, K, N, r, e, ea, d):
    # The grad pass splits ranks above 64 (32 with fp32 activations) across programs that each re-read
    # their dY and x band (kernels.configs.grad_r_block).
    reads = -(-r // (64 if e == 2 else 32))
    fwd = [
        Pass("shrink drop(x)·Aᵀ", 2 * M * K * r, e * M * K + ea * r * K + 4 * M * r),
        Pass(
            "GEMM + low-rank epilogue",
            2 * M * N * K + 2 * M * N * r,
            e * (M * K + N * K + M * N) + 4 * M * r + ea * N * r,
        ),
    ]
    bwd = [
        Pass(
            "dY pass (g, dB) + x pass (dA)",
            4 * M * N * r + 2 * M * K * r,
            reads * e * (M * N + M * K) + 4 * 2 * M * r + 4 * (N + K) * r,
        ),
        Pass(
            "dX GEMM + low-rank epilogue",
            2 * M * N * K + 2 * M * K * r,
            e * (M * N + N * K + M * K) + 4 * M * r + ea * r * K,
        ),
    ]
    return fwd, bwd


def _hybrid(M, K, N, r, e, ea, d):
    """Our shrink and grad passes; the low-rank term written as an [M, N] ([M, K]) tensor by a small
    kernel, then cuBLAS addmm reads it back as its C operand."""
    fused_fwd, fused_bwd = _fused(M, K, N, r, e, ea, d)
    fwd = [
        fused_fwd[0],
        Pass("C = xa·Bᵀ + bias", 2 * M * N * r, 4 * M * r + ea * N * r + e * M * N),
        Pass("y = addmm(C, x, Wᵀ)", 2 * M * N * K, e * (M * K + N * K + 2 * M * N)),
    ]
    bwd = [
        fused_bwd[0],
        Pass("T = mask⊙(g·A)", 2 * M * K * r, 4 * M * r + ea * r * K + e * M * K),
        Pass("dX = addmm(T, dY, W)", 2 * M * N * K, e * (M * N + N * K + 2 * M * K)),
    ]
    return fwd, bwd


def _peft(M, K, N, r, e, ea, d):
    """result = base(x) + lora_B(lora_A(dropout(x))) * scaling, and autograd's backward of it.

    PEFT runs the low-rank path in the adapters' dtype: with fp32 adapters under bf16 activations (its
    default, ``autocast_adapter_dtype``) it casts x to fp32 first, the term t is fp32, ``result + t``
    promotes to fp32 and is cast back (``result.to(torch_result_dtype)``); backward casts the other way.
    c = ea is the element size of that path; with c = e there are no casts."""
    c, cast = ea, ea != e
    fwd = [_gemm("x·Wᵀ", M, N, K, e)]
    if cast:
        fwd.append(Pass("x.to(adapter dtype)", M * K, (e + c) * M * K))
    if d:
        fwd.append(Pass("dropout (x_d, mask)", 0, c * M * K * 2 + M * K))
    fwd += [
        _gemm("x_d·Aᵀ", M, r, K, c),
        _gemm("xa·Bᵀ", M, N, r, c),
        Pass("·scaling", M * N, 2 * c * M * N),
        Pass("y + t", M * N, (e + 2 * c) * M * N),
    ]
    if cast:
        fwd.append(Pass("result.to(x dtype)", M * N, (c + e) * M * N))
    bwd = [Pass("dY.to(adapter dtype), its grad back to x's", 2 * M * N, 2 * (e + c) * M * N)] if cast else []
    bwd += [
        _gemm("dX = dY·W", M, K, N, e),
        Pass("dt = dY·scaling", M * N, 2 * c * M * N),
        _gemm("dB = dtᵀ·xa", N, r, M, c),
        _gemm("dxa = dt·B", M, r, N, c),
        _gemm("dA = dxaᵀ·x_d", r, K, M, c),
        _gemm("dx_d = dxa·A", M, K, r, c),
    ]
    if d:
        bwd.append(Pass("dropout backward", M * K, c * M * K * 2 + M * K))
    if cast:
        bwd.append(Pass("x.to() backward", M * K, (c + e) * M * K))
    bwd.append(Pass("dX += dx_d", M * K, 3 * e * M * K))
    return fwd, bwd


def _addmm(M, K, N, r, e, ea, d):
    """Unsloth's cuBLAS chain: y = x@Wᵀ; y.addmm_(x@Aᵀ, Bᵀ, alpha=s), and its matching backward."""
    fwd = [
        _gemm("x·Wᵀ", M, N, K, e),
        _gemm("xa = x·Aᵀ", M, r, K, e),
        Pass("y.addmm_(xa, Bᵀ)", 2 * M * N * r, e * (2 * M * N + M * r + N * r)),
    ]
    bwd = [
        _gemm("dX = dY·W", M, K, N, e),
        _gemm("g = dY·B", M, r, N, e),
        Pass("dX.addmm_(g, A)", 2 * M * K * r, e * (2 * M * K + M * r + r * K)),
        _gemm("dA = gᵀ·x", r, K, M, e),
        _gemm("dB = dYᵀ·xa", N, r, M, e),
    ]
    return fwd, bwd


_PASSES = {
    "fused": _fused,
    "fused-tma": _fused,
    "fused-ptr": _fused,
    "hybrid": _hybrid,
    "peft": _peft,
    "addmm": _addmm,
    "floor": _floor,
}


# ======================================================================================================
# QLoRA (issue 17). Appended block: 4-bit NF4 base weights (blocksize 64, double quantisation), dequantised
# to the activations' dtype before each GEMM, forward and backward (docs/design.md section 13). Opt-in
# providers (not in the default sweep): --providers qlora,peft-qlora,dequant.
# ======================================================================================================

QLORA_PROVIDERS = ("qlora", "peft-qlora", "dequant")


def dequant_bytes(N: int, K: int, e: int, blocksize: int = 64) -> float:
    """One dequantisation of a [N, K] NF4 weight with double-quantised scales, written in e-byte elements:
    nibbles T/2 + uint8 codes T/bs + fp32 per-256-block scales, read; T·e written."""
    T = N * K
    return T / 2 + T / blocksize + 4 * T / (blocksize * 256) + e * T


def _dequant(M, K, N, r, e, ea, d):
    deq = Pass("dequantise W (4-bit -> 16-bit)", 0, dequant_bytes(N, K, e))
    return [deq], [deq]  # once per direction, as a QLoRA layer runs it


def _with_dequant(passes):
    def model(M, K, N, r, e, ea, d):
        fwd, bwd = passes(M, K, N, r, e, ea, d)
        (deq,), _ = _dequant(M, K, N, r, e, ea, d)
        return [deq, *fwd], [deq, *bwd]

    return model


_PASSES |= {"qlora": _with_dequant(_fused), "peft-qlora": _with_dequant(_peft), "dequant": _dequant}


# ======================================================================================================
# A whole decoder layer (issue 16). Appended block: a Llama decoder layer (RMSNorm, q/k/v/o with grouped-
# query attention through SDPA, RMSNorm, SiLU-gated MLP, two residuals) with LoRA on all seven
# projections. Each projection costs what the provider's linear model above says; the rest of the layer
# is modelled the same for every provider, each operation at its fewest bytes (a fused implementation's
# traffic: eager PyTorch moves more), attention at the tensor-core peak with causal masking halving its
# FLOPs. Providers: fused_lora/bench/decoder.py.
# ======================================================================================================

DECODER_PROVIDERS = ("fused", "hybrid", "auto", "peft", "floor")
_DECODER_LINEAR = {"fused": "fused", "hybrid": "hybrid", "auto": "fused", "peft": "peft", "floor": "floor"}


@dataclass(frozen=True)
class DecoderDims:
    """hidden H, query heads h, key/value heads h_kv, head size d, MLP width I, batch B, sequence S."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    batch: int
    seq: int

    @property
    def M(self) -> int:
        return self.batch * self.seq

    def projections(self) -> list[tuple[str, int, int]]:
        """(name, in K, out N) of the seven adapted projections."""
        H, q, kv, I = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [("q", H, q), ("k", H, kv), ("v", H, kv), ("o", q, H), ("gate", H, I), ("up", H, I), ("down", I, H)]

    def attention_flops(self, mode: str) -> float:
        """Causal attention: S·S/2 scores per head; forward QKᵀ and PV (4·B·h·S²·d/2), backward 2.5× that
        (the scores recomputed, then dV, dP, dQ, dK)."""
        fwd = 2 * self.batch * self.heads * self.seq**2 * self.head_dim
        return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


def decoder_rest(d: DecoderDims, e: int) -> tuple[list[Pass], list[Pass]]:
    """The layer's passes outside the seven projections, the same for every provider."""
    M, H, I = d.M, d.hidden, d.intermediate
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    fwd = [
        Pass("RMSNorm (input)", 4 * M * H, 2 * e * M * H),
        Pass("rotary (q, k)", 3 * M * (q + kv), 2 * e * M * (q + kv)),
        Pass("attention (SDPA, causal)", d.attention_flops("fwd"), e * M * (2 * q + 2 * kv)),
        Pass("residual add", M * H, 3 * e * M * H),
        Pass("RMSNorm (post-attention)", 4 * M * H, 2 * e * M * H),
        Pass("SiLU(gate)·up", 5 * M * I, 3 * e * M * I),
        Pass("residual add", M * H, 3 * e * M * H),
    ]
    bwd = [
        Pass("SiLU(gate)·up backward", 10 * M * I, 5 * e * M * I),
        Pass("dX sum (gate, up share their input)", M * H, 3 * e * M * H),
        Pass("RMSNorm backward (post-attention)", 8 * M * H, 3 * e * M * H),
        Pass("residual: dX sum", M * H, 3 * e * M * H),
        Pass("attention backward", d.attention_flops("bwd"), e * M * (3 * q + 2 * kv) + e * M * (q + 2 * kv)),
        Pass("rotary backward", 3 * M * (q + kv), 2 * e * M * (q + kv)),
        Pass("dX sums (q, k, v share their input)", 2 * M * H, 6 * e * M * H),
        Pass("RMSNorm backward (input)", 8 * M * H, 3 * e * M * H),
        Pass("residual: dX sum", M * H, 3 * e * M * H),
    ]
    return fwd, bwd


def decoder_passes(provider: str, mode: str, d: DecoderDims, r: int, e: int = 2, ea: int = 2,
                   dropout: bool = False) -> list[Pass]:  # fmt: skip
    """The passes of one decoder layer under `provider`: each projection's passes (named "q: ...", ...),
    then the rest of the layer. `auto` is modelled as the fused GEMM (the roofline always prefers it)."""
    fwd, bwd = [], []
    for name, K, N in d.projections():
        f, b = _PASSES[_DECODER_LINEAR[provider]](d.M, K, N, r, e, ea, dropout)
        fwd += [Pass(f"{name}: {p.name}", p.flops, p.bytes) for p in f]
        bwd += [Pass(f"{name}: {p.name}", p.flops, p.bytes) for p in b]
    rest_fwd, rest_bwd = decoder_rest(d, e)
    return {"fwd": fwd + rest_fwd, "bwd": bwd + rest_bwd, "fwdbwd": fwd + rest_fwd + bwd + rest_bwd}[mode]


def decoder_flops(provider: str, mode: str, d: DecoderDims, r: int) -> float:
    """The math a decoder layer must do (TFLOP/s divide this): the projections' (base and low-rank, or
    base alone for the floor) and attention's; the elementwise work is not counted."""
    gemms = sum(
        floor_flops(mode, d.M, K, N) if provider == "floor" else useful_flops(mode, d.M, K, N, r)
        for _, K, N in d.projections()
    )
    return gemms + d.attention_flops(mode)


# ======================================================================================================
# DoRA (issue 18). Appended block: PEFT's DoRA (norm detached) on a linear layer. Opt-in providers:
# --providers fused-dora,peft-dora (fused_lora/bench/providers.py). docs/design.md section 14.
# ======================================================================================================

DORA_PROVIDERS = ("fused-dora", "peft-dora", "peft-dora-compile")


def _fused_dora(M, K, N, r, e, ea, d):
    """Ours (no bias: fused_lora/dora_function.py): LoRA's passes with m/n applied in the GEMM's epilogue
    (an [N] read, M·N products) and W·Aᵀ for the norm (one fp32-output product with A's two 16-bit halves
    stacked: W read once). Backward: LoRA's, its grad pass's dY loop also reading y (saved: the output
    itself) and writing dz = dY·m/n for the dX GEMM, with dm's column sums; then the zero-magnitude
    columns' kernel, which returns after reading the [N] scale when none is zero."""
    fwd, bwd = _fused(M, K, N, r, e, ea, d)
    gemm = fwd[-1]
    fwd = [*fwd[:-1], Pass(gemm.name + " ⊙ m/n", gemm.flops + M * N, gemm.bytes + 4 * N)]
    norm = Pass("norm: W·[A_hi; A_lo]ᵀ (W read once)", 2 * 2 * N * K * r, e * N * K + 4 * 2 * N * r)
    grad = bwd[0]
    grad = Pass(grad.name + ", y read, dz written (dm)", grad.flops + 2 * M * N, grad.bytes + 2 * e * M * N + 4 * N)
    return [*fwd, norm], [grad, Pass("m_j = 0 columns (none)", 0, 4 * N), *bwd[1:]]


def _peft_dora(M, K, N, r, e, ea, d):
    """PEFT's DoraLinearLayer: B·A through lora_B(lora_A(eye(in))) (an [in, in] identity, c = adapter
    dtype), W + s·B·A and its row norm ([out, in] passes), its LoRA path, then (m/n − 1)·base and
    (m/n)·s·lora and their sum in c's precision; with dropout a second base GEMM on x_d. Backward: the
    LoRA path's, the elementwise passes' and, with dropout, the second GEMM's dX."""
    c = ea
    fwd, bwd = _peft(M, K, N, r, e, ea, d)
    eye = [Pass("eye(in)", 0, c * K * K), _gemm("lora_A(eye)", K, r, K, c), _gemm("lora_B(·)", K, N, r, c)]
    norm = [Pass("W + s·B·A", N * K, (e + 2 * c) * N * K), Pass("row norm", 2 * N * K, c * N * K)]
    scale = [Pass("(m/n − 1)·base", M * N, (e + c) * M * N), Pass("(m/n)·s·lora", 2 * M * N, 2 * c * M * N),
             Pass("sum", M * N, 3 * c * M * N)]  # fmt: skip
    extra_fwd = [_gemm("x_d·Wᵀ (dropout)", M, N, K, e)] if d else []
    extra_bwd = [_gemm("dX += d(x_d)·W (dropout)", M, K, N, e)] if d else []
    back = [Pass("elementwise backward, dm", 4 * M * N, 6 * c * M * N)]
    return [*eye, *norm, *fwd, *extra_fwd, *scale], [*back, *bwd, *extra_bwd]


def _peft_dora_compiled(M, K, N, r, e, ea, d):
    """PEFT's DoraLinearLayer under torch.compile (inductor), a model of what it fuses: the GEMMs stay
    extern (cuBLAS), and each chain of elementwise ops and reductions between them is one pass reading
    its inputs once and writing what a later GEMM or the backward needs. Forward: x·Wᵀ; x cast (and
    dropped) once for the low-rank GEMMs; the eye-product B·A as PEFT builds it; W + s·B·A and its row norm
    in one pass; one pass forming the output from base and the low-rank term; with dropout the second
    base GEMM on the dropped x. Backward: one pass reading dY, base and the term and writing both their
    gradients (dm's sums with it), the GEMMs, one pass casting dx_d back and adding it to dX."""
    c = ea
    cast = Pass("x cast / dropped, mask (fused)", M * K, (e + c) * M * K + (M * K if d else 0))
    fwd = [_gemm("x·Wᵀ", M, N, K, e), cast, _gemm("x_d·Aᵀ", M, r, K, c), _gemm("xa·Bᵀ", M, N, r, c),
           Pass("eye(in)", 0, c * K * K), _gemm("lora_A(eye)", K, r, K, c), _gemm("lora_B(·)", K, N, r, c),
           Pass("‖W + s·B·A‖ (fused)", 3 * N * K, (e + c) * N * K),
           Pass("y = base·m/n + (m/n)·s·lora (fused)", 3 * M * N, (2 * e + c) * M * N)]  # fmt: skip
    if d:
        fwd.append(_gemm("x_d·Wᵀ (dropout)", M, N, K, e))
    bwd = [Pass("d(base), d(lora), dm (fused)", 5 * M * N, (3 * e + 2 * c) * M * N),
           _gemm("dX = d(base)·W", M, K, N, e), _gemm("dB = dtᵀ·xa", N, r, M, c), _gemm("dxa = dt·B", M, r, N, c), _gemm("dA = dxaᵀ·x_d", r, K, M, c),
           _gemm("dx_d = dxa·A", M, K, r, c),
           Pass("dX += dx_d (cast, mask; fused)", 2 * M * K, (2 * e + c) * M * K)]  # fmt: skip
    if d:
        bwd.append(_gemm("dX += d(x_d)·W (dropout)", M, K, N, e))
    return fwd, bwd


_PASSES |= {"fused-dora": _fused_dora, "peft-dora": _peft_dora, "peft-dora-compile": _peft_dora_compiled}
