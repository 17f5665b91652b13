"""``Conv1d`` / ``Conv2d`` / ``Conv3d``: drop-ins for loralib's LoRA convolutions.

    conv: nn.ConvNd(in, out, k, **kwargs) holding W [out, in/groups, k, …] and bias   (state_dict keys
    A [r·k, in·k^(d-1)], B [out/groups·k, r·k]                                         conv.weight,
    ΔW = s·(B·A).view(W.shape),  s = lora_alpha / r                                    conv.bias,
    y  = conv(x, W + ΔW) + bias                                                        lora_A, lora_B)

**Shapes.** loralib's ``ConvLoRA`` gives every convolution A [r·k, in·k] and B [out/groups·k, r·k]:
B·A then has out·(in/groups)·k² elements, which is W's count only for a 2-D kernel, so loralib's Conv1d
and Conv3d fail on their first forward unless k = 1. Here A's columns are in·k^(d-1): B·A always has
W's out·(in/groups)·k^d elements and is viewed as W exactly as loralib views it. For d = 2 (and for
k = 1 in any d) the shapes are loralib's own, so those state_dicts load strictly both ways. loralib
takes one int kernel_size (the same k in every dimension); a tuple of equal sizes is accepted as that
int, a non-uniform one (e.g. (3, 5)) is a ValueError.

**Forward.** As loralib: W + ΔW is formed and torch/cuDNN runs one convolution with it. W + s·B·A is one
``addmm`` ([out/groups·k, r·k]×[r·k, in·k^(d-1)] added to W, fp32 with autocast off, rounded once to W's
dtype); under ``torch.autocast`` the convolution then runs in the autocast dtype on that weight, as
``nn.Conv2d`` under autocast does on W + ΔW (loralib's B@A would run in bf16 there). ΔW is weight-sized,
small beside the activations; no Triton kernel is involved (measured on a CPU, the fused addmm built
W + ΔW 1.5–3.7× faster than loralib's ``W + (B@A).view(W.shape)·s``; see the README). That addmm is
torch's fp32 GEMM (TF32 where the user allows it), while ``merge()`` forms ΔW in float64 so that no
setting changes its bits (fused_lora.merging): a merged layer's W and the unmerged forward's differ by
at most the GEMM's rounding, and the outputs agree to fp32 rounding rather than bit for bit.

**Dropout.** loralib accepts ``lora_dropout`` for convolutions but never applies it. Here it is applied
as PEFT does, to the low-rank path's input: y = conv(x, W) + bias + conv(dropout(x), ΔW) — a second
convolution, so only in training with p > 0. With p = 0 (loralib's default) or in eval the layer is
loralib's.

Merging is exact (``fused_lora.merging``): ``eval()`` merges W += ΔW when ``merge_weights``, ``train()``
unmerges, bit for bit. As for LoRALinear, a merged layer's state_dict carries the record
(``unmerge_index`` / ``unmerge_value``, indexing ``conv.weight``) and ``load_state_dict`` never leaves W
out of step with ``merged``.
"""

from __future__ import annotations

import math
import numbers
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.parameter import UninitializedParameter

from . import sharing
from .distributed import is_dtensor
from .merging import ExactMerge, MergeRecord, MergeTarget, delta_product, no_autocast
from .validation import check_alpha, check_dropout, check_flag, check_lora_dtype, check_rank


def check_kernel_size(kernel_size, dims: int, name: str = "kernel_size") -> int:
    """The one kernel size k that loralib's shapes need: an int >= 1, or `dims` equal ints."""
    if isinstance(kernel_size, (tuple, list)):
        sizes = tuple(kernel_size)
        if len(sizes) != dims or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in sizes):
            raise ValueError(f"{name} {kernel_size!r} must be an int or {dims} ints for a {dims}-D convolution")
        if len(set(sizes)) != 1:
            raise ValueError(
                f"{name} {kernel_size!r} is not the same in every dimension: loralib's LoRA convolution shapes "
                f"(lora_A [r·k, in·k^(d-1)], lora_B [out/groups·k, r·k]) need one size k; use an int kernel_size"
            )
        kernel_size = sizes[0]
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise TypeError(f"{name} must be an int (or a tuple of equal ints), got {kernel_size!r}")
    if kernel_size < 1:
        raise ValueError(f"{name} must be >= 1, got {kernel_size}")
    return int(kernel_size)


def _check_lora_args(r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype):
    """The LoRA arguments of a convolution, checked: (r, dropout p, merge_weights, use_rslora, lora_alpha,
    lora_dtype)."""
    r, p = check_rank(r), check_dropout(lora_dropout, "lora_dropout")
    merge_weights, use_rslora = check_flag(merge_weights, "merge_weights"), check_flag(use_rslora, "use_rslora")
    return r, p, merge_weights, use_rslora, check_alpha(lora_alpha, r, use_rslora), check_lora_dtype(lora_dtype)


class _ConvLoRA(ExactMerge, nn.Module):
    conv_cls: ClassVar[type[nn.Module]]
    dims: ClassVar[int]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        **kwargs,
    ) -> None:
        k = check_kernel_size(kernel_size, self.dims)
        r, p, merge_weights, use_rslora, lora_alpha, lora_dtype = _check_lora_args(
            r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype
        )
        super().__init__()
        self.conv = self.conv_cls(in_channels, out_channels, kernel_size, **kwargs)
        sharing.adopt(self.conv, "weight")  # a fresh W (see fused_lora.sharing)
        self._setup(k, r, lora_alpha, p, merge_weights, use_rslora, lora_dtype)

    def _setup(self, k, r, lora_alpha, p, merge_weights, use_rslora, lora_dtype) -> None:
        self.kernel, self.r, self.lora_alpha, self.use_rslora = k, r, lora_alpha, use_rslora
        self.merge_weights, self.merged = merge_weights, False
        self._merge_record: MergeRecord | None = None
        self.register_load_state_dict_post_hook(ExactMerge._finish_load_after_children)
        self.lora_dropout = nn.Dropout(p) if p > 0.0 else nn.Identity()
        if r > 0:
            c, w = self.conv, self.conv.weight
            factory = {"device": w.device, "dtype": lora_dtype or w.dtype}
            self.lora_A = nn.Parameter(torch.empty(r * k, c.in_channels * k ** (self.dims - 1), **factory))
            self.lora_B = nn.Parameter(torch.empty(c.out_channels // c.groups * k, r * k, **factory))
            w.requires_grad = False
            self.reset_lora_parameters()

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
    ) -> _ConvLoRA:
        """Wrap an existing ``nn.Conv{d}d`` (it becomes ``.conv``: weight, bias and settings shared, not
        copied). Defaults are PEFT's ``LoraConfig`` ones (r = 8, lora_alpha = 8), as for
        ``LoRALinear.from_linear``. Adapters default to fp32 on a 16-bit weight (PEFT's default), else the
        weight's dtype."""
        if not isinstance(conv, cls.conv_cls) or type(conv).forward is not cls.conv_cls.forward:
            raise TypeError(f"{cls.__name__}.from_conv wraps an nn.{cls.conv_cls.__name__}, got {type(conv).__name__}")
        if isinstance(conv.weight, UninitializedParameter):
            raise ValueError(f"{type(conv).__name__} has uninitialised (lazy) parameters: run a forward first")
        k = check_kernel_size(conv.kernel_size, cls.dims, f"{type(conv).__name__}.kernel_size")
        r, p, merge_weights, use_rslora, lora_alpha, lora_dtype = _check_lora_args(
            r, lora_alpha, lora_dropout, merge_weights, use_rslora, lora_dtype
        )
        sharing.wrapping(conv, "weight")  # conv stays W's owner, as the layer's child; before `w` is bound
        w = conv.weight
        if lora_dtype is None:
            lora_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.conv = conv
        layer._setup(k, r, lora_alpha, p, merge_weights, use_rslora, lora_dtype)
        return layer

    def reset_parameters(self) -> None:
        """The convolution's initialisation, then the adapters' (as loralib)."""
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.r > 0:  # loralib: A as nn.Linear's default, B zero
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @property
    def scaling(self) -> float:
        if self.r == 0:
            return 0.0
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def lora_dropout_p(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _delta_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of s·B·A for merge/unmerge: fp32, multiplied in float64 (the same bits under any
        autocast / TF32 setting: fused_lora.merging.delta_product), in loralib's [out/groups·k,
        in·k^(d-1)] layout."""
        return delta_product(self.lora_B[r0:r1].detach(), self.lora_A.detach(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·(B·A).view(W.shape) in fp32 (autocast off), differentiable in A and B."""
        with no_autocast(self.lora_A.device):
            return (self.lora_B.float() @ self.lora_A.float()).mul(self.scaling).view(self.conv.weight.shape)

    def merged_weight(self) -> torch.Tensor:
        """round(W + ΔW) in W's dtype, by one fp32 addmm with autocast off (under autocast the convolution
        then rounds it to the autocast dtype, as nn.Conv does its weight); differentiable in A and B."""
        w = self.conv.weight
        with no_autocast(w.device):
            w2 = w.reshape(self.lora_B.shape[0], -1).float()
            return (
                torch.addmm(w2, self.lora_B.float(), self.lora_A.float(), alpha=self.scaling).to(w.dtype).view(w.shape)
            )

    # W lives in the ``conv`` child: the record sits under the layer's own prefix, the load finishes in a
    # post-hook once the child has loaded W (see ExactMerge)
    WEIGHT_KEY = "conv.weight"

    def _merge_target(self) -> MergeTarget:
        """W in loralib's [out/groups·k, in·k^(d-1)] layout and ΔW's rows."""
        w = self.conv.weight
        if is_dtensor(w):
            raise NotImplementedError("merging a sharded (FSDP2) convolution is not supported: merge before sharding")
        rows = self.lora_B.shape[0]
        adapters = (self.lora_A.detach(), self.lora_B.detach())
        return MergeTarget(w, rows, w.numel() // rows, self._delta_rows, adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if self.r == 0 or self.merged:
            return conv(x)
        w = conv.weight
        if self.training and self.lora_dropout_p > 0.0:
            low = conv._conv_forward(self.lora_dropout(x), self.delta_weight().to(w.dtype), None)
            return conv._conv_forward(x, w, conv.bias) + low
        return conv._conv_forward(x, self.merged_weight(), conv.bias)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout_p}, "
            f"use_rslora={self.use_rslora}, merged={self.merged}"
        )


class Conv1d(_ConvLoRA):
    """loralib's ``lora.Conv1d`` — working for any kernel size (A [r·k, in], B [out/groups·k, r·k])."""

    conv_cls, dims = nn.Conv1d, 1


class Conv2d(_ConvLoRA):
    """loralib's ``lora.Conv2d`` (A [r·k, in·k], B [out/groups·k, r·k]: loralib's own shapes)."""

    conv_cls, dims = nn.Conv2d, 2


class Conv3d(_ConvLoRA):
    """loralib's ``lora.Conv3d`` — working for any kernel size (A [r·k, in·k²], B [out/groups·k, r·k])."""

    conv_cls, dims = nn.Conv3d, 3
