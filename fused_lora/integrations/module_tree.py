"""A model's module tree as the adapter files name it, and changes to it that happen whole or not at all.

Names. ``torch.compile(model)`` wraps the model in an ``OptimizedModule`` whose ``_orig_mod.`` prefix is
no part of the model's architecture, and neither is DDP's ``module.``: PEFT's files (``base_model.model.``
+ the name) and ``target_modules`` name the modules of the plain model. So here a model is unwrapped
(DDP, DataParallel, torch.compile, in any nesting), and an ``OptimizedModule`` met further down (a block
compiled on its own, as torchtitan compiles each transformer block) is looked through: ``layers.0`` is
the block, ``layers.0.attn.q_proj`` a layer inside it, with no ``_orig_mod`` anywhere.

Changes. :func:`all_or_nothing` records what a change to a model does — modules put in place, the
``requires_grad`` flag of every parameter (the LoRA constructors freeze the weight they share), and any
undo step the caller registers — and undoes all of it if anything raises before the block ends, so a
refused ``inject_lora`` / ``load_adapter`` leaves the model as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.nn as nn

from ..distributed import unwrap as _unwrap_parallel


def _compiled_type() -> type | None:
    # An OptimizedModule exists only once torch._dynamo is imported (torch.compile imports it): no import here.
    module = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(module, "OptimizedModule", None)


def look_through(module: nn.Module) -> nn.Module:
    """The module inside torch.compile's wrappers (itself when it is not compiled)."""
    compiled = _compiled_type()
    while compiled is not None and isinstance(module, compiled):
        module = module._orig_mod
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers, in any nesting."""
    while True:
        inner = look_through(_unwrap_parallel(model))
        if inner is model:
            return model
        model = inner


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) as ``model.named_modules()`` yields them (each module once, under its first name),
    with torch.compile's wrappers looked through: no ``_orig_mod`` in the names, the wrapped module in
    place of its wrapper."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str):
        module = look_through(module)
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)

    yield from walk(model, "")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at dotted path `name` (as :func:`named_modules` names it)."""
    module = look_through(model)
    for part in name.split(".") if name else ():
        child = module._modules.get(part)
        if child is None:
            raise ValueError(f"the model has no module {name!r} ({type(module).__name__} has no child {part!r})")
        module = look_through(child)
    return module


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name`. A compiled module there (torch.compile of that one layer) is
    replaced by `module` compiled the same way (same backend and options)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = parent._modules.get(child)
    compiled = _compiled_type()
    if compiled is not None and isinstance(old, compiled):
        module = compiled(module, old.dynamo_ctx)
    setattr(parent, child, module)


class _Change:
    """What :func:`all_or_nothing` has done so far, and how to undo it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        self._undo: list[Callable[[], None]] = []

    def replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = get_module(self.model, parent_name)
        old = parent._modules[child]
        self._undo.append(lambda: setattr(parent, child, old))
        replace_module(self.model, name, module)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Run `step` if the change is undone (steps run in the reverse of their order)."""
        self._undo.append(step)

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()
        for p, flag in self._flags:
            p.requires_grad_(flag)


@contextmanager
def all_or_nothing(model: nn.Module):
    """``with all_or_nothing(model) as change: ...``: if the block raises, every module put in place with
    ``change.replace``, every step registered with ``change.on_undo`` and every parameter's
    ``requires_grad`` flag are put back as they were, and the error propagates."""
    change = _Change(model)
    try:
        yield change
    except BaseException:
        change.undo()
        raise
