"""fused_lora.merging: the merge rounds once, the unmerge restores W bit for bit (−0.0 and NaN too), in
chunks, recording only the elements rounding would not restore; a record is used only for the adapters it
was made with, and only where W still holds what the merge wrote."""

from __future__ import annotations

import pytest
import torch

from fused_lora import merging

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def setup(dtype, rows=40, cols=24, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    delta = torch.randn(rows, cols, generator=g) * scale
    return w, delta, (lambda r0, r1: delta[r0:r1])


def bit_equal(a, b) -> bool:
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("dtype", list(BITS))
@pytest.mark.parametrize("chunk", [1 << 24, 100])  # one chunk, and 5-row chunks
def test_round_trip_is_bit_exact(dtype, chunk, monkeypatch):
    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", chunk)
    w, delta, rows = setup(dtype)
    w[0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])
    w0 = w.clone()
    naive = ((w.float() + delta).to(dtype).float() - delta).to(dtype)
    assert not bit_equal(naive, w0), "plain rounding would have restored W: the test proves nothing"
    adapters = (torch.ones(2, 3),)
    record = merging.merge_exact(w, 40, 24, rows, adapters)
    assert bit_equal(w, (w0.float() + delta).to(dtype))
    merging.unmerge_exact(w, 40, 24, rows, record, adapters)
    assert bit_equal(w, w0)


def test_record_holds_only_the_elements_rounding_loses():
    w, _, rows = setup(torch.float32, scale=1e-9)  # below W's ulp: nothing is lost (the merge is a no-op)
    assert merging.merge_exact(w, 40, 24, rows, ()).index.numel() == 0
    w, delta, rows = setup(torch.bfloat16, scale=1.0)
    w0 = w.clone()
    record = merging.merge_exact(w, 40, 24, rows, ())
    lost = ((w.float() - delta).to(torch.bfloat16) != w0).flatten().nonzero().squeeze(1)
    assert torch.equal(record.index, lost) and torch.equal(record.value, w0.flatten()[lost])


def test_a_stale_record_is_not_used():
    """If the adapters changed while merged, the unmerge only subtracts ΔW; if W itself changed, the
    elements that changed are left as the subtraction makes them (putting back remembered values would
    undo the change), the others are restored."""
    a0, a1 = (torch.zeros(2, 2),), (torch.ones(2, 2),)
    w, delta, rows = setup(torch.bfloat16, scale=1.0)
    record = merging.merge_exact(w, 40, 24, rows, a0)
    merged = w.clone()
    merging.unmerge_exact(w, 40, 24, rows, record, a1)  # an adapter changed
    assert bit_equal(w, (merged.float() - delta).to(torch.bfloat16))

    w, delta, rows = setup(torch.bfloat16, scale=1.0)
    w0 = w.clone()
    record = merging.merge_exact(w, 40, 24, rows, a0)
    w[:20].mul_(2)  # W changed in its first half (e.g. an optimizer step, max_norm)
    changed = w.clone()
    merging.unmerge_exact(w, 40, 24, rows, record, a0)
    assert bit_equal(w[:20], (changed[:20].float() - delta[:20]).to(torch.bfloat16))
    assert bit_equal(w[20:], w0[20:])


def test_record_survives_copies_and_state():
    """The record compares adapters by value: a deepcopy'd record (new tensors, new version counters)
    still restores W exactly, and so does one rebuilt from its (index, value) state."""
    import copy

    w, _, rows = setup(torch.float16, scale=0.5)
    w0, adapters = w.clone(), (torch.randn(3, 4), torch.randn(5, 3))
    record = copy.deepcopy(merging.merge_exact(w, 40, 24, rows, adapters))
    rebuilt = merging.record_from_state(record.index, record.value, w, tuple(a.clone() for a in adapters))
    w2 = w.clone()
    merging.unmerge_exact(w, 40, 24, rows, record, adapters)
    merging.unmerge_exact(w2, 40, 24, rows, rebuilt, adapters)
    assert bit_equal(w, w0) and bit_equal(w2, w0)


def test_shape_mismatch_is_an_error():
    w, _, rows = setup(torch.float32)
    with pytest.raises(ValueError, match=r"weight \[40, 24\] does not hold a \[41, 24\] delta"):
        merging.merge_exact(w, 41, 24, rows, ())
