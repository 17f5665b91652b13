"""``Embedding``: a drop-in for loralib's ``lora.Embedding`` whose lookup and low-rank term run in one
Triton kernel, and the functional form :func:`lora_embedding`.

    idx any shape (int64/int32), W [V, D], A [r, V], B [D, r], s = lora_alpha / r
    y = W[idx] + s·A[:, idx]ᵀ·Bᵀ                       forward: one kernel, y written once
    dB = s·Σ_t dY[t]ᵀ·A[:, idx_t]ᵀ,  dA[:, v] = s·Σ_{idx_t = v} dY[t]·B   backward: one kernel
                                                       (+ one in deterministic mode)

loralib's constructor, defaults (r=0, lora_alpha=1), initialisation (A zeros, B normal), parameter
names and shapes, so state_dicts load strictly both ways; ``eval()`` merges W += s·(B·A)ᵀ when
``merge_weights``, ``train()`` unmerges, exactly (``fused_lora.merging``).

nn.Embedding's options, as loralib passes them to both lookups: ``padding_idx`` (its column of A gets
no gradient; its row of W is zeroed at initialisation), ``max_norm`` / ``norm_type`` (the looked-up rows
of W *and* columns of A are renormalised in place before the lookup, as ``F.embedding`` does to its
table), ``scale_grad_by_freq`` (dA's columns divided by how often each index occurs in the batch).
``sparse=True`` is refused when r > 0: loralib's own Embedding fails in backward with it (a sparse
gradient cannot be transposed onto A), and A's gradient here is dense.

Indices must be int64 or int32 (a TypeError otherwise); an index outside [0, num_embeddings) raises
:class:`IndexOutOfRangeError` (a ValueError and an IndexError) before anything is launched. The check
reads the indices' min and max (one device sync on a GPU); it is skipped under CUDA graph capture, where
the kernel gives rows of zeros for such indices instead of reading out of bounds.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference_layers, sharing
from .backend import bf16_dot_wrong, resolve_backend
from .distributed import full, is_dtensor, local_block
from .embedding_ops import LoRAEmbeddingFunction
from .merging import ExactMerge, MergeRecord, MergeTarget, delta_product
from .opdef import plain
from .validation import (
    check_alpha,
    check_embedding_kwargs,
    check_flag,
    check_lora_dtype,
    check_rank,
    check_scaling,
    check_table_dtype,
)

INDEX_DTYPES = (torch.int64, torch.int32)
TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EMBEDDING_OPTIONS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


class IndexOutOfRangeError(ValueError, IndexError):
    """An embedding index outside [0, num_embeddings)."""


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_indices(idx, num_embeddings: int, name: str = "input") -> None:
    """TypeError unless `idx` is an int64/int32 tensor; IndexOutOfRangeError for an index outside
    [0, num_embeddings) (one min/max read; skipped on the meta device, under CUDA graph capture and inside
    torch.compile, where the kernel gives rows of zeros for such an index instead of reading out of bounds)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of indices, got {type(idx).__name__}")
    if idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold int64 or int32 indices (as nn.Embedding requires), got {idx.dtype}")
    if idx.numel() == 0 or idx.device.type == "meta" or torch.compiler.is_compiling():
        return  # no values to read (meta), or reading them would break the compiled graph
    if idx.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    idx = plain(idx)  # under torch.func.vmap: every index of the batch
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one read back (a GPU waits once), not two
    if lo < 0 or hi >= num_embeddings:
        bad = ((idx < 0) | (idx >= num_embeddings)).nonzero()[0].tolist()
        value = int(idx[tuple(bad)])
        raise IndexOutOfRangeError(
            f"{name} {_shape(idx)} holds index {value} at position {tuple(bad)}, outside [0, {num_embeddings}) "
            f"(num_embeddings = {num_embeddings}; min {lo}, max {hi})"
        )


def normalize_padding_idx(padding_idx, num_embeddings: int) -> int | None:
    """nn.Embedding's rule: None, or an int in [-V, V) (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {padding_idx!r}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx {padding_idx} must be within num_embeddings = {num_embeddings}")
    return padding_idx % num_embeddings


def _check_tables(weight, lora_A, lora_B) -> None:
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {_shape(t)}")
    (V, D), r = weight.shape, lora_A.shape[0]
    if lora_A.shape[1] != V:
        raise ValueError(f"lora_A {_shape(lora_A)} must be [r, num_embeddings] = [r, {V}] for weight {_shape(weight)}")
    if tuple(lora_B.shape) != (D, r):
        raise ValueError(f"lora_B {_shape(lora_B)} must be [embedding_dim, r] = [{D}, {r}]")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A ({lora_A.dtype}) and lora_B ({lora_B.dtype}) must share a dtype")
    if lora_A.dtype not in (weight.dtype, torch.float32):
        raise TypeError(f"lora_A/lora_B are {lora_A.dtype}; with weight in {weight.dtype} they must be that or float32")
    if len({weight.device, lora_A.device, lora_B.device}) > 1:
        raise ValueError(f"weight ({weight.device}), lora_A ({lora_A.device}) and lora_B ({lora_B.device}) differ")


def lora_embedding(
    input: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """y = W[input] + scaling·A[:, input]ᵀ·Bᵀ with ``F.embedding``'s options (see the module docstring).

    input: int64/int32 indices of any shape; weight [V, D] fp16/bf16/fp32 (float64: reference backend);
    lora_A [r, V] and lora_B [D, r] in weight's dtype or fp32. Returns input.shape + (D,) in weight's dtype.
    """
    _check_tables(weight, lora_A, lora_B)
    V, r = weight.shape[0], lora_A.shape[0]
    padding_idx = normalize_padding_idx(padding_idx, V)
    scaling = check_scaling(scaling)
    if sparse and r > 0:
        raise ValueError(
            "sparse=True is not supported with LoRA (r > 0): lora_A's gradient is dense (loralib's Embedding "
            "fails in backward with sparse=True)"
        )
    check_indices(input, V)
    if max_norm is not None:  # what F.embedding does to its table, applied to both tables as loralib does
        with torch.no_grad():
            idx = input.contiguous()
            torch.embedding_renorm_(weight, idx, max_norm, norm_type)
            if r > 0:
                torch.embedding_renorm_(lora_A.t(), idx, max_norm, norm_type)
    if r == 0:
        return F.embedding(input, weight, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    device = weight.device
    bf16_interpreted = device.type == "cpu" and bf16_dot_wrong() and torch.bfloat16 in (weight.dtype, lora_A.dtype)
    if bf16_interpreted and resolve_backend(device) == "triton":  # as lora_linear: never a wrong answer
        warnings.warn(
            "bf16 under TRITON_INTERPRET=1: Triton's interpreter computes bf16 matrix products wrongly, "
            "so this call runs the reference implementation instead of the kernels",
            RuntimeWarning,
            stacklevel=2,
        )
    if device.type == "meta" or bf16_interpreted or resolve_backend(device) == "reference":
        return reference_layers.lora_embedding(
            input, weight, lora_A, lora_B, scaling, padding_idx, None, norm_type, scale_grad_by_freq
        )
    if weight.dtype not in TABLE_DTYPES:
        raise TypeError(f"the triton backend supports {TABLE_DTYPES}, got weight in {weight.dtype}; use 'reference'")
    if input.device != device:
        raise ValueError(f"input is on {input.device} but weight is on {device}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    return LoRAEmbeddingFunction.apply(
        input, weight, lora_A, lora_B, scaling, padding_idx, bool(scale_grad_by_freq), deterministic
    )


class Embedding(ExactMerge, nn.Embedding):
    """loralib's ``lora.Embedding``: y = W[idx] + s·A[:, idx]ᵀ·Bᵀ, s = lora_alpha / r (/ √r with use_rslora).

    ``**kwargs`` are nn.Embedding's (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
    _weight, _freeze, device, dtype). Beyond loralib: ``lora_dtype`` (e.g. fp32 adapters on a bf16
    table) and ``use_rslora``. A given ``_weight`` is kept (loralib re-initialises it)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        r, use_rslora = check_rank(r), check_flag(use_rslora, "use_rslora")
        lora_alpha, merge_weights = check_alpha(lora_alpha, r, use_rslora), check_flag(merge_weights, "merge_weights")
        lora_dtype = check_lora_dtype(lora_dtype)
        check_embedding_kwargs(num_embeddings, embedding_dim, kwargs)
        if r > 0 and kwargs.get("sparse", False):
            raise ValueError(
                "sparse=True is not supported with r > 0: lora_A's gradient is dense (loralib's Embedding "
                "fails in backward with sparse=True); use sparse=False, or r=0 for a plain nn.Embedding"
            )
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        check_table_dtype(self.weight.dtype, lora_dtype)
        sharing.adopt(self, "weight")  # see fused_lora.sharing
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.merge_weights, self.merged = merge_weights, False
        self._merge_record: MergeRecord | None = None
        if r > 0:
            factory = {"device": self.weight.device, "dtype": lora_dtype or self.weight.dtype}
            self.lora_A = nn.Parameter(torch.empty(r, num_embeddings, **factory))
            self.lora_B = nn.Parameter(torch.empty(embedding_dim, r, **factory))
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        """nn.Embedding's initialisation of W (padding row zeroed), then the adapters' (as loralib)."""
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.r > 0:
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    @property
    def scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        r: int = 8,
        lora_alpha: float = 8,
        merge_weights: bool = True,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> Embedding:
        """Wrap an existing ``nn.Embedding``: its weight Parameter and options are shared, not copied.
        Defaults are PEFT's ``LoraConfig`` ones (r = 8, lora_alpha = 8), as for ``LoRALinear.from_linear``.
        Adapters default to fp32 on a 16-bit table (PEFT's default), else the table's dtype."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"from_embedding wraps an nn.Embedding, got {type(embedding).__name__}")
        if isinstance(embedding, Embedding):
            raise TypeError("this layer is already a fused_lora.Embedding")
        r, use_rslora = check_rank(r), check_flag(use_rslora, "use_rslora")
        lora_alpha, merge_weights = check_alpha(lora_alpha, r, use_rslora), check_flag(merge_weights, "merge_weights")
        lora_dtype = check_lora_dtype(lora_dtype)
        if r > 0 and embedding.sparse:
            raise ValueError("sparse=True is not supported with r > 0 (lora_A's gradient is dense)")
        check_table_dtype(embedding.weight.dtype, lora_dtype)
        sharing.wrapping(embedding, "weight")  # which other modules hold W (tied weights): before `w` is bound
        w = embedding.weight
        if lora_dtype is None:
            lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        opts = {k: getattr(embedding, k) for k in EMBEDDING_OPTIONS}
        layer = cls(*w.shape, r=0, merge_weights=merge_weights, use_rslora=use_rslora, device="meta", dtype=w.dtype)
        for k, v in opts.items():
            setattr(layer, k, v)
        layer.weight = w
        if r > 0:
            layer.r, layer.lora_alpha = r, lora_alpha
            w.requires_grad_(False)
            layer.lora_A = nn.Parameter(torch.empty(r, w.shape[0], device=w.device, dtype=lora_dtype))
            layer.lora_B = nn.Parameter(torch.empty(w.shape[1], r, device=w.device, dtype=lora_dtype))
            layer.reset_lora_parameters()
        sharing.replace(embedding, layer)
        return layer

    def _merge_target(self) -> MergeTarget:
        """W [V, D] (this rank's rows under FSDP2) and rows of ΔW = s·(B·A)ᵀ from the whole adapters."""
        A, B = full(self.lora_A).detach(), full(self.lora_B).detach()
        w, s = self.weight, self.scaling
        local = w.to_local() if is_dtensor(w) else w
        first = local_block(w)[0].start if is_dtensor(w) else 0
        a, b = A.double(), B.double()
        delta_rows = lambda v0, v1: delta_product(a[:, first + v0 : first + v1].t(), b.t(), s)
        return MergeTarget(local, local.shape[0], local.shape[1], delta_rows, (A, B))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            check_indices(input, self.num_embeddings)
            return super().forward(input)
        return lora_embedding(
            input, self.weight, self.lora_A, self.lora_B, self.scaling, self.padding_idx, self.max_norm,
            self.norm_type, self.scale_grad_by_freq, self.sparse,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"
