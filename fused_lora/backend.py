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
