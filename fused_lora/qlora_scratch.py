"""The dense-weight scratch that 4-bit layers dequantise into: one buffer per (device, dtype, stream),
shared by every layer, grown to the largest weight, never one per layer.

    with borrow(N * K, torch.bfloat16, device) as flat:   # flat [N·K] view of the shared buffer
        w = flat.view(N, K); dequantise into w; launch the GEMM that reads w

A 4-bit layer's forward dequantises W into the buffer and launches the GEMM; its backward does the same
for dX. Nothing weight-sized lives beyond one op: QLoRA keeps its memory saving (one buffer of the
largest layer's N·K elements per dtype and stream, 117 MB in bf16 for a Llama-3-8B MLP projection).

The rules that make sharing safe:

- **Streams.** Work is ordered within a CUDA stream, not across streams: the next layer's dequantisation
  is queued behind this layer's GEMM only on the same stream. So each stream gets its own buffer (keyed
  by the current stream when the op runs; autograd runs a backward op on its forward's stream).
- **Threads.** Two threads queueing on one stream could interleave "dequantise L1, dequantise L2, GEMM
  L1" — L1's GEMM would read L2's weight. Each buffer has a lock, held from the dequantisation until the
  GEMM is queued (not until it runs: the stream orders the rest), so a thread's pair is contiguous.
- **Re-entrancy.** A thread that asks again while it holds its buffer (nothing in fused_lora does; a
  hook calling another 4-bit layer inside a GEMM launch would) gets a private temporary, never the busy
  buffer. Activation checkpointing re-runs a forward during backward, one op after another: no nesting.
- **CUDA graphs.** A captured graph keeps the addresses it was captured with. A buffer used during a
  capture is never freed: if it later has to grow, the old one is kept alive beside the new one.
- **torch.compile.** The custom operators are opaque: their bodies, and so this module, run at run time
  with real tensors; fake tensors never reach it.

:func:`scratch_bytes` tells how much is held, :func:`release` drops the buffers (e.g. before inference
with a different model); both are for people and tests, not needed in a training loop.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class _Slot:
    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.captured = False  # used during a CUDA graph capture: never freed
        self.kept: list[torch.Tensor] = []  # outgrown buffers a captured graph may still use


_SLOTS: dict[tuple, _Slot] = {}
_REGISTRY = threading.Lock()


def _stream_key(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream  # a host-side handle: no sync


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def borrow(numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
    """A flat [numel] tensor of `dtype` on `device`, this thread's to use until the block ends (see the
    module docstring for the rules). Its contents are whatever the last user left."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, dtype, _stream_key(device))
    with _REGISTRY:
        slot = _SLOTS.setdefault(key, _Slot())
    me = threading.get_ident()
    if slot.owner == me:  # re-entered: never hand out a buffer this thread is using
        yield torch.empty(numel, dtype=dtype, device=device)
        return
    with slot.lock:
        slot.owner = me
        try:
            if slot.buf is None or slot.buf.numel() < numel:
                if slot.buf is not None and slot.captured:
                    slot.kept.append(slot.buf)
                slot.buf = torch.empty(numel, dtype=dtype, device=device)
            slot.captured = slot.captured or _capturing(device)
            yield slot.buf[:numel]
        finally:
            slot.owner = None


def scratch_bytes() -> dict[tuple[str, str], int]:
    """{(device, dtype): bytes held}, summed over streams (outgrown buffers a CUDA graph keeps included)."""
    out: dict[tuple[str, str], int] = {}
    with _REGISTRY:
        for (device, dtype, _), slot in _SLOTS.items():
            held = [t for t in [slot.buf, *slot.kept] if t is not None]
            key = (str(device), str(dtype).removeprefix("torch."))
            out[key] = out.get(key, 0) + sum(t.numel() * t.element_size() for t in held)
    return out


def release() -> None:
    """Drop every buffer no thread is using and no CUDA graph captured."""
    with _REGISTRY:
        for key, slot in list(_SLOTS.items()):
            if slot.owner is None and not slot.captured:
                del _SLOTS[key]
