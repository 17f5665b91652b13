"""The base weight W [N, K] as the fused operators see it: a dense tensor, or a 4-bit
:class:`~fused_lora.quant.QuantizedWeight` handed over as tensors and ints (what a custom operator takes).

    weight, state, info = op_args(W)     # dense: (W, 4 Nones, None); 4-bit: (packed bytes, 4 state tensors, ints)
    with dense(weight, state, info, x.dtype) as w:   # inside an operator: the [N, K] weight the GEMM reads
        y = forward_gemm(..., w, ...)

A dense W is returned as it is. A 4-bit one is dequantised (fused_lora/kernels/dequant.py, one launch) into the shared
scratch (fused_lora/qlora_scratch.py) for the duration of the block — once in the forward for y, once in the
backward for dX — so nothing weight-sized outlives an operator and the autograd graph saves only the packed
bytes (the parameter itself), x, xa and the seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .quant import QuantizedWeight

State = tuple  # (absmax, absmax2, code2, offset): tensors or None (custom operators take no optional lists)


def op_args(weight) -> tuple[torch.Tensor, State, list[int] | None]:
    """(weight tensor, state, info) as the operators take them; `info` is None for a dense weight."""
    if isinstance(weight, QuantizedWeight):
        packed, tensors, info = weight.op_args()
        return packed, (*tensors, None, None, None)[:4], info
    return weight, (None,) * 4, None


def out_features(weight: torch.Tensor, info: list[int] | None) -> int:
    return info[0] if info is not None else weight.shape[0]


def in_features(weight: torch.Tensor, info: list[int] | None) -> int:
    return info[1] if info is not None else weight.shape[1]


def stand_in(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """An [N, K] tensor of `dtype` on the weight's device with no storage of its own (one element, expanded):
    what argument checks that look at a weight's shape, dtype and device are given for a 4-bit one."""
    return torch.empty((), dtype=dtype, device=weight.device).expand(weight.shape)


@contextlib.contextmanager
def dense(weight: torch.Tensor, state: State, info: list[int] | None, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """W [N, K] in `dtype` for the block: `weight` itself when dense; else dequantised into the scratch."""
    if info is None:
        yield weight
        return
    from .qlora_scratch import borrow

    q = QuantizedWeight.from_op_args(weight, [t for t in state if t is not None], info)
    with borrow(q.numel, dtype, q.device) as flat:
        yield q.dequantize(dtype, out=flat)


def dense_copy(weight: torch.Tensor, state: State, info: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` as a tensor of its own (the double backward and the forward-mode rule keep it in
    their graphs), through the ``fused_lora::dequantize_4bit`` operator: torch.func's wrapped tensors and
    FakeTensors reach the kernel as plain ones."""
    if info is None:
        return weight
    return dequantize_4bit(weight, *state, info, dtype)


def dequantized(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit weight as a dense [N, K] tensor of `dtype` of its own (through the operator)."""
    packed, state, info = op_args(weight)
    return dense_copy(packed, state, info, dtype)


@torch.library.custom_op("fused_lora::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    info: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """W [N, K] = dequant(packed) in `dtype` (the kernel, or the reference off the Triton backend)."""
    state = [t for t in (absmax, absmax2, code2, offset) if t is not None]
    return QuantizedWeight.from_op_args(packed, state, info).dequantize(dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, absmax2, code2, offset, info, dtype):
    return packed.new_empty((info[0], info[1]), dtype=dtype)


def _register_vmap() -> None:
    from .opdef import vmap_by_loop

    dequantize_4bit.register_vmap(vmap_by_loop(dequantize_4bit))


_register_vmap()
