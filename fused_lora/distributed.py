"""What the modules need to know about torch.distributed: FSDP2's sharded parameters (DTensors), and who
writes files.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each parameter as a DTensor sharded across ranks
between forward passes; inside a forward the module holds unsharded plain tensors. Anything that reads or
changes whole parameters outside the forward (merging, saving adapters, state_dicts) therefore has to
gather them (:func:`full`, a collective: every rank calls, in the same order) or change each rank's local
block in place (:func:`local_block`). DDP keeps plain replicated tensors: nothing to gather there.

All of it is a no-op without torch.distributed, so single-process users never pay for it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn


def _dist():
    """torch.distributed when a process group is up, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_dtensor(t) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported: no import (and its cost) here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor is gathered (a collective, finished on return), anything else is
    returned as it is."""
    if not is_dtensor(t):
        return t
    out = t.full_tensor()
    # full_tensor may hand back an AsyncCollectiveTensor that waits at its first use; a rank that never
    # uses it (one that does not write the file) would leave the gather pending at exit. Wait here.
    return out.wait() if hasattr(out, "wait") and callable(out.wait) else out


def local_block(t) -> tuple[slice, ...]:
    """The slices of the global tensor that this rank's local shard of DTensor `t` holds."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(type(p) not in (Shard, Replicate) for p in t.placements):
        raise NotImplementedError(
            f"fused_lora handles DTensors sharded evenly by Shard/Replicate (FSDP2's default), got placements "
            f"{t.placements}"
        )
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


@torch.no_grad()
def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) for a whole `value`, when `param` may be a sharded DTensor (each rank copies its
    block; no communication)."""
    if is_dtensor(param):
        local = param.to_local()
        local.copy_(value[local_block(param)].to(local.device, local.dtype))
    else:
        param.copy_(value.to(param.device, param.dtype))


def reshard_fsdp_owners(module: nn.Module) -> None:
    """Make sure FSDP2 holds `module`'s parameters sharded before they are changed in place.

    A unit with ``reshard_after_forward=False`` (FSDP2's default for the root) keeps unsharded plain copies
    after a forward without grad; an in-place change to those copies is lost at the next reshard, while the
    sharded parameters FSDP keeps stay as they were. Resharding the units that hold `module` first puts
    the DTensors back on it, so a merge or unmerge changes what FSDP keeps. Uses FSDP2's module registry
    (torch-internal); where that is missing nothing is done.
    """
    if _dist() is None or all(is_dtensor(p) for p in module.parameters(recurse=False)):
        return
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch: no FSDP2
        return
    for owner in list(_module_state_mapping):
        if isinstance(owner, FSDPModule) and any(m is module for m in owner.modules()):
            owner.reshard()


def fsdp_managed(module: nn.Module) -> bool:
    """Whether FSDP2 manages `module`'s own parameters (it, or a unit above it, was ``fully_shard``-ed).

    Inside its forward such a module holds unsharded copies that FSDP2 fills by all-gather with their
    version counters preserved (``_unsafe_preserve_version_counter``), so a cache keyed on a tensor's
    version (DoRA's ‖W‖², fused_lora.dora) would miss a change made to the sharded parameters between
    forwards (an in-place edit, a state_dict load). Uses FSDP2's module registry (torch-internal); the
    answer is kept on the module until the registry changes size (a unit added or freed). While
    torch.compile traces, True without looking (nothing is cached then anyway; no registry walk to trace)."""
    if _dist() is None:
        return False
    if torch.compiler.is_compiling():
        return True
    if any(is_dtensor(p) for p in module.parameters(recurse=False)):
        return True
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - older torch: no FSDP2
        return False
    size = len(_module_state_mapping)
    if size == 0:
        return False
    hit = module.__dict__.get("_fused_lora_fsdp_managed")
    if hit is not None and hit[0] == size:
        return hit[1]
    managed = any(
        isinstance(owner, FSDPModule) and any(m is module for m in owner.modules())
        for owner in list(_module_state_mapping)
    )
    module.__dict__["_fused_lora_fsdp_managed"] = (size, managed)
    return managed


def reshard_all(model: nn.Module) -> None:
    """Every FSDP2 unit inside `model` holds its parameters sharded (see :func:`reshard_fsdp_owners`)."""
    if _dist() is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def is_writer() -> bool:
    """Whether this process writes files: rank 0 of the default group, or the only process."""
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers (their `module.` prefix is not part
    of the model's names)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
