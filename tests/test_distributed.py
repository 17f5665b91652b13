"""DDP and FSDP2 with the fused layers, two processes on the CPU (gloo, 127.0.0.1, a free port).

Each test is one spawn of two processes (starting one costs seconds of imports); the workers, in
tests/dist_workers.py, check several things in turn:
- gradients: DDP's averaged gradients and FSDP2's reduce-scattered ones equal a single process's on the
  whole batch, with the kernels running (Triton's interpreter);
- in-place ops on the outputs of every fused layer kind (and patched PEFT layers), each an FSDP2 unit:
  FSDP2's pre-backward hooks still run, gradients equal one process's on the reference backend;
- sharded state: merge_lora / unmerge_lora and eval() / train() with merge_weights on FSDP2's DTensors,
  bit-exact round trips (also when the root unit kept unsharded copies after a no-grad forward);
  lora_state_dict gathers whole tensors; save_adapter (collective, rank 0 writes) and load_adapter into a
  sharded and a one-process model.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import dist_workers

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _interpreter_works() -> bool:  # triton 3.6's interpreter fails with numpy >= 2.4 (the GPU image has 2.5)
    import numpy
    import triton

    ver = lambda v: tuple(int(p) for p in v.split(".")[:2])
    return ver(numpy.__version__) < (2, 4) or ver(triton.__version__) >= (3, 8)


@pytest.fixture(autouse=True)
def _fsdp2():
    if not _interpreter_works():
        pytest.skip("the workers run Triton's interpreter, which triton < 3.8 cannot run with numpy >= 2.4")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)")


def test_ddp_and_fsdp2_gradients_equal_one_process():
    dist_workers.run(dist_workers.gradients)


def test_fsdp2_in_place_ops_on_every_layers_output():
    """Embedding, LoRALinear, MergedLinear, Conv1d and patched PEFT layers, each its own FSDP2 unit, with
    in-place ops on their outputs: gradients equal one process's on the reference backend."""
    pytest.importorskip("peft")
    dist_workers.run(dist_workers.in_place, timeout=300.0)


def test_fsdp2_merge_unmerge_state_dict_and_adapter_files(tmp_path):
    dist_workers.run(dist_workers.sharded_state, str(tmp_path / "adapter"))


def test_dora_under_ddp_and_fsdp2(tmp_path):
    """DoRA LoRALinear: DDP's and FSDP2's gradients (A, B, magnitude) equal one process's; an edit of the
    sharded base weights reaches the norm; reset_magnitude, adapter files, merge and unmerge on sharded
    weights (collectives; the round trip bit-exact)."""
    dist_workers.run(dist_workers.dora, str(tmp_path / "adapter"), timeout=300.0)
