"""Argument checks shared by ``lora_linear`` and the modules: a clear ValueError / TypeError that names
the argument and the shapes, before anything reaches a kernel."""

from __future__ import annotations

import itertools
import math
import numbers
import sys

import torch
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; pass a dense (strided) tensor, e.g. padded or one per call")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; use one of {FLOAT_DTYPES}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")


def _brief(v) -> str:
    """repr(v), shortened: a huge int's repr is hundreds of digits (or refused beyond 4300)."""
    try:
        text = repr(v)
    except ValueError:
        return f"an int of {v.bit_length()} bits"
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def check_dropout(dropout_p, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {_brief(dropout_p)}")
    try:
        p = float(dropout_p)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{name} must be in [0, 1), got {_brief(dropout_p)}") from None
    if not 0.0 <= p < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p!r}")
    return p


def _integer_value(v):
    """A one-element integer torch tensor's value (loralib's arithmetic takes such a tensor as an int);
    anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type != "meta" and v.dtype in _INT_DTYPES:
        return int(v.item())
    return v


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_rank(r) -> int:
    """r: an int >= 0 (numpy integers and one-element integer tensors too, as loralib takes them)."""
    r = _integer_value(r)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise TypeError(f"r must be an int, got {_brief(r)}")
    if r < 0:
        raise ValueError(f"r must be >= 0 (0 means no adapter), got {r}")
    return int(r)


FP32_MAX = float(torch.finfo(torch.float32).max)


def check_alpha(lora_alpha, r: int = 0, use_rslora: bool = False, name: str = "lora_alpha") -> int | float:
    """lora_alpha: a finite real number (an int stays an int; numpy scalars and one-element tensors are
    read as numbers, as loralib's arithmetic takes them), whose scaling lora_alpha / r (/ √r with rsLoRA)
    is within float32's range when r > 0. loralib fails at construction on a string or None (computing
    the scaling); here every bad value fails at construction, r = 0 too."""
    v = lora_alpha
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool and not v.is_complex():
        if v.requires_grad or v.device.type == "meta":
            raise TypeError(f"{name} must be a number: a tensor that requires grad (or a meta tensor) is not one")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {_brief(lora_alpha)}")
    v = int(v) if isinstance(v, numbers.Integral) else float(v)
    try:
        finite = math.isfinite(v)
    except OverflowError:  # an int beyond float's range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be finite and within float32's range, got {_brief(lora_alpha)}")
    if r > 0 and abs(v / (math.sqrt(r) if use_rslora else r)) > FP32_MAX:
        raise ValueError(
            f"{name} = {_brief(lora_alpha)} with r = {r} gives a scaling beyond float32's range "
            f"(|scaling| <= {FP32_MAX:.4g})"
        )
    return v


def is_bool(v) -> bool:
    """A bool, a 0/1 int, numpy's bool / 0/1 integers, or a one-element torch bool tensor (loralib takes
    them all where it wants a flag)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and v.dtype == torch.bool and v.device.type != "meta"
    np = sys.modules.get("numpy")  # a numpy value exists only once numpy is imported
    return (isinstance(v, numbers.Integral) and v in (0, 1)) or (np is not None and isinstance(v, np.bool_))


def check_flag(value, name: str) -> bool:
    """A yes/no argument (see :func:`is_bool`); a TypeError otherwise — a string such as "False" would
    read as true."""
    if not is_bool(value):
        raise TypeError(f"{name} must be a bool, got {_brief(value)}")
    return bool(value)


def check_lora_dtype(lora_dtype) -> torch.dtype | None:
    """None, or a floating-point torch.dtype for the adapters."""
    if lora_dtype is not None and (not isinstance(lora_dtype, torch.dtype) or not lora_dtype.is_floating_point):
        raise TypeError(f"lora_dtype must be None or a floating-point torch.dtype, got {_brief(lora_dtype)}")
    return lora_dtype


def check_scaling(scaling) -> float:
    """A Python float for the kernels. A one-element tensor is read once (a host sync on a GPU); one that
    requires grad is refused: the kernels treat the scale as a constant (a learnable scale runs on the
    reference backend, where autograd sees it)."""
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1:
            raise TypeError(f"scaling must be a real number or a one-element tensor, got shape {list(scaling.shape)}")
        if scaling.requires_grad:
            raise TypeError(
                "scaling requires grad, but the fused kernels treat it as a constant: pass a float, "
                "scaling.detach(), or use the 'reference' backend for a learnable scale"
            )
        if scaling.device.type == "meta":
            raise TypeError("scaling is a meta tensor and has no value: pass a Python float")
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    try:
        finite = math.isfinite(scaling)
    except OverflowError:  # an int beyond float's range
        raise ValueError(
            f"scaling must be within float32's range (|scaling| <= {FP32_MAX:.4g}), got {_brief(scaling)}"
        ) from None
    if not finite:
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if abs(scaling) > FP32_MAX:
        raise ValueError(f"scaling must be within float32's range (|scaling| <= {FP32_MAX:.4g}), got {scaling!r}")
    return float(scaling)


def check_learnable_scaling(scaling: torch.Tensor) -> torch.Tensor:
    """A learnable scale (requires grad, reference backend) under check_scaling's rules — one element, real,
    finite, within float32's range — kept a tensor so autograd sees it, as a 0-d tensor so broadcasting
    cannot change y's shape. Its value is read (a host sync on a GPU) once per tensor and version — again
    after an optimizer step changes it, not on every call — and never under torch.compile or a capture."""
    if scaling.numel() != 1:
        raise TypeError(f"scaling must be a real number or a one-element tensor, got shape {list(scaling.shape)}")
    if not scaling.is_floating_point():
        raise TypeError(f"a learnable scaling must be a floating-point tensor, got dtype {scaling.dtype}")
    if scaling.device.type != "meta" and not torch.compiler.is_compiling() and not _checked(scaling, None):
        if scaling.is_cuda and torch.cuda.is_current_stream_capturing():
            return scaling.reshape(())
        value = scaling.detach().item()
        if not math.isfinite(value):
            raise TypeError(f"scaling must be a finite real number, got {value!r}")
        if abs(value) > FP32_MAX:
            raise ValueError(f"scaling must be within float32's range (|scaling| <= {FP32_MAX:.4g}), got {value!r}")
        _checked(scaling, None, record=True)
    return scaling.reshape(())


def check_lora_inputs(x, weight, lora_A, lora_B, bias=None) -> None:
    """Shapes, dtypes and devices of one LoRA linear call:
    x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N] or None."""
    _tensor("x", x)
    _tensor("weight", weight, 2)
    _tensor("lora_A", lora_A, 2)
    _tensor("lora_B", lora_B, 2)
    if bias is not None:
        _tensor("bias", bias, 1)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (its last is in_features)")

    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.shape[1] != K:
        raise ValueError(
            f"x's last dimension is {K}, but weight {_shape(weight)} expects in_features = "
            f"{weight.shape[1]} (x has shape {_shape(x)})"
        )
    if lora_A.shape[1] != K:
        raise ValueError(f"lora_A {_shape(lora_A)} must be [r, in_features] = [r, {K}]")
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(
            f"lora_B {_shape(lora_B)} must be [out_features, r] = [{N}, {r}] to match "
            f"weight {_shape(weight)} and lora_A {_shape(lora_A)}"
        )
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"bias {_shape(bias)} must be [out_features] = [{N}]")

    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")

    if weight.dtype != x.dtype:
        raise TypeError(
            f"weight is {weight.dtype} but x is {x.dtype}: cast one to the other, or run "
            f"under torch.autocast, as nn.Linear requires"
        )
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    if lora_A.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"lora_A/lora_B are {lora_A.dtype}; with x in {x.dtype} they must be {_allowed(x.dtype)}")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"bias is {bias.dtype}; with x in {x.dtype} it must be {_allowed(x.dtype)}")


# Tensors whose values were read and found valid: {tensor: (its version counter, what it was checked
# for)} — groups' bounds (for r) and learnable scales. MergedLinear passes the same bounds buffer and a
# learnable scale is the same parameter on every call, so a GPU syncs once to check it, not per call.
_CHECKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_groups(groups, N: int, r: int, device: torch.device) -> tuple[int, torch.Tensor] | None:
    """`groups` = (group_n, bounds) of ``lora_linear`` (MergedLinear's block-structured B): group_n > 0 divides
    N = out_features, bounds is an int32/int64 tensor [N / group_n + 1] on x's device whose values rise
    from >= 0 to <= r (read once per bounds tensor; not under torch.compile, nor on the meta device).
    Returns (group_n, bounds as int32) — what the kernels read — or None."""
    if groups is None:
        return None
    if not isinstance(groups, (tuple, list)) or len(groups) != 2:
        raise TypeError(f"groups must be a (group_n, bounds) pair or None, got {type(groups).__name__}")
    group_n, bounds = groups
    if isinstance(group_n, bool) or not isinstance(group_n, numbers.Integral):
        raise TypeError(f"groups' group_n must be an int, got {group_n!r}")
    if group_n <= 0:
        raise ValueError(f"groups' group_n (output columns per group) must be > 0, got {group_n}")
    if N % group_n:
        raise ValueError(f"groups' group_n = {group_n} must divide out_features = {N}")
    n_groups = N // group_n
    if not isinstance(bounds, torch.Tensor):
        raise TypeError(f"groups' bounds must be an int32 or int64 torch.Tensor, got {type(bounds).__name__}")
    if bounds.dtype not in (torch.int32, torch.int64) or bounds.layout != torch.strided or bounds.is_nested:
        raise TypeError(f"groups' bounds must be a dense int32 or int64 tensor, got {bounds.dtype} ({bounds.layout})")
    if tuple(bounds.shape) != (n_groups + 1,):
        raise ValueError(
            f"groups' bounds {_shape(bounds)} must be [out_features / group_n + 1] = [{N} / {group_n} + 1] = "
            f"[{n_groups + 1}]"
        )
    if bounds.device != device:
        raise ValueError(f"groups' bounds must be on x's device {device}, got {bounds.device}")
    if device.type != "meta" and not torch.compiler.is_compiling():
        _check_bound_values(bounds, r)
    return int(group_n), bounds.to(torch.int32)


def _checked(t: torch.Tensor, tag, record: bool = False) -> bool:
    """Whether `t`'s values were checked (for `tag`) at its current version; `record` marks them so. An
    inference tensor has no version counter: it counts as one version."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        version = "inference"
    if record:
        _CHECKED[t] = (version, tag)
    return _CHECKED.get(t) == (version, tag)


def _check_bound_values(bounds: torch.Tensor, r: int) -> None:
    """Read the bounds (a host sync on a GPU) once per tensor and version. An inference tensor has no
    version counter: it is read once too (checking it every call was a sync per forward for a MergedLinear
    built under inference_mode). Never read while a CUDA graph is being captured (it would raise)."""
    if _checked(bounds, r) or (bounds.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    values = bounds.tolist()
    if values[0] < 0 or values[-1] > r or any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError(f"groups' bounds {values} must be non-decreasing rank-column offsets within [0, r] = [0, {r}]")
    _checked(bounds, r, record=True)


def _allowed(x_dtype: torch.dtype) -> str:
    return str(x_dtype) if x_dtype == torch.float32 else f"{x_dtype} or torch.float32"


def check_kernel_dtypes(x: torch.Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the triton backend supports {KERNEL_DTYPES}, got x in {x.dtype}; use the 'reference' backend for float64"
        )


# nn.Embedding's keyword arguments (fused_lora.Embedding passes them on)
NN_EMBEDDING_KWARGS = (
    "padding_idx",
    "max_norm",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
    "_weight",
    "_freeze",
    "device",
    "dtype",
)


def check_embedding_kwargs(num_embeddings: int, embedding_dim: int, kwargs: dict) -> None:
    """fused_lora.Embedding's nn.Embedding keywords: what nn.Embedding would reject with a bare error (an
    unknown keyword, an assert on padding_idx or `_weight`'s shape) as a TypeError / ValueError that
    names the argument."""
    unknown = [k for k in kwargs if k not in NN_EMBEDDING_KWARGS]
    if unknown:
        why = {
            "lora_dropout": "embeddings apply no dropout (loralib's and PEFT's neither)",
            "fan_in_fan_out": "the table is always [num_embeddings, embedding_dim]",
        }
        notes = "; ".join(f"{k}: {why[k]}" for k in unknown if k in why)
        raise TypeError(
            f"Embedding got unexpected keyword argument(s) {unknown}"
            + (f" ({notes})" if notes else "")
            + "; it takes r, lora_alpha, merge_weights, use_rslora, lora_dtype and nn.Embedding's "
            + str(list(NN_EMBEDDING_KWARGS))
        )
    pad = kwargs.get("padding_idx")
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, numbers.Integral):
            raise TypeError(f"padding_idx must be an int or None, got {pad!r}")
        if not -num_embeddings <= pad < num_embeddings:
            raise ValueError(
                f"padding_idx {pad} is outside [-{num_embeddings}, {num_embeddings}) (num_embeddings = "
                f"{num_embeddings}; a negative index counts from the end)"
            )
    weight = kwargs.get("_weight")
    if weight is not None and (
        not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_embeddings, embedding_dim)
    ):
        got = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"_weight must be a [num_embeddings, embedding_dim] = [{num_embeddings}, {embedding_dim}] tensor, got {got}"
        )


def check_table_dtype(table: torch.dtype, lora_dtype: torch.dtype | None) -> None:
    """The lookup takes adapters in the table's dtype or fp32 (fused_lora.embedding._check_tables): say so
    at construction rather than at the first forward."""
    if lora_dtype is not None and lora_dtype not in (table, torch.float32):
        allowed = str(table) if table == torch.float32 else f"{table} or torch.float32"
        raise TypeError(f"lora_dtype is {lora_dtype}; with a {table} table the adapters must be {allowed}")
