"""Exact merging for every LoRA layer: W ← round(W + ΔW) with one rounding, and a record that lets the
unmerge restore W bit for bit — also after ``copy.deepcopy``, pickling and a state_dict round trip.

    record = merge_exact(weight, rows, cols, delta_rows, adapters)        # W ← round(W + ΔW), in place
    unmerge_exact(weight, rows, cols, delta_rows, record, adapters)       # W ← what it was before merge

``(rows, cols)`` is the 2-D layout in which a layer defines its delta ([out, in] for a linear layer —
or W's stored [in, out] with fan_in_fan_out —, [num_embeddings, dim] for an embedding, loralib's
[out/groups·k, in·k^(d-1)] for a convolution) and ``delta_rows(r0, r1)`` gives fp32 ΔW for rows r0:r1.
The work runs in row chunks (about 16 M elements each), so the fp32 temporaries stay small even for a
large vocabulary.

Why a record: W_merged − ΔW does not always round back to W (loralib and PEFT drift by an ulp per
merge/unmerge trip, and a run that toggles eval/train accumulates it). The merge finds the elements that
would not come back — compared as bit patterns, so −0.0, NaN payloads and infinities count — and keeps
their positions, their original values and what the merge wrote there. The unmerge subtracts ΔW and puts
the originals back, but only

- while the adapters are the ones the delta came from (compared by value, so the check survives
  deepcopy, pickling and state_dicts; a version counter would not), and
- at positions that still hold what the merge wrote (an element changed since — an optimizer step on W,
  ``max_norm``'s renormalisation — is left as the subtraction makes it).

:class:`ExactMerge` gives a layer ``merge()`` / ``unmerge()`` / ``train()`` and carries the record
through its state_dict (two extra entries, ``unmerge_index`` / ``unmerge_value``, in a merged layer's
state only; an unmerged layer's keys are loralib's). Under FSDP2 the layer merges its rank's block of W
with the matching block of ΔW (a collective: the adapters are gathered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .distributed import is_dtensor, reshard_fsdp_owners

CHUNK_ELEMENTS = 1 << 24
RECORD_KEYS = ("unmerge_index", "unmerge_value")
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

DeltaRows = Callable[[int, int], torch.Tensor]
MergedRows = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class MergeRecord:
    index: torch.Tensor  # int64 flat positions into W's [rows, cols] layout
    value: torch.Tensor  # W there before the merge
    merged: torch.Tensor  # W there right after the merge
    adapters: tuple[torch.Tensor, ...]  # copies of the adapters the delta came from

    def applies_to(self, adapters: tuple[torch.Tensor, ...]) -> bool:
        return len(adapters) == len(self.adapters) and all(map(_same, self.adapters, adapters))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _Work:
    """A [rows, cols] view of `weight` to work in, or a contiguous copy written back at the end (a
    channels-last convolution weight cannot be viewed in loralib's 2-D layout)."""

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
    adapters: tuple[torch.Tensor, ...],
    merged_rows: MergedRows | None = None,
) -> MergeRecord:
    """W ← round(W + ΔW) in place (fp32 arithmetic, one rounding); returns the record to undo it.

    `merged_rows(r0, r1, w)`, if given, forms round(w + ΔW) for those rows itself (e.g. with one fused
    addmm, to give the very bits a layer's unmerged forward uses); the record is the same either way."""
    work = _Work(weight, rows, cols)
    index, value, merged_at = [], [], []
    for r0, r1 in _chunks(rows, cols):
        w = work.w2[r0:r1]
        d = delta_rows(r0, r1)
        merged = merged_rows(r0, r1, w) if merged_rows is not None else (w.float() + d).to(w.dtype)
        lost = (_bits((merged.float() - d).to(w.dtype)) != _bits(w)).flatten().nonzero().squeeze(1)
        index.append(lost + r0 * cols)
        value.append(w.flatten()[lost].clone())
        merged_at.append(merged.flatten()[lost].clone())
        w.copy_(merged)
    work.finish()
    copies = tuple(a.detach().clone() for a in adapters)
    return MergeRecord(torch.cat(index), torch.cat(value), torch.cat(merged_at), copies)


@torch.no_grad()
def unmerge_exact(
    weight: torch.Tensor,
    rows: int,
    cols: int,
    delta_rows: DeltaRows,
    record: MergeRecord | None,
    adapters: tuple[torch.Tensor, ...],
) -> None:
    """Undo :func:`merge_exact`: W ← round(W − ΔW), then the recorded elements are put back where the
    record applies (see the module docstring)."""
    work = _Work(weight, rows, cols)
    flat = work.w2.view(-1)
    restore = None
    if record is not None and record.index.numel() and record.applies_to(adapters):
        index = record.index.to(flat.device)
        untouched = _bits(flat[index]) == _bits(record.merged.to(flat.device, flat.dtype))
        restore = (index[untouched], record.value.to(flat.device, flat.dtype)[untouched])
    for r0, r1 in _chunks(rows, cols):
        w = work.w2[r0:r1]
        w.copy_((w.float() - delta_rows(r0, r1)).to(w.dtype))
    if restore is not None:
        flat[restore[0]] = restore[1]
    work.finish()


def record_from_state(
    index: torch.Tensor, value: torch.Tensor, weight: torch.Tensor, adapters: tuple[torch.Tensor, ...]
) -> MergeRecord:
    """A record read back from a state_dict holding a merged W (the record's `merged` values are W's
    as loaded), checked."""
    numel = weight.numel()
    if index.dim() != 1 or value.shape != index.shape or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"unmerge_index / unmerge_value must be 1-D, of one length, the index integer; got "
            f"{index.dtype} {list(index.shape)} and {value.dtype} {list(value.shape)}"
        )
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"unmerge_index holds positions outside the weight's {numel} elements")
    index = index.to(weight.device, torch.int64)
    flat = weight.detach().reshape(-1)
    merged = flat[index].clone()
    copies = tuple(a.detach().clone() for a in adapters)
    return MergeRecord(index, value.to(weight.device, weight.dtype), merged, copies)


class MergeTarget(NamedTuple):
    """What a layer's merge changes and how: `weight` (in place: W, or this rank's block of it under
    FSDP2) seen as [rows, cols], ΔW's rows in that layout, the whole adapters, optionally round(W + ΔW)."""

    weight: torch.Tensor
    rows: int
    cols: int
    delta_rows: DeltaRows
    adapters: tuple[torch.Tensor, ...]
    merged_rows: MergedRows | None = None


class ExactMerge:
    """merge() / unmerge() / train() with exact round trips, and the record in the state_dict, for a LoRA
    layer (mixed in before its nn.Module base). The layer defines :meth:`_merge_target` and
    :meth:`_has_lora`, and holds ``merged``, ``merge_weights`` and ``_merge_record``.

    ``WEIGHT_KEY``: W's key in the layer's state_dict — its own parameter ``weight`` (LoRALinear,
    MergedLinear, Embedding), or a child's (a convolution's ``conv.weight``). The record keys sit under
    the layer's own prefix either way. W in a child loads after the layer's own entries, so such a layer
    finishes its load (record, merge policy) in a load_state_dict post-hook that it registers with
    :meth:`_finish_load_after_children`."""

    WEIGHT_KEY = "weight"

    def _has_lora(self) -> bool:
        return self.r > 0

    def _merge_target(self) -> MergeTarget:
        raise NotImplementedError

    def merge(self) -> None:
        """W += ΔW (fp32 arithmetic, one rounding); the layer then runs as its plain base layer."""
        if not self._has_lora() or self.merged:
            return
        reshard_fsdp_owners(self)
        t = self._merge_target()
        self._merge_record = merge_exact(t.weight, t.rows, t.cols, t.delta_rows, t.adapters, t.merged_rows)
        self.merged = True

    def unmerge(self) -> None:
        """W -= ΔW, undoing :meth:`merge` exactly (unless the adapters changed in between)."""
        if not self._has_lora() or not self.merged:
            return
        reshard_fsdp_owners(self)
        t = self._merge_target()
        record, self._merge_record = self._merge_record, None
        unmerge_exact(t.weight, t.rows, t.cols, t.delta_rows, record, t.adapters)
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self.merge()
        return self

    def _base_weight(self) -> torch.Tensor:
        return self.get_parameter(self.WEIGHT_KEY)

    def _record_in_state(self) -> bool:
        return self._has_lora() and not is_dtensor(self._base_weight())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.merged or not self._record_in_state():
            return
        record = self._merge_record
        if record is None or not record.applies_to(self._merge_target().adapters):
            # merged, but nothing restores W exactly any more (the adapters changed): record nothing
            index, value = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=self._base_weight().dtype)
        else:
            index, value = record.index, record.value
        destination[prefix + RECORD_KEYS[0]] = index
        destination[prefix + RECORD_KEYS[1]] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Leaves W consistent with ``merged``: unmerge, load the state as it was saved (merged or not; a
        state without W's key keeps the base W), then follow the merge policy."""
        self._pending_load = None
        load = lambda: super(ExactMerge, self)._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
        if not self._record_in_state():
            return load()
        was_merged = self.merged
        self.unmerge()  # W is the base weight while loading
        n_errors = len(errors)
        load()
        keys = [prefix + k for k in RECORD_KEYS]
        for k in keys:
            if k in unexpected:
                unexpected.remove(k)
        record = [state_dict[k] for k in keys if k in state_dict]
        self._pending_load = (prefix, record, prefix + self.WEIGHT_KEY in state_dict, was_merged, errors, n_errors)
        if "." not in self.WEIGHT_KEY:  # W is the layer's own parameter: loaded already
            self._finish_load()

    @staticmethod
    def _finish_load_after_children(module, incompatible_keys) -> None:
        """The load_state_dict post-hook of a layer whose W lives in a child (registered by the layer)."""
        module._finish_load()

    def _finish_load(self) -> None:
        """Once W is loaded: take a merged state's record, or re-merge, then follow the merge policy."""
        pending, self._pending_load = getattr(self, "_pending_load", None), None
        if pending is None:
            return
        prefix, record, has_weight, was_merged, errors, n_errors = pending
        if len(errors) > n_errors:
            return
        if record:  # a merged layer's state
            if len(record) != 2:
                keys = [prefix + k for k in RECORD_KEYS]
                errors.append(f"{prefix}: a merged layer's state needs both {keys[0]} and {keys[1]}")
                return
            try:
                self._merge_record = record_from_state(*record, self._base_weight(), self._merge_target().adapters)
            except ValueError as e:
                errors.append(f"{prefix}: {e}")
                return
            self.merged = True
        elif not has_weight and was_merged:
            self.merge()  # adapters only: the base W stays, merged with the adapters as they are now
        if self.merge_weights:
            self.merge() if not self.training else self.unmerge()
