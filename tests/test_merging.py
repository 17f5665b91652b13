"""fused_lora.merging: the merge rounds once, the unmerge restores W bit for bit (−0.0 and NaN too), in
chunks, with a compact or a full record; a record that no longer describes W is not used."""

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
    record = merging.merge_exact(w, 40, 24, rows, (0,))
    assert bit_equal(w, (w0.float() + delta).to(dtype))
    merging.unmerge_exact(w, 40, 24, rows, record, (0,))
    assert bit_equal(w, w0)


def test_record_is_compact_or_a_copy():
    w, _, rows = setup(torch.float32, scale=1e-9)  # below W's ulp: nothing is lost (the merge is a no-op)
    record = merging.merge_exact(w, 40, 24, rows, ())
    assert record.chunks[0][1] is not None and record.chunks[0][1].numel() == 0
    w, _, rows = setup(torch.bfloat16, scale=1.0)  # most elements lost: a full copy is smaller
    record = merging.merge_exact(w, 40, 24, rows, ())
    assert record.chunks[0][1] is None and record.chunks[0][2].shape == (40, 24)


def test_a_stale_record_is_not_used():
    """If A/B (versions) or W itself changed while merged, the unmerge subtracts ΔW and leaves W alone
    otherwise: putting back remembered values would undo the change."""
    w, delta, rows = setup(torch.bfloat16, scale=1.0)
    record = merging.merge_exact(w, 40, 24, rows, (0, 0))
    merged = w.clone()
    merging.unmerge_exact(w, 40, 24, rows, record, (1, 0))  # an adapter changed
    assert bit_equal(w, (merged.float() - delta).to(torch.bfloat16))

    w, delta, rows = setup(torch.bfloat16, scale=1.0)
    record = merging.merge_exact(w, 40, 24, rows, (0, 0))
    w.mul_(2)  # W changed (e.g. an optimizer step, max_norm)
    doubled = w.clone()
    merging.unmerge_exact(w, 40, 24, rows, record, (0, 0))
    assert bit_equal(w, (doubled.float() - delta).to(torch.bfloat16))


def test_shape_mismatch_is_an_error():
    w, _, rows = setup(torch.float32)
    with pytest.raises(ValueError, match=r"weight \[40, 24\] does not hold a \[41, 24\] delta"):
        merging.merge_exact(w, 41, 24, rows, ())
