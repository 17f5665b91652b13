"""``LoRALinear``: a drop-in for loralib's ``lora.Linear`` that runs the fused kernels.

Same constructor as loralib: ``LoRALinear(in_features, out_features, r=0, lora_alpha=1,
lora_dropout=0.0, fan_in_fan_out=False, merge_weights=True, bias=True, device=None, dtype=None)`` with
the same defaults, positions and meaning, so a ``lora.Linear(...)`` call carries over unchanged (``r=0``
is a plain linear layer, as in loralib); ``use_rslora`` and ``lora_dtype`` are extra keywords. Same parameter
names and shapes (``weight`` [out, in] — [in, out] with fan_in_fan_out —, ``bias`` [out], ``lora_A``
[r, in], ``lora_B`` [out, r]), so a loralib state_dict loads strictly; the same initialisation (A
kaiming-uniform with a = √5, B zero), frozen ``weight``, and the same merge policy: ``eval()`` merges
W += s·B·A when ``merge_weights``, ``train()`` unmerges.

Merging adds ΔW = s·B·A to W in fp32 and rounds once (ΔW multiplied in float64 and rounded to fp32, so
no autocast, TF32 or matmul-precision setting changes a bit of it); the round trip is exact (see
fused_lora.merging), and the record that makes it so travels with the layer: through ``copy.deepcopy``,
pickling, and its state_dict. A merged layer's state_dict holds the merged W plus two entries,
``unmerge_index`` and ``unmerge_value``; loading it gives a merged layer that unmerges exactly.
``load_state_dict`` always leaves W consistent with the ``merged`` flag: the layer unmerges before
loading, takes the state as it was saved (merged or not; a state without ``weight`` keeps the base W),
then follows its merge policy (with ``merge_weights``: merged in eval mode, unmerged in training mode).
An unmerged layer's state_dict has exactly loralib's keys. (All of it is
:class:`fused_lora.merging.ExactMerge`, shared by every layer.)
A weight another module holds too (tied weights) is never merged: ``merge()`` raises, ``eval()`` leaves the
layer unmerged with a warning (fused_lora.sharing).

Under FSDP2 the parameters are sharded DTensors: ``merge``/``unmerge`` (and so ``eval()``/``train()``
with ``merge_weights``) gather the small adapters and change each rank's block of W in place. They are
collectives there: every rank calls them, in the same order. A sharded layer's state_dict carries no
merge record (state_dicts of sharded models are the distributed checkpoint's business).

With the fused kernels the unmerged layer costs about what a merged one does, so ``merge_weights=False``
is also a sensible choice.

``use_dora=True`` makes it a DoRA layer (:mod:`fused_lora.dora`): a trainable magnitude ``lora_magnitude``
[out] (in the adapters' dtype), initialised as PEFT does to ‖W_j + s·(B·A)_j‖, and
y = (m/n)·(x·Wᵀ + s·drop(x)·Aᵀ·Bᵀ) + bias. Its merge writes W' = (m/n)·(W + s·B·A) (one rounding, the
same exact-round-trip record, which also checks m); n of the unmerged W is kept while merged (and in a
merged layer's state_dict as ``dora_norm``), since W' alone cannot give it back.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import sharing
from .distributed import copy_full_into, fsdp_managed, full, is_dtensor, local_block, reshard_fsdp_owners
from .dora import dora_linear, dora_norm
from .function import linear, lora_linear
from .merging import RECORD_KEYS, ExactMerge, MergeRecord, MergeTarget, delta_product
from .validation import check_alpha, check_dropout, check_flag, check_lora_dtype, check_rank

__all__ = ["RECORD_KEYS", "LoRALinear"]


class LoRALinear(ExactMerge, nn.Linear):
    """y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ with s = lora_alpha / r (lora_alpha / √r with use_rslora)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        *,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
        lora_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        r, p = check_rank(r), check_dropout(lora_dropout, "lora_dropout")
        use_rslora, use_dora = check_flag(use_rslora, "use_rslora"), check_flag(use_dora, "use_dora")
        lora_alpha = check_alpha(lora_alpha, r, use_rslora)
        fan_in_fan_out = check_flag(fan_in_fan_out, "fan_in_fan_out")
        merge_weights = check_flag(merge_weights, "merge_weights")
        lora_dtype = check_lora_dtype(lora_dtype)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        sharing.adopt(self, "weight")  # a fresh W: no other module holds it (yet; see fused_lora.sharing)
        self.r, self.lora_alpha, self.use_rslora, self.use_dora = r, lora_alpha, use_rslora, use_dora and r > 0
        self._dora_merge_norm: torch.Tensor | None = None  # n of the unmerged W, while merged (DoRA)
        self._dora_next_norm: torch.Tensor | None = None
        self.fan_in_fan_out, self.merge_weights, self.merged = fan_in_fan_out, merge_weights, False
        self._merge_record: MergeRecord | None = None  # see merge()
        self.lora_dropout = nn.Dropout(p) if p > 0.0 else nn.Identity()
        if fan_in_fan_out:  # stored [in, out], as GPT-2's Conv1D does
            self.weight.data = self.weight.data.t().contiguous()
        if r > 0:
            factory = {"device": self.weight.device, "dtype": lora_dtype or self.weight.dtype}
            self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
            if self.use_dora:
                self.lora_magnitude = nn.Parameter(torch.empty(out_features, **factory))
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for W and bias, then the adapters' (as loralib does)."""
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def reset_lora_parameters(self) -> None:
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        if getattr(self, "lora_magnitude", None) is not None and self.weight.device.type != "meta":
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ‖W_j + s·(B·A)_j‖ per output row (PEFT's initialisation: y is then the LoRA layer's).
        With FSDP2's sharded parameters a collective (W, A and B are gathered; each rank writes its block
        of m): every rank calls it. A unit that kept unsharded copies after a forward is resharded first, so
        that the new m reaches the parameters FSDP2 keeps (written into the copies, it was lost)."""
        if self.merged:
            raise ValueError("reset_magnitude() on a merged layer: unmerge() first")
        reshard_fsdp_owners(self)
        sharded = is_dtensor(self.weight)
        w = full(self.weight)
        w = w.t() if self.fan_in_fan_out else w
        n = dora_norm(w, full(self.lora_A), full(self.lora_B), self.scaling, cache=not (sharded or fsdp_managed(self)))
        copy_full_into(self.lora_magnitude, n)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        merge_weights: bool = True,
        lora_dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are shared, not copied.

        Defaults are PEFT's ``LoraConfig`` ones (r = 8, lora_alpha = 8), not loralib's r = 0. The adapters
        live on the weight's device, in `lora_dtype` — by default fp32 when the weight is
        16-bit (PEFT's default: it keeps adapters in fp32 for stable updates), else the weight's dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear wraps an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("this layer is already a LoRALinear")
        r, use_rslora = check_rank(r), check_flag(use_rslora, "use_rslora")  # all checked before anything is done
        lora_alpha, lora_dropout = check_alpha(lora_alpha, r, use_rslora), check_dropout(lora_dropout, "lora_dropout")
        merge_weights, lora_dtype = check_flag(merge_weights, "merge_weights"), check_lora_dtype(lora_dtype)
        use_dora = check_flag(use_dora, "use_dora")
        if is_dtensor(linear.weight):
            raise TypeError(
                "this nn.Linear's weight is a DTensor (sharded, e.g. by fully_shard): add LoRA first "
                "(inject_lora / load_adapter), then shard the model"
            )
        sharing.wrapping(linear, "weight")  # which other modules hold W (tied weights): before `w` is bound
        w = linear.weight
        if lora_dtype is None:
            lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        layer = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=False,
            use_rslora=use_rslora,
            merge_weights=merge_weights,
            device="meta",
            dtype=w.dtype,
            use_dora=use_dora,
        )
        layer.weight = w
        layer.bias = linear.bias
        if r > 0:
            w.requires_grad_(False)
            layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=lora_dtype))
            layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=lora_dtype))
            if layer.use_dora:
                layer.lora_magnitude = nn.Parameter(torch.empty(linear.out_features, device=w.device, dtype=lora_dtype))
            layer.reset_lora_parameters()
        sharing.replace(linear, layer)
        return layer

    def _weight_nk(self) -> torch.Tensor:
        """W as [out, in] (a view when stored transposed)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def _lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with ΔW = s·B·A [out, in] (MergedLinear puts its block-structured B here)."""
        return self.lora_A, self.lora_B

    def _merge_target(self) -> MergeTarget:
        """W in its stored layout ([in, out] with fan_in_fan_out; this rank's block of it under FSDP2) and
        the matching rows of ΔW = s·B·A (fp32, multiplied in float64: fused_lora.merging.delta_product),
        from the whole (gathered) adapters."""
        A, B = (full(t).detach() for t in self._lora_factors())
        w, s = self.weight, self.scaling
        local = w.to_local() if is_dtensor(w) else w
        rows_slice, cols_slice = local_block(w) if is_dtensor(w) else (slice(None), slice(None))
        if self.fan_in_fan_out:  # stored [in, out]: ΔWᵀ
            a, b = A[:, rows_slice].double(), B[cols_slice].double()
            delta_rows = lambda r0, r1: delta_product(a[:, r0:r1].t(), b.t(), s)
        else:
            a, b = A[:, cols_slice].double(), B[rows_slice].double()
            delta_rows = lambda r0, r1: delta_product(b[r0:r1], a, s)
        if not self.use_dora:
            return MergeTarget(local, local.shape[0], local.shape[1], delta_rows, (A, B))
        return self._dora_merge_target(local, delta_rows, A, B, rows_slice, cols_slice)

    def _dora_merge_target(self, local: torch.Tensor, lora_rows, A, B, rows_slice, cols_slice) -> MergeTarget:
        """DoRA: W' = c·(W + ΔW), c = m/n per output row (n of the unmerged W: computed when merging, kept
        while merged), as a delta from W; the unmerge computes W = W'/c − ΔW (float64, one rounding) — the
        record of merge_exact checks exactly that inverse, so the round trip is bit-exact. Under FSDP2 a
        collective: m and (when merging) W are gathered, n is the whole layer's, each rank changes its block
        (`rows_slice`, `cols_slice` of W as stored)."""
        sharded = is_dtensor(self.weight)
        m = full(self.lora_magnitude).detach()
        if self.merged:
            if self._dora_merge_norm is None:
                raise ValueError("this merged DoRA layer has lost the norm of its unmerged weight (dora_norm)")
            n = self._dora_merge_norm
        else:
            w = full(self.weight).detach()
            w = w.t() if self.fan_in_fan_out else w
            n = dora_norm(w, A, B, self.scaling, cache=not (sharded or fsdp_managed(self)))
            if bool((n == 0).any()) or bool((m == 0).any()):  # the same whole n and m on every rank
                raise ValueError("DoRA merge: a zero magnitude or weight-norm row cannot be unmerged; keep it unmerged")
            self._dora_next_norm = n  # kept by merge() once W is merged
        c = m.double() / n.double()
        # output rows: W's rows, or its columns stored [in, out]; this rank's block of them
        c = c[None, cols_slice] if self.fan_in_fan_out else c[rows_slice, None]
        rows_c = (lambda r0, r1: c) if self.fan_in_fan_out else (lambda r0, r1: c[r0:r1])

        def delta_rows(r0: int, r1: int) -> torch.Tensor:  # merging: c·(W + ΔW) − W
            cj = rows_c(r0, r1)
            return ((cj - 1) * local[r0:r1].double() + cj * lora_rows(r0, r1).double()).float()

        def inverse(merged: torch.Tensor, r0: int, r1: int) -> torch.Tensor:  # W'/c − ΔW
            return (merged.double() / rows_c(r0, r1) - lora_rows(r0, r1).double()).to(merged.dtype)

        return MergeTarget(local, local.shape[0], local.shape[1], delta_rows, (A, B, m), inverse)

    def merge(self) -> None:
        was_merged = self.merged
        super().merge()
        if self.use_dora and self.merged and not was_merged:
            self._dora_merge_norm = self._dora_next_norm
        self._dora_next_norm = None

    def unmerge(self) -> None:
        super().unmerge()
        if not self.merged:
            self._dora_merge_norm = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.use_dora and self.merged and self._dora_merge_norm is not None:
            destination[prefix + "dora_norm"] = self._dora_merge_norm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._pending_dora_norm = state_dict.get(prefix + "dora_norm") if self.use_dora else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "dora_norm" in unexpected and self.use_dora:
            unexpected.remove(prefix + "dora_norm")

    def _finish_load(self) -> None:
        pending = getattr(self, "_pending_load", None)
        norm, self._pending_dora_norm = getattr(self, "_pending_dora_norm", None), None
        if self.use_dora and pending is not None and pending[1]:  # a merged layer's state: its unmerged W's n
            if norm is None:
                pending[4].append(f"{pending[0]}: a merged DoRA layer's state needs {pending[0]}dora_norm")
                self._pending_load = None
                return
            self._dora_merge_norm = norm.detach().to(self.weight.device, torch.float32).clone()
        super()._finish_load()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return linear(x, self._weight_nk(), self.bias)  # not a view: FSDP2's hooks hang on the output
        if self.use_dora:
            return dora_linear(x, self._weight_nk(), self.lora_A, self.lora_B, self.lora_magnitude, self.scaling,
                               self.bias, self.lora_dropout_p, self.training,
                               cache_norm=not fsdp_managed(self))  # fmt: skip
        return lora_linear(
            x, self._weight_nk(), self.lora_A, self.lora_B, self.scaling, self.bias, self.lora_dropout_p, self.training
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout_p}, use_rslora={self.use_rslora}, merged={self.merged}"
            + (", use_dora=True" if self.use_dora else "")
        )
