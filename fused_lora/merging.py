"""Exact merge bookkeeping for any LoRA layer: W += ΔW with one rounding, and a record that lets the
unmerge restore W bit for bit.

    record = merge_exact(weight, rows, cols, delta_rows, versions)   # W ← round(W + ΔW), in place
    unmerge_exact(weight, rows, cols, delta_rows, record, versions)  # W ← the W it was before merge

`weight` is the layer's Parameter; ``(rows, cols)`` is the 2-D layout in which the layer defines its
delta (``[out, in]`` for a linear layer, ``[num_embeddings, dim]`` for an embedding, loralib's
``[out/groups·k, in·k^(d-1)]`` for a convolution), and ``delta_rows(r0, r1)`` returns fp32 ΔW for rows
``r0:r1`` of it. The work runs in row chunks (about 16 M elements each), so the fp32 temporaries stay
small even for a large vocabulary.

Why a record: rounding W + ΔW to a 16-bit (or fp32) W loses bits, and W_merged − ΔW does not always
round back to W (loralib and PEFT drift by an ulp per merge/unmerge trip). For every chunk, the merge
finds the elements that would not come back — compared as bit patterns, so −0.0 and NaN payloads count
too — and keeps either their positions and original values or, when that would be larger, a copy of
the chunk; the unmerge puts them back. The record is used only while it still describes the weight:
the adapters' and the weight's version counters must be what they were right after the merge (an
optimizer step, ``load_state_dict`` or ``max_norm``'s renormalisation in between invalidates it, and
the unmerge then only subtracts ΔW). Memory: at most one copy of W, usually far less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 24
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

DeltaRows = Callable[[int, int], torch.Tensor]
MergedRows = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class MergeRecord:
    """What :func:`unmerge_exact` needs to restore W: per chunk (first row, positions or None, values)."""

    chunks: list[tuple[int, torch.Tensor | None, torch.Tensor]]
    versions: tuple[int, ...]  # the adapters' version counters at merge time
    weight_version: int  # the weight's version counter right after the merge
    weight_ptr: int

    def valid_for(self, weight: torch.Tensor, versions: tuple[int, ...]) -> bool:
        same_weight = self.weight_version == weight._version and self.weight_ptr == weight.data_ptr()
        return same_weight and self.versions == versions


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _Work:
    """A 2-D [rows, cols] view of `weight` to work in, or a contiguous copy written back at the end
    (a channels-last convolution weight cannot be viewed as loralib's 2-D layout)."""

    def __init__(self, weight: torch.Tensor, rows: int, cols: int) -> None:
        if weight.numel() != rows * cols:
            raise ValueError(f"weight {list(weight.shape)} does not hold a [{rows}, {cols}] delta")
        self.weight = weight
        self.copy = not weight.is_contiguous()
        self.w2 = (weight.contiguous() if self.copy else weight).view(rows, cols)

    def finish(self) -> None:
        if self.copy:
            self.weight.copy_(self.w2.view(self.weight.shape))


@torch.no_grad()
def merge_exact(
    weight: torch.Tensor,
    rows: int,
    cols: int,
    delta_rows: DeltaRows,
    versions: tuple[int, ...],
    merged_rows: MergedRows | None = None,
) -> MergeRecord:
    """W ← round(W + ΔW) in place (fp32 arithmetic, one rounding); returns the record to undo it.

    `merged_rows(r0, r1, w)`, if given, forms round(w + ΔW) for those rows itself (e.g. with one fused
    addmm, to give the very bits a layer's unmerged forward uses); the record is the same either way."""
    work = _Work(weight, rows, cols)
    chunks = []
    for r0, r1 in _chunks(rows, cols):
        w = work.w2[r0:r1]
        d = delta_rows(r0, r1)
        merged = merged_rows(r0, r1, w) if merged_rows is not None else (w.float() + d).to(w.dtype)
        lost = (_bits((merged.float() - d).to(w.dtype)) != _bits(w)).flatten().nonzero().squeeze(1)
        if lost.numel() * (4 + w.element_size()) < w.numel() * w.element_size():
            chunks.append((r0, lost.to(torch.int32), w.flatten()[lost].clone()))
        else:
            chunks.append((r0, None, w.clone()))
        w.copy_(merged)
    work.finish()
    return MergeRecord(chunks, versions, weight._version, weight.data_ptr())


@torch.no_grad()
def unmerge_exact(
    weight: torch.Tensor,
    rows: int,
    cols: int,
    delta_rows: DeltaRows,
    record: MergeRecord | None,
    versions: tuple[int, ...],
) -> None:
    """Undo :func:`merge_exact`: bit for bit while `record` is valid, else W ← round(W − ΔW)."""
    work = _Work(weight, rows, cols)
    exact = record is not None and record.valid_for(weight, versions)
    saved = {c[0]: c for c in record.chunks} if exact else {}
    for r0, r1 in _chunks(rows, cols):
        w = work.w2[r0:r1]
        kept = saved.get(r0)
        if kept is not None and kept[1] is None:  # a full copy of the chunk
            w.copy_(kept[2])
            continue
        w.copy_((w.float() - delta_rows(r0, r1)).to(w.dtype))
        if kept is not None:
            w.view(-1)[kept[1].long()] = kept[2]
    work.finish()
