"""Merging s·B·A into W and taking it out again, bit for bit.

    W [out, in] (stored [in, out] with fan_in_fan_out), A [r, in], B [out, r], delta = s·B·A in fp32
    merge:   W' = round(W + delta)                 record the elements where round(W' - delta) != W
    unmerge: W  = round(W' - delta), then put the recorded elements back

Rounding alone would move some elements by an ulp per round trip (loralib and PEFT drift so). The
:class:`MergeRecord` holds what restores them — their flat index into W as [out, in], their original
value — and the adapters the delta was computed from: it applies only while A and B are unchanged,
compared by value, so it stays valid through ``copy.deepcopy``, pickling and state_dict round trips
(a version counter would not).

FSDP2: W, A and B are DTensors. The adapters are gathered (small: r·(in + out) elements; a collective, so
every rank merges, in the same order) and each rank changes its own block of W in place, with the
matching block of the delta; its record indexes that local block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import full, is_dtensor, local_block
from .reference import merge_delta


@dataclass
class MergeRecord:
    index: torch.Tensor  # int64 flat indices into (this rank's block of) W as [out, in]
    value: torch.Tensor  # W's values there before the merge
    lora_A: torch.Tensor  # the whole adapters the delta came from
    lora_B: torch.Tensor

    def applies_to(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
        return _same(self.lora_A, lora_A) and _same(self.lora_B, lora_B)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _target(weight, A, B, scaling: float, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(W as [out, in], a view of what this rank holds; the delta for exactly those elements)."""
    if is_dtensor(weight):
        local = weight.to_local()
        rows, cols = local_block(weight)  # in the stored layout
        n, k = (cols, rows) if fan_in_fan_out else (rows, cols)
    else:
        local, n, k = weight, slice(None), slice(None)
    w = local.t() if fan_in_fan_out else local
    return w, merge_delta(A[:, k], B[n], scaling)


@torch.no_grad()
def merge(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool) -> MergeRecord:
    """W += s·B·A in place (fp32 arithmetic, one rounding); returns what :func:`unmerge` needs."""
    A, B = full(lora_A).detach(), full(lora_B).detach()
    w, delta = _target(weight, A, B, scaling, fan_in_fan_out)
    merged = (w.float() + delta).to(w.dtype)
    lost = ((merged.float() - delta).to(w.dtype) != w).flatten().nonzero().squeeze(1)
    record = MergeRecord(lost, w.flatten()[lost].clone(), A.clone(), B.clone())
    w.copy_(merged)
    return record


@torch.no_grad()
def unmerge(weight, lora_A, lora_B, scaling: float, fan_in_fan_out: bool, record: MergeRecord | None) -> None:
    """W -= s·B·A in place, then the recorded elements are restored if A and B are what they were."""
    A, B = full(lora_A).detach(), full(lora_B).detach()
    w, delta = _target(weight, A, B, scaling, fan_in_fan_out)
    w.copy_((w.float() - delta).to(w.dtype))
    if record is not None and record.applies_to(A, B) and record.index.numel():
        index = record.index.to(w.device)
        w[index // w.shape[1], index % w.shape[1]] = record.value.to(w.device, w.dtype)


def record_from_state(index: torch.Tensor, value: torch.Tensor, weight, lora_A, lora_B) -> MergeRecord:
    """A record read back from a state_dict (its adapters are the ones loaded with it), checked."""
    numel = weight.numel()
    if index.dim() != 1 or value.shape != index.shape or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"unmerge_index / unmerge_value must be 1-D, of one length, the index integer; got "
            f"{index.dtype} {list(index.shape)} and {value.dtype} {list(value.shape)}"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"unmerge_index holds positions outside the weight's {numel} elements")
    return MergeRecord(
        index.to(weight.device, torch.int64),
        value.to(weight.device, weight.dtype),
        lora_A.detach().clone(),
        lora_B.detach().clone(),
    )
