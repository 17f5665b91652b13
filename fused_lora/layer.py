"""``LoRALinear``: a drop-in for loralib's ``lora.Linear`` that runs the fused kernels.

Same parameter names and shapes as loralib (``weight`` [out, in] — [in, out] with fan_in_fan_out —,
``bias`` [out], ``lora_A`` [r, in], ``lora_B`` [out, r]), so a loralib state_dict loads strictly; the
same initialisation (A kaiming-uniform with a = √5, B zero), frozen ``weight``, ``r = 0`` as a plain
linear layer, and the same merge policy: ``eval()`` merges W += s·B·A when ``merge_weights``, ``train()``
unmerges.

Merging computes W + s·B·A in fp32 and rounds once to W's dtype. Rounding alone would make a
merge/unmerge round trip move some elements by an ulp (loralib and PEFT do drift so, and a run that
toggles eval/train accumulates it); here ``merge`` also records the few elements that subtracting the
delta would not restore (their index and original value, usually a small fraction of W), and
``unmerge`` puts them back, so the round trip is exact as long as A and B did not change in between.
With the fused kernels the unmerged layer costs about what a merged one does, so ``merge_weights=False``
is also a sensible choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .function import lora_linear
from .reference import merge_delta
from .validation import check_dropout, check_rank


class LoRALinear(nn.Linear):
    """y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ with s = lora_alpha / r (lora_alpha / √r with use_rslora)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        device=None,
        dtype=None,
        *,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        r = check_rank(r)
        p = check_dropout(lora_dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.fan_in_fan_out, self.merge_weights, self.merged = fan_in_fan_out, merge_weights, False
        self._unmerge_fix: tuple | None = None  # see merge()
        self.lora_dropout = nn.Dropout(p) if p > 0.0 else nn.Identity()
        if fan_in_fan_out:  # stored [in, out], as GPT-2's Conv1D does
            self.weight.data = self.weight.data.t().contiguous()
        if r > 0:
            factory = {"device": self.weight.device, "dtype": lora_dtype or self.weight.dtype}
            self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
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

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        merge_weights: bool = True,
        lora_dtype: torch.dtype | None = None,
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias Parameters are shared, not copied.

        The adapters live on the weight's device, in `lora_dtype` — by default fp32 when the weight is
        16-bit (PEFT's default: it keeps adapters in fp32 for stable updates), else the weight's dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear wraps an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, LoRALinear):
            raise TypeError("this layer is already a LoRALinear")
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
        )
        layer.weight = w
        layer.bias = linear.bias
        if r > 0:
            w.requires_grad_(False)
            layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=lora_dtype))
            layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=lora_dtype))
            layer.reset_lora_parameters()
        return layer

    def _weight_nk(self) -> torch.Tensor:
        """W as [out, in] (a view when stored transposed)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W += s·B·A (fp32 arithmetic, one rounding); the layer then runs as a plain linear layer."""
        if self.r == 0 or self.merged:
            return
        w = self._weight_nk()
        delta = merge_delta(self.lora_A, self.lora_B, self.scaling)
        merged = (w.float() + delta).to(w.dtype)
        # Elements that W_merged - delta would not round back to W: keep their index and value.
        lost = ((merged.float() - delta).to(w.dtype) != w).flatten().nonzero().squeeze(1)
        self._unmerge_fix = (lost, w.flatten()[lost].clone(), self._adapter_versions())
        w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s·B·A, undoing :meth:`merge` exactly (unless A or B changed while merged)."""
        if self.r == 0 or not self.merged:
            return
        w = self._weight_nk()
        w.copy_((w.float() - merge_delta(self.lora_A, self.lora_B, self.scaling)).to(w.dtype))
        fix, self._unmerge_fix = self._unmerge_fix, None
        if fix is not None and fix[2] == self._adapter_versions():
            rows, cols = fix[0] // w.shape[1], fix[0] % w.shape[1]
            w[rows, cols] = fix[1]
        self.merged = False

    def _adapter_versions(self) -> tuple[int, int]:
        return (self.lora_A._version, self.lora_B._version)

    def train(self, mode: bool = True) -> LoRALinear:
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.r == 0 or self.merged:
            return F.linear(x, self._weight_nk(), self.bias)
        return lora_linear(
            x, self._weight_nk(), self.lora_A, self.lora_B, self.scaling, self.bias, self.lora_dropout_p, self.training
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout_p}, use_rslora={self.use_rslora}, merged={self.merged}"
        )
