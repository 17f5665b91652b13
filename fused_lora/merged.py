"""``MergedLinear``: loralib's ``lora.MergedLinear`` — one linear layer holding several projections (GPT-2's
fused ``c_attn`` = q, k, v), each with its own adapter or none — with one pass over x for all of them.

    x [..., K], W [N, K] = [W_0; …; W_{G-1}] (G = len(enable_lora) groups of N/G output rows)
    enabled groups j = 0 … g-1 (g = sum(enable_lora)): A_j = lora_A[j·r : (j+1)·r] [r, K],
    B_j = lora_B[j·N/G : (j+1)·N/G] [N/G, r]
    y[:, group q] = x·W_qᵀ + s·(drop(x)·A_jᵀ)·B_jᵀ   for the j-th enabled group q; x·W_qᵀ for a disabled one

loralib's forward builds the whole ΔW [N, K] with a grouped conv1d on every call and multiplies x by it:
a second full GEMM. Here one shrink gives xa = s·drop(x)·Aᵀ [M, r·g] for every group at once (x read
once), and the fused GEMM's epilogue adds to each output column its own group's slice xa[:, j·r:(j+1)·r]
·B_jᵀ: the kernels see B as the block-structured B_full [N, r·g] (B_j in rows of group q, columns j·r …
(j+1)·r, zero elsewhere) plus each group's rank-column bounds, so a tile multiplies only the rank
columns of the groups its columns touch (a tile may straddle two groups; a disabled group gets none).
The backward is LoRALinear's with that B_full: dX and dA exact, dB the blocks of dB_full (autograd
gathers them). Everything else — parameters, state_dict keys and shapes (loralib's, so state_dicts load
strictly both ways), initialisation, merge policy, exact merge round trip — is loralib's / LoRALinear's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import full
from .function import linear, lora_linear
from .layer import LoRALinear
from .validation import check_alpha, check_flag, check_rank, is_bool

__all__ = ["MergedLinear"]


def _check_enable_lora(enable_lora, out_features: int) -> tuple[bool, ...]:
    """A non-empty sequence of bools (bools, 0/1 ints, numpy bools, one-element bool tensors), or a 1-D
    numpy array / torch tensor of them (loralib indexes with it, so it takes a torch bool tensor too)."""
    np = sys.modules.get("numpy")
    if np is not None and isinstance(enable_lora, np.ndarray) and enable_lora.ndim == 1:
        enable_lora = enable_lora.tolist()
    if (
        isinstance(enable_lora, torch.Tensor)
        and enable_lora.dim() == 1
        and enable_lora.device.type != "meta"
        and not (enable_lora.is_floating_point() or enable_lora.is_complex())
    ):  # bool or integer entries; is_bool below takes 0/1 only
        enable_lora = enable_lora.tolist()
    if isinstance(enable_lora, (str, bytes)) or not isinstance(enable_lora, Sequence) or not len(enable_lora):
        raise TypeError(f"enable_lora must be a non-empty list of bools, got {enable_lora!r}")
    if not all(map(is_bool, enable_lora)):
        raise TypeError(f"enable_lora must hold bools, got {list(enable_lora)!r}")
    if out_features % len(enable_lora):
        raise ValueError(
            f"the length of enable_lora ({len(enable_lora)}) must divide out_features ({out_features}): "
            f"each entry is one group of out_features / len(enable_lora) output rows"
        )
    return tuple(bool(e) for e in enable_lora)


class MergedLinear(LoRALinear):
    """loralib's MergedLinear on the fused kernels (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        *,
        bias: bool = True,
        use_rslora: bool = False,
        device=None,
        dtype=None,
        lora_dtype: torch.dtype | None = None,
    ) -> None:
        r = check_rank(r)
        check_alpha(lora_alpha, r, check_flag(use_rslora, "use_rslora"))  # LoRALinear below sees r = 0
        enable = _check_enable_lora(enable_lora, out_features)
        super().__init__(  # as a plain LoRALinear without adapters; ours have other shapes
            in_features, out_features, 0, lora_alpha, lora_dropout, fan_in_fan_out, merge_weights,
            bias=bias, use_rslora=use_rslora, device=device, dtype=dtype,
        )  # fmt: skip
        self.r, self.enable_lora = r, list(enable)
        group_n, g = out_features // len(enable), sum(enable)
        self.group_n = group_n
        self._build_index(self.weight.device)
        if self.r > 0 and g > 0:
            factory = {"device": self.weight.device, "dtype": lora_dtype or self.weight.dtype}
            self.lora_A = nn.Parameter(torch.empty(self.r * g, in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(group_n * g, self.r, **factory))
            self.weight.requires_grad = False
            self.reset_lora_parameters()

    def _build_index(self, device: torch.device) -> None:
        """loralib's ``lora_ind`` (which output rows have an adapter) and each group's rank-column bounds,
        from enable_lora: buffers (they follow .to(device)), not saved (loralib's state_dict keys)."""
        ind = torch.tensor(self.enable_lora, dtype=torch.bool).repeat_interleave(self.group_n)
        bounds = [0]
        for e in self.enable_lora:
            bounds.append(bounds[-1] + (self.r if e else 0))
        bounds = torch.tensor(bounds, dtype=torch.int32)
        for name, value in (("lora_ind", ind), ("group_bounds", bounds)):
            old = self._buffers.get(name)
            if old is not None and old.device == device and old.dtype == value.dtype and old.device.type != "meta":
                try:
                    with torch.no_grad():  # in place: a CUDA graph captured earlier keeps reading this storage
                        old.copy_(value)
                    continue
                except RuntimeError:  # an inference tensor outside inference_mode: a new one, then
                    pass
            self.register_buffer(name, value.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        """Also made anew after every move: ``to_empty`` (a meta-device model materialised, FSDP2's and
        ``skip_init``'s flow) would leave them uninitialised, and neither a state_dict nor
        ``reset_parameters`` holds them."""
        super()._apply(fn, recurse)
        if "lora_ind" in self._buffers:
            self._build_index(self.lora_ind.device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args, **kwargs):
        raise TypeError(
            "MergedLinear.from_linear is not supported: construct MergedLinear(in, out, r, lora_alpha, "
            "lora_dropout, enable_lora, ...) and load the linear layer's weight and bias into it"
        )

    def _has_lora(self) -> bool:
        return self.r > 0 and any(self.enable_lora)

    def reset_lora_parameters(self) -> None:
        if self._has_lora():
            super().reset_lora_parameters()

    def block_b(self, lora_B: torch.Tensor | None = None) -> torch.Tensor:
        """B_full [out_features, r·g]: B_j in the rows of the j-th enabled group, columns j·r … (j+1)·r,
        zero elsewhere — ΔW = s·B_full·A is loralib's zero-padded merge_AB(). Differentiable in B."""
        B = self.lora_B if lora_B is None else lora_B
        g, r, n = sum(self.enable_lora), self.r, self.group_n
        rows, k = [], 0
        for enabled in self.enable_lora:  # row blocks in order; no boolean indexing: that is a host sync
            if enabled:  # on a GPU (nonzero), and this runs on every forward
                rows.append(F.pad(B[k * n : (k + 1) * n], (k * r, (g - k - 1) * r)))
                k += 1
            else:
                rows.append(B.new_zeros((n, r * g)))
        return torch.cat(rows, dim=0)

    def split_block_b(self, b_full: torch.Tensor) -> torch.Tensor:
        """lora_B [N/G·g, r] from a B_full [out_features, r·g] (a PEFT adapter file of this layer); a
        ValueError if b_full is not block-structured as :meth:`block_b` makes it (nonzero elsewhere)."""
        g = sum(self.enable_lora)
        if tuple(b_full.shape) != (self.out_features, self.r * g):
            raise ValueError(
                f"B {list(b_full.shape)} must be [{self.out_features}, {self.r * g}] for this MergedLinear"
            )
        rows = b_full[self.lora_ind]
        blocks = [rows[j * self.group_n : (j + 1) * self.group_n, j * self.r : (j + 1) * self.r] for j in range(g)]
        lora_B = torch.cat(blocks, dim=0)
        if not torch.equal(self.block_b(lora_B), b_full):
            raise ValueError(
                "this adapter is not a MergedLinear's: its B has entries outside the enabled groups' blocks "
                f"(enable_lora={self.enable_lora}, r={self.r})"
            )
        return lora_B

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        """loralib's helper: x's rows placed at the enabled output rows of an out_features-row tensor."""
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self) -> torch.Tensor:
        """loralib's ΔW/s in W's stored layout ([out, in], [in, out] with fan_in_fan_out)."""
        delta = self.block_b().float() @ self.lora_A.float()
        return delta.t() if self.fan_in_fan_out else delta

    def _lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.block_b(full(self.lora_B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._has_lora() or self.merged:
            return linear(x, self._weight_nk(), self.bias)  # not a view: FSDP2's hooks hang on the output
        return lora_linear(
            x, self._weight_nk(), self.lora_A, self.block_b(), self.scaling, self.bias, self.lora_dropout_p,
            self.training, groups=(self.group_n, self.group_bounds),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, enable_lora={self.enable_lora}"
