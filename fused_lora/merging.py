"""Exact merging for every LoRA layer: W ← round(W + ΔW) with one rounding, and a record that lets the
unmerge restore W bit for bit — also after ``copy.deepcopy``, pickling and a state_dict round trip.

    record = merge_exact(weight, rows, cols, delta_rows, adapters)        # W ← round(W + ΔW), in place
    unmerge_exact(weight, rows, cols, delta_rows, record, adapters)       # W ← what it was before merge

``(rows, cols)`` is the 2-D layout in which a layer defines its delta ([out, in] for a linear layer —
or W's stored [in, out] with fan_in_fan_out —, [num_embeddings, dim] for an embedding, loralib's
[out/groups·k, in·k^(d-1)] for a convolution) and ``delta_rows(r0, r1)`` gives fp32 ΔW for rows r0:r1.
The work runs in row chunks (about 16 M elements each), so the temporaries stay small even for a
large vocabulary.

**The arithmetic does not depend on the caller's settings.** ΔW = s·B·A is a matrix product, and torch
rounds fp32 matrix products differently under ``torch.autocast`` (bf16/fp16 operands), with TF32 allowed
(``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision``, ``torch.set_float32_matmul_precision``)
and with oneDNN's reduced fp32 precision on CPUs that have it — all process- or thread-wide switches
that may differ between a merge and its unmerge (``eval()`` inside an autocast region, ``train()``
outside). So :func:`delta_product` multiplies the factors in float64 — which no autocast or TF32
setting touches — and rounds the product once to fp32: ΔW's bits are the same under every setting, in
every thread, and within an ulp of the exact s·B·A (fp32 products are exact in float64). W + ΔW is then
added in fp32 and rounded once to W's dtype; merge and unmerge run with autocast disabled as well.

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

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import sharing
from .distributed import is_dtensor, reshard_fsdp_owners

CHUNK_ELEMENTS = 1 << 24
RECORD_KEYS = ("unmerge_index", "unmerge_value")
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

DeltaRows = Callable[[int, int], torch.Tensor]
Inverse = Callable[[torch.Tensor, int, int], torch.Tensor]  # (merged rows r0:r1, r0, r1) -> W's rows


def delta_product(b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 s·b·a for b [m, r] and a [r, n] in float64 (see the module docstring): the product of two
    fp32 (or 16-bit) values is exact in float64, the sum of r of them is rounded at 2^-53, and one
    rounding to fp32 follows — the same bits whatever autocast / TF32 / matmul-precision settings are
    active. Cost: m·n·r float64 multiply-adds, once per merge or unmerge."""
    with no_autocast(b.device):
        return torch.mm(b.double(), a.double()).mul_(scaling).to(torch.float32)


def no_autocast(device: torch.device):
    """A context with autocast off for `device`'s type (nothing to do for a type autocast lacks)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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
    inverse: Inverse | None = None,
) -> MergeRecord:
    """W ← round(W + ΔW) in place (ΔW fp32, added in fp32, one rounding); returns the record to undo it.
    `inverse(rows, r0, r1)`: what the unmerge computes from merged rows, when it is not W' − ΔW (DoRA)."""
    work = _Work(weight, rows, cols)
    index, value, merged_at = [], [], []
    for r0, r1 in _chunks(rows, cols):
        w = work.w2[r0:r1]
        d = delta_rows(r0, r1)
        merged = (w.float() + d).to(w.dtype)
        back = inverse(merged, r0, r1) if inverse is not None else (merged.float() - d).to(w.dtype)
        lost = (_bits(back) != _bits(w)).flatten().nonzero().squeeze(1)
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
    inverse: Inverse | None = None,
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
        w.copy_(inverse(w, r0, r1) if inverse is not None else (w.float() - delta_rows(r0, r1)).to(w.dtype))
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
    FSDP2) seen as [rows, cols], ΔW's rows in that layout (fp32, from :func:`delta_product`), the whole
    adapters."""

    weight: torch.Tensor
    rows: int
    cols: int
    delta_rows: DeltaRows
    adapters: tuple[torch.Tensor, ...]
    inverse: Inverse | None = None  # the unmerge's rows from merged ones, when not W' − ΔW (DoRA)


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
        """W += ΔW (ΔW and the sum in fp32 under any autocast / TF32 setting, one rounding to W's dtype);
        the layer then runs as its plain base layer. A ValueError if another module holds W too (tied
        weights: the merge would change that module's output; see fused_lora.sharing)."""
        if not self._has_lora() or self.merged:
            return
        reshard_fsdp_owners(self)
        others = self._shared_with()
        if others:
            raise ValueError(
                f"{type(self).__name__}.merge(): this layer's weight is also held by {sharing.describe(others)} "
                "(tied weights), and merging ΔW into it would change that module's output too. Keep the layer "
                "unmerged (merge_weights=False), or untie the weights first (e.g. give one module a clone)"
            )
        with no_autocast(self._base_weight().device):
            t = self._merge_target()
            self._merge_record = merge_exact(t.weight, t.rows, t.cols, t.delta_rows, t.adapters, t.inverse)
        self.merged = True

    def _merge_by_policy(self) -> None:
        """The merge that ``merge_weights`` asks for (eval(), a load in eval mode): as :meth:`merge`, but a
        shared (tied) W is left unmerged with a warning — the layer's output stays right, unmerged."""
        if not self._has_lora() or self.merged:
            return
        reshard_fsdp_owners(self)
        others = self._shared_with()
        if others:
            warnings.warn(
                f"{type(self).__name__} was not merged (merge_weights=True): its weight is also held by "
                f"{sharing.describe(others)} (tied weights), and merging ΔW into it would change that module's "
                "output too. The layer runs unmerged, which computes the same; pass merge_weights=False to "
                "silence this",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.merge()

    def unmerge(self) -> None:
        """W -= ΔW, undoing :meth:`merge` exactly (unless the adapters changed in between)."""
        if not self._has_lora() or not self.merged:
            return
        reshard_fsdp_owners(self)
        record, self._merge_record = self._merge_record, None
        with no_autocast(self._base_weight().device):
            t = self._merge_target()
            unmerge_exact(t.weight, t.rows, t.cols, t.delta_rows, record, t.adapters, t.inverse)
        self.merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if self.merge_weights:
            self.unmerge() if mode else self._merge_by_policy()
        return self

    def _weight_owner(self) -> tuple[torch.nn.Module, str]:
        """(the module whose parameter W is, its name there): the layer itself, or its ``conv`` child."""
        prefix, _, name = self.WEIGHT_KEY.rpartition(".")
        return (self.get_submodule(prefix) if prefix else self), name

    def _shared_with(self) -> list[torch.nn.Module]:
        """The other modules that hold W (tied weights), by fused_lora.sharing's account."""
        return sharing.other_holders(*self._weight_owner())

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
            self._merge_by_policy()  # adapters only: the base W stays, merged with the adapters as they are now
        if self.merge_weights:
            self._merge_by_policy() if not self.training else self.unmerge()
