"""Which implementation runs a call: the Triton kernels or the plain-PyTorch reference.

    auto       CUDA tensors -> triton, anything else -> reference (the default)
    triton     always the kernels; CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter); on the
               meta device the autograd Function runs shape-only (nothing is launched)
    reference  always fused_lora.reference

Chosen, most specific first, by :func:`use_backend` (a context manager scoped to the current thread or
asyncio task, restored on exit), :func:`set_backend` (the process), the environment variable
``FUSED_LORA_BACKEND``, then ``auto``. Read at every call, so a test or a script can switch without
re-importing anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .setting import Setting

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FUSED_LORA_BACKEND"
_SETTING = Setting("backend", BACKENDS, ENV_VAR)


def set_backend(name: str | None) -> None:
    """Force a backend for this process ('auto', 'triton', 'reference'); None returns to the
    environment variable / auto."""
    _SETTING.set(name)


def get_backend() -> str:
    """The configured backend name (before 'auto' is resolved for a device)."""
    return _SETTING.get()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("reference"): ...`` runs the block with that backend in this thread (or asyncio
    task) only, then restores what was there; other threads keep their own choice."""
    with _SETTING.use(name):
        yield


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_EXACT_BF16_DOT = [0]  # how many exact_bf16_dot() blocks are open


def bf16_dot_wrong() -> bool:
    """True when bf16 matrix products would come out wrong: under Triton's interpreter, which multiplies
    the raw uint16 bits of bf16 operands (values ~1e10, triton-lang/triton#11584), unless
    :func:`exact_bf16_dot` is active. Callers then refuse bf16 or fall back to the reference."""
    return interpreting() and not _EXACT_BF16_DOT[0]


@contextlib.contextmanager
def exact_bf16_dot() -> Iterator[None]:
    """Within the block, Triton's interpreter multiplies bf16 operands by their values: each is widened
    to fp32 (exact: the bf16 bits are fp32's high half) and the product accumulates in fp32, as the
    tensor cores do (a bf16·bf16 product is exact in fp32). Patches the interpreter's ``create_dot`` for
    the process (not thread-local: the interpreter runs one launch at a time) and restores it on exit.
    For tests that need bf16 kernel parity on the CPU; outside the interpreter it does nothing."""
    if not interpreting():
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(t):
        if t.dtype.scalar == tl.bfloat16:
            data = (t.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        return t

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    _EXACT_BF16_DOT[0] += 1
    try:
        yield
    finally:
        _EXACT_BF16_DOT[0] -= 1
        builder.create_dot = original


def resolve_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`. Under torch.compile it is read once, when a
    graph is traced, and baked into it (switching backends afterwards needs ``torch._dynamo.reset()``)."""
    name = get_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" else "reference"
    if name == "triton" and device.type not in ("cuda", "meta") and not interpreting():
        raise ValueError(
            f"the triton backend runs on CUDA tensors, but the inputs are on {device}; set "
            f"TRITON_INTERPRET=1 (before triton is imported) to run the kernels on the CPU through "
            f"Triton's interpreter, or use the 'reference' backend"
        )
    return name


# What torch.compiler.assume_constant_result(resolve_backend) does — dynamo calls it at trace time and
# treats the result as a constant (its contextvar read is not traceable) — without importing torch._dynamo
# here: that imports triton, and a CPU user who sets TRITON_INTERPRET=1 after `import fused_lora` would
# then get compiled, not interpreted, helpers (tests/test_bench_cli.py checks the import stays light).
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]
