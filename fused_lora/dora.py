"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) on the fused path, with the weight norm detached as
the paper's §4.3 and PEFT do:

    y = (m / n) ⊙ (x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + bias,      n_j = ‖W_j + s·(B·A)_j‖   (row j of W [out, in])

m [out] is the trainable magnitude. The low-rank term and the base GEMM are one :func:`lora_linear`
call (the fused kernels), and m/n scales its output per column. **n never forms B·A** (PEFT builds the
[out, in] product through ``lora_B(lora_A(eye(in)))`` on every forward):

    n_j² = ‖W_j‖² + 2s·(W·Aᵀ)_j · B_j + s²·B_j·(A·Aᵀ)·B_jᵀ

‖W_j‖² is cached per weight tensor and version (an in-place edit, a load or a merge bumps the version
and refreshes it; under torch.compile it is recomputed each call), W·Aᵀ is one [out, r] product (one
pass over W, r/M of the main GEMM's work), A·Aᵀ is r × r; the three terms are summed in float64.

**Precision, and cancellation.** W·Aᵀ is the only term with a rounding that matters: on a GPU with 16-bit
W it is one fp32-output product of W with A's 16-bit high and low parts stacked [2r, in] (W read once;
|δP_ji| ≤ ε·‖W_j‖·‖A_i‖, ε = 2⁻¹⁶ + in·2⁻²⁴); elsewhere float64 in row chunks (ε = in·2⁻⁵³). So
|δ(n_j²)| ≤ β_j = 2|s|·ε·‖W_j‖·Σ_i ‖A_i‖·|B_ji|. Where n_j² is small against β_j (the adapter cancels
most of W_j), the factored form loses digits: rows with β_j > 2⁻²⁰·n_j² are recomputed directly,
‖W_j + s·B_j·A‖ in float64 — the GUARD_ROWS rows with the largest β_j / n_j² per call, a fixed number
so that no value is read back to the host (CUDA-graph safe); more such rows than that in one layer is
not expected in training (n_j starts at ‖W_j‖ and ΔW stays small against W) and is not covered.

**Dropout.** PEFT's formula in training with dropout is
``x·Wᵀ + b + (m/n − 1)·(drop(x)·Wᵀ) + (m/n)·s·drop(x)·Aᵀ·Bᵀ``: the same as the one above at p = 0, in
eval mode and in expectation, but it runs a second base GEMM on the dropped-out input. The default
(``dora_formula`` "auto" = "fused") drops only the low-rank path's input, as LoRA does — one fused GEMM;
"peft" computes PEFT's formula (two base GEMMs, x dropped by torch's dropout) for users who need it:
``fused_lora.set_dora_formula("peft")``, ``with fused_lora.use_dora_formula("peft"): ...`` or
FUSED_LORA_DORA_FORMULA=peft.

**Gradients**: dz = dY ⊙ (m/n) runs the LoRA backward (dX, dA, dB on the kernels), and
dm_j = Σ_t dY_tj·z_tj / n_j. Without a bias (Llama's projections; :mod:`fused_lora.dora_function`) m/n is applied in the fused GEMM's
epilogue, the output y itself is saved instead of z (shared with any consumer that saves it too), dm comes
from Σ dY·y / c (recomputed from x where m_j = 0), and the grad pass writes dz as it streams dY, with B's
rows scaled by m/n so that dA and dB come from dY unrounded: no pass of its own either way. With a bias,
and under torch.compile, torch.func, forward-mode AD, autocast or a 4-bit weight, LoRA's operator and the
column scale are composed instead: z ([M, out], x's dtype) saved, the scale its own pair of memory-bound
kernels (fused_lora/kernels/column_scale.py: fp32 arithmetic, 16-bit tensors, one pass each way; torch's
ops with an fp32 magnitude would make fp32 [M, out] temporaries), and dz reaches the LoRA kernels rounded
to x's dtype — where PEFT's promotion keeps its DoRA term's gradient in fp32, dA and dB are then as
precise as x's dtype allows, not fp32's. (Recovering z from y with a bias would lose digits wherever the
bias dominates a column, so z is kept there.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend
from .dora_function import DoraLinearFunction, fused_path_ok
from .function import lora_linear
from .impl import get_impl
from .setting import Setting
from .validation import KERNEL_DTYPES, check_dropout, check_lora_inputs, check_scaling

DORA_FORMULA = Setting("dora_formula", ("auto", "fused", "peft"), env_var="FUSED_LORA_DORA_FORMULA")
GUARD_ROWS = 16  # rows per call whose norm may be recomputed directly (see the module docstring)
GUARD_RATIO = 2.0**-20  # recompute a row when its error bound exceeds this fraction of n_j²
CHUNK_ELEMENTS = 1 << 22  # float64 work in row chunks of this many elements (32 MB)

_W_SQ: torch.utils.weak.WeakTensorKeyDictionary = torch.utils.weak.WeakTensorKeyDictionary()


def set_dora_formula(formula: str | None) -> None:
    """'auto' (= 'fused') | 'fused' | 'peft' for the whole process (None: the environment's, else auto)."""
    DORA_FORMULA.set(formula)


def use_dora_formula(formula: str):
    """The DoRA dropout formula for this thread / task only: ``with use_dora_formula("peft"): ...``."""
    return DORA_FORMULA.use(formula)


def get_dora_formula() -> str:
    """'fused' or 'peft' (auto is fused); under torch.compile read once, when a graph is traced."""
    formula = DORA_FORMULA.get()
    return "fused" if formula == "auto" else formula


get_dora_formula._dynamo_marked_constant = True  # type: ignore[attr-defined]  # as backend.resolve_backend


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _sq_norms(weight: torch.Tensor) -> torch.Tensor:
    out = torch.empty(weight.shape[0], dtype=torch.float64, device=weight.device)
    for r0, r1 in _row_chunks(*weight.shape):
        out[r0:r1] = weight[r0:r1].double().square().sum(1)
    return out


@torch.no_grad()
def weight_sq_norms(weight: torch.Tensor, cache: bool = True) -> torch.Tensor:
    """‖W_j‖² per row of W [out, in], float64, cached for this tensor until its version changes (an
    in-place edit, a state_dict load, a merge). Under torch.compile, or with `cache` False (a weight whose
    version does not follow its values: FSDP2's unsharded copies, fused_lora.distributed.fsdp_managed):
    computed, not cached."""
    if torch.compiler.is_compiling() or not cache:
        return _sq_norms(weight)
    owner = weight._base if weight._base is not None else weight  # a transposed view: its base's entry
    key = (weight._version, tuple(weight.shape), weight.stride(), weight.storage_offset(), weight.dtype)
    hit = _W_SQ.get(owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = _sq_norms(weight)
    _W_SQ[owner] = (key, value)
    return value


def _w_times_at(weight: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(P = W·Aᵀ [out, r] in float64, its relative error ε: |δP_ji| ≤ ε·‖W_j‖·‖A_i‖)."""
    K = weight.shape[1]
    if weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
        a = lora_A.detach().float()
        hi = a.to(weight.dtype)
        lo = (a - hi.float()).to(weight.dtype)
        r = a.shape[0]
        both = torch.mm(weight, torch.cat([hi, lo]).t(), out_dtype=torch.float32)  # one pass over W: [out, 2r]
        return both[:, :r].double() + both[:, r:].double(), 2.0**-16 + K * 2.0**-24
    a = lora_A.detach().double()
    out = torch.empty(weight.shape[0], a.shape[0], dtype=torch.float64, device=weight.device)
    for r0, r1 in _row_chunks(*weight.shape):
        out[r0:r1] = weight[r0:r1].double() @ a.t()
    return out, K * 2.0**-53


@torch.no_grad()
def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              cache: bool = True) -> torch.Tensor:  # fmt: skip
    """n_j = ‖W_j + s·(B·A)_j‖ for W [out, in], A [r, in], B [out, r]: fp32 [out], detached, without
    forming B·A (the factored form of the module docstring, with its cancellation guard). `cache`: may
    ‖W_j‖² come from the per-version cache (:func:`weight_sq_norms`)."""
    w = weight.detach()
    a, b = lora_A.detach().double(), lora_B.detach().double()
    s = float(scaling)
    w_sq = weight_sq_norms(weight, cache)
    p, eps = _w_times_at(w, lora_A)
    n_sq = w_sq + 2 * s * (p * b).sum(1) + s * s * ((b @ (a @ a.t())) * b).sum(1)
    bound = 2 * abs(s) * eps * w_sq.sqrt() * (b.abs() @ a.norm(dim=1))
    n_sq = n_sq.clamp_min(0.0)
    k = min(GUARD_ROWS, w.shape[0])
    if k > 0:
        ratio = bound / n_sq.clamp_min(torch.finfo(torch.float64).tiny)
        worst, rows = ratio.topk(k)
        direct = (w[rows].double() + s * (b[rows] @ a)).square().sum(1)
        n_sq[rows] = torch.where(worst > GUARD_RATIO, direct, n_sq[rows])
    return n_sq.sqrt().float()


def _check_magnitude(magnitude, weight) -> None:
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if not magnitude.is_floating_point():
        raise TypeError(f"magnitude must be a floating-point tensor, got {magnitude.dtype}")
    if isinstance(weight, torch.Tensor) and tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(
            f"magnitude {list(magnitude.shape)} must be [out_features] = [{weight.shape[0]}] to match weight "
            f"{list(weight.shape)}"
        )
    if isinstance(weight, torch.Tensor) and magnitude.device != weight.device:
        raise ValueError(f"magnitude is on {magnitude.device} but weight on {weight.device}")


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    formula: str | None = None,
    norm: torch.Tensor | None = None,
    cache_norm: bool = True,
) -> torch.Tensor:
    """y = (m/n) ⊙ (x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + bias — DoRA, PEFT's semantics, on the fused kernels.

    x [..., in], weight [out, in] in x's dtype, lora_A [r, in] / lora_B [out, r] in x's dtype or fp32,
    magnitude [out] (fp32 or x's dtype; trainable), bias [out] or None. n = :func:`dora_norm` (detached),
    or `norm` [out] when the caller has it (`cache_norm` False: ‖W‖² not taken from the per-version cache,
    as for FSDP2's unsharded copies). `formula` ('fused' | 'peft', default the ``dora_formula``
    setting) decides what dropout in training means (module docstring); p = 0 and eval agree either way.
    """
    _check_magnitude(magnitude, weight)
    s = check_scaling(scaling)
    p = check_dropout(dropout_p) if training else 0.0
    chosen = get_dora_formula() if formula is None else DORA_FORMULA.check(formula, "formula")
    if norm is None:
        norm = dora_norm(weight, lora_A, lora_B, s, cache_norm)
    scale = magnitude / norm.to(magnitude.dtype).detach()  # [out], differentiable in m
    if chosen == "peft" and p > 0.0:
        # PEFT's: x·Wᵀ + b + (m/n − 1)·(drop(x)·Wᵀ) + (m/n)·s·drop(x)·Aᵀ·Bᵀ, torch's dropout on x
        xd = F.dropout(x, p, training=True)
        base = F.linear(x, weight, bias)
        dt = torch.promote_types(x.dtype, lora_A.dtype)
        low = F.linear(F.linear(xd.to(dt), lora_A.to(dt)), lora_B.to(dt)) * s
        dropped = F.linear(xd, weight)
        out = base.to(dt) + (scale - 1).to(dt) * dropped.to(dt) + scale.to(dt) * low
        return out.to(x.dtype)
    tensors = all(isinstance(t, torch.Tensor) for t in (x, weight, lora_A))
    if tensors and fused_path_ok(x, weight, lora_A, bias, scale):  # c in the GEMM's epilogue, y saved (dora_function)
        check_lora_inputs(x, weight, lora_A, lora_B, None)
        deterministic = torch.are_deterministic_algorithms_enabled()
        return DoraLinearFunction.apply(x, weight, lora_A, lora_B, scale, s, p, deterministic, get_impl())
    z = lora_linear(x, weight, lora_A, lora_B, s, None, p, training=True)
    return scale_columns(z, scale, bias)


class _ColumnScale(torch.autograd.Function):
    """y = z ⊙ c + bias through fused_lora/kernels/column_scale.py (fp32 arithmetic, z's dtype in memory)."""

    @staticmethod
    def forward(ctx, z, c, bias):
        from .kernels import column_scale

        z2 = z.reshape(-1, z.shape[-1])
        ctx.save_for_backward(z2, c)
        ctx.shape, ctx.has_bias = z.shape, bias is not None
        # not a view (FSDP2 hangs its pre-backward hook on a unit's output; an in-place op on a view drops
        # it): aten._unsafe_view, as lora_linear's output
        return torch.ops.aten._unsafe_view(column_scale.scale_fwd(z2, c, bias), z.shape)

    @staticmethod
    def backward(ctx, dy):
        from .kernels import column_scale

        z2, c = ctx.saved_tensors
        dz, dc, db = column_scale.scale_bwd(dy.reshape(-1, dy.shape[-1]).contiguous(), z2, c)
        return torch.ops.aten._unsafe_view(dz, ctx.shape), dc.to(c.dtype), (db if ctx.has_bias else None)


def _kernel_scale_ok(z: torch.Tensor, *vectors) -> bool:
    if torch.compiler.is_compiling() or z.dim() < 1 or z.stride(-1) != 1 or z.dtype not in KERNEL_DTYPES:
        return False
    backend = "triton" if z.device.type == "meta" else resolve_backend(z.device)
    if backend != "triton" or (z.dtype == torch.bfloat16 and z.device.type == "cpu"):
        return False
    return all(v is None or (v.dtype in KERNEL_DTYPES and v.device == z.device) for v in vectors)


def scale_columns(z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """z [..., out] ⊙ scale [out] (+ bias), in fp32 arithmetic when the scale is fp32 (y and dm from an fp32
    product, rounded once to z's dtype, as PEFT's promotion does), differentiable in z, scale and bias.
    On the kernels' backend: two memory-bound passes (fused_lora/kernels/column_scale.py: 4 bytes per element of y
    forward, 6 backward, for 16-bit z); elsewhere, and under torch.compile (which fuses it), torch's ops."""
    if _kernel_scale_ok(z, scale, bias):
        c = scale if scale.dtype == torch.float32 or scale.dtype == z.dtype else scale.float()
        return _ColumnScale.apply(z, c, bias)
    dt = torch.promote_types(z.dtype, scale.dtype)
    c = scale.to(dt)
    y = z * c if bias is None else torch.addcmul(bias.to(dt), z, c)
    return y.to(z.dtype)


__all__ = [
    "dora_linear", "dora_norm", "get_dora_formula", "scale_columns", "set_dora_formula", "use_dora_formula",
    "weight_sq_norms",
]  # fmt: skip
