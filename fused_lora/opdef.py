"""Custom operators whose autograd is a ``torch.autograd.Function`` with every rule PyTorch asks for.

``torch.library.custom_op`` + ``register_autograd`` gives an operator a reverse-mode rule only: its
generated autograd.Function has no forward-mode rule (``torch.func.jvp`` / ``jacfwd`` and
``torch.autograd.forward_ad`` then see a zero tangent, silently) and no ``setup_context``
staticmethod (``torch.func.grad`` / ``jacrev`` / ``hessian`` refuse it). Here the operator is defined
with the same public pieces underneath — ``torch.library.Library.define`` (schema inferred from the
Python signature), an implementation, ``register_fake``, ``register_vmap`` — and its Autograd kernel
applies an autograd.Function of ours, which has ``setup_context``, ``backward`` and ``jvp``:

    op = define("lora_linear_fwd", impl, fake)        # fused_lora::lora_linear_fwd
    attach_autograd(op, LinearRules)                  # LinearRules.forward calls below_autograd(op, ...)

torch.compile sees only the operator (opaque, its fake implementation gives shapes), so the
Function's custom ``jvp`` never meets dynamo (which refuses those); AOT autograd runs the Function
when it traces the joint graph, as it runs register_autograd's.

Three pieces are torch's own, not public API, used as torch.func uses them for its single-level
functions: ``torch.autograd.function._SingleLevelFunction`` (a Function applied by the C++ apply),
``enable_single_level_autograd_function`` (which lets one run under a transform) and
``forward_ad._set_fwd_grad_enabled`` / ``_current_level``. tests/test_autograd_surface.py checks every
transform and their compositions on the installed torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad
from torch._functorch.utils import enable_single_level_autograd_function

_infer_schema = getattr(torch.library, "infer_schema", None)
if _infer_schema is None:  # torch 2.4: not yet public
    from torch._library.infer_schema import infer_schema as _infer_schema

NAMESPACE = "fused_lora"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(name: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """``fused_lora::<name>`` with `impl` on every device (CompositeExplicitAutograd) and `fake` for
    FakeTensor tracing and the meta device; outputs must be fresh tensors (no aliasing of inputs)."""
    schema = _infer_schema(impl, mutates_args=())
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _needs_autograd(args: tuple) -> bool:
    """Whether a call (outside torch.func) must go through the rules: a forward-AD level is open (an
    input may carry a tangent), or grad mode is on and an input requires grad."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


class Rules(torch.autograd.function._SingleLevelFunction):
    """Base of an operator's autograd rules: an autograd.Function (``forward`` / ``setup_context`` /
    ``backward`` / ``jvp`` staticmethods) applied by the C++ ``Function.apply`` itself. The public
    ``torch.autograd.Function.apply`` hands a call made under a torch.func transform to functorch's
    ``custom_function_call``, which must run *before* the dispatcher; an Autograd kernel runs inside it,
    where the dispatcher has already brought the call to the transform's level and the tensors are that
    level's, so the rules apply as an ATen operator's derivative formulas do (torch.func's own
    single-level functions are this class)."""


def attach_autograd(op: torch._ops.OpOverload, rules: type[Rules]) -> None:
    """Make `rules` (taking op's arguments, its forward ``below_autograd(op, *args)``) the op's Autograd
    kernel. A call that needs no autograd skips it."""

    def kernel(keyset, *args):
        if torch._C._are_functorch_transforms_active():
            with enable_single_level_autograd_function():  # what torch.func's own single-level rules run under
                return rules.apply(*args)
        if _needs_autograd(args):
            return rules.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _LIB.impl(op._schema.name.split("::")[-1], kernel, "Autograd", with_keyset=True)


def below_autograd(op: torch._ops.OpOverload, *args):
    """op(*args) past the Autograd kernel: the forward of the op's own rules calls this, so they are not
    applied twice. ``Function.apply`` runs a forward with reverse and forward mode off; under a torch.func
    transform the levels below this one must see them on (their interpreters apply their own modes), as
    torch.func's own single-level functions turn them back on — else e.g. jvp(grad(f)) loses its tangent."""
    modes = contextlib.nullcontext()
    if torch._C._are_functorch_transforms_active():
        modes = contextlib.ExitStack()
        modes.enter_context(torch.enable_grad())
        modes.enter_context(forward_ad._set_fwd_grad_enabled(True))
    with modes, torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def unflatten(t: torch.Tensor, lead: torch.Size | tuple, last: int) -> torch.Tensor:
    """A kernel's fresh [M, last] output as [*lead, last] that is *not* an autograd view: an in-place op
    on a view rebases the caller's graph past the view's node, and FSDP2's pre-backward hook (which
    hangs on the layer's output) would never run. Called inside an operator's implementation, where the
    kernel's tensor has no other owner; the result shares its storage and version counter."""
    return t.view(*lead, last).detach()


def vmap_by_loop(op: Callable):
    """A vmap rule for `op`: one call per batch element (the batched arguments sliced), the outputs stacked
    along a new dim 0 — the rule for an operator whose batch cannot be folded into its rows."""

    def rule(info, in_dims, *args):
        outs = []
        for b in range(info.batch_size):
            outs.append(op(*(a.select(d, b) if d is not None else a for a, d in zip(args, in_dims))))
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under torch.func's wrappers (under vmap: the whole batch), for a check that reads
    values, which a wrapped tensor cannot give."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t
