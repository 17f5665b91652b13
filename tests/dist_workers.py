"""Two-process runs for tests/test_distributed.py: gloo on 127.0.0.1, a free port, CPU tensors.

`run(worker, *args)` spawns two processes, each sets up the process group and calls ``worker(rank,
*args)``; an assertion in either fails the test with its traceback, a hang fails it after `timeout`.
The workers live here, not in the test file, so the spawned processes import only this small module.
Each builds the same tiny model from the same seed; rank r takes rows r::2 of the batch.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

WORLD = 2
IN, HIDDEN, OUT, R = 21, 25, 13, 3  # odd: FSDP2's shards are uneven


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker, port: int, args: tuple) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors: the kernels run through Triton's interpreter
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        worker(rank, *args)
        dist.barrier()  # no collective left in flight when the group goes
    finally:
        dist.destroy_process_group()


def run(worker, *args, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_entry, args=(worker, free_port(), args), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{worker.__name__} did not finish in {timeout:.0f} s")


# ---------------------------------------------------------------- the model and the data


def tiny_model(dtype=torch.float32, merge_weights=False, use_dora=False) -> nn.Module:
    """Two LoRALinear layers (one stored fan_in_fan_out) with non-zero B, so every gradient is non-zero
    (`use_dora`: DoRA layers, magnitudes from the initial W, so m != n once B is made non-zero)."""
    import fused_lora

    torch.manual_seed(0)
    kw = dict(merge_weights=merge_weights, use_dora=use_dora, dtype=dtype)
    model = nn.Sequential(
        fused_lora.LoRALinear(IN, HIDDEN, R, 8, **kw),
        nn.ReLU(),
        fused_lora.LoRALinear(HIDDEN, OUT, R, 8, fan_in_fan_out=True, **kw),
    )
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_(std=0.3)
    return model


def data(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(8, 3, IN, generator=g).to(dtype), torch.randn(8, 3, OUT, generator=g).to(dtype)


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    nn.functional.mse_loss(model(x), target).backward()


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    from fused_lora.distributed import full

    return {n: full(p.grad) for n, p in model.named_parameters() if "lora_" in n}


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)  # its own unit (resharded after forward) ...
    fully_shard(model, mesh=mesh)  # ... and the root, which holds model[2] (kept unsharded after forward)
    return model


@contextlib.contextmanager
def _kernels_launched(backend: str):
    """With the triton backend, the block must launch the fused kernels (2 layers: 2 shrinks, 2 grads)."""
    from fused_lora.kernels import LAUNCHES

    before = LAUNCHES.copy()
    yield
    if backend == "triton":
        launched = LAUNCHES - before
        assert launched["_shrink_kernel"] == 2 and launched["_lora_grad_kernel"] == 2, launched


def _assert_grads_equal(got: dict, want: dict, count: int = 4) -> None:
    assert got.keys() == want.keys() and len(got) == count, (got.keys(), want.keys())
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------- workers


def ddp_gradients(rank: int, backend: str) -> None:
    """DDP over the fused layers: the averaged gradients equal one process's on the whole batch."""
    import fused_lora

    x, target = data()
    with fused_lora.use_backend(backend):
        single = tiny_model()
        step(single, x, target)
        model = nn.parallel.DistributedDataParallel(tiny_model())
        with _kernels_launched(backend):
            step(model, x[rank::WORLD], target[rank::WORLD])
    _assert_grads_equal(lora_grads(model.module), lora_grads(single))


def fsdp_gradients(rank: int, backend: str) -> None:
    """FSDP2 over the fused layers: the reduce-scattered gradients, gathered, equal one process's."""
    import fused_lora

    x, target = data()
    with fused_lora.use_backend(backend):
        single = tiny_model()
        step(single, x, target)
        model = shard(tiny_model())
        with _kernels_launched(backend):
            step(model, x[rank::WORLD], target[rank::WORLD])
    _assert_grads_equal(lora_grads(model), lora_grads(single))


def fsdp_merge(rank: int) -> None:
    """merge_lora / unmerge_lora and eval() / train() with merge_weights on sharded weights: the merged
    model computes what the unmerged one does, and every round trip restores W bit for bit — also when
    the root unit kept its parameters unsharded after a no-grad forward."""
    import fused_lora
    from fused_lora.distributed import full, is_dtensor

    x, _ = data()
    with fused_lora.use_backend("reference"):
        reference = tiny_model(merge_weights=True).eval()  # merged in one process
        model = shard(tiny_model(merge_weights=True))
        w0 = {n: full(p).clone() for n, p in model.named_parameters() if n.endswith("weight")}
        with torch.no_grad():
            unmerged = model(x)
        assert fused_lora.merge_lora(model) == 2
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            if n.endswith("weight"):  # each rank merged its block: the whole equals a one-process merge
                torch.testing.assert_close(full(p), reference.get_parameter(n), rtol=1e-6, atol=1e-7)
        assert fused_lora.unmerge_lora(model) == 2
        _assert_weights_equal(model, w0)

        model.eval()  # merge_weights: merges
        with torch.no_grad():
            torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        assert not is_dtensor(model[2].weight), "the root unit keeps unsharded copies after a no-grad forward"
        model.train()  # unmerges: must reach the sharded weights FSDP keeps, not only those copies
        _assert_weights_equal(model, w0)
        model(x).sum().backward()  # a training step re-gathers the weights: still the original ones
        _assert_weights_equal(model, w0)

        model.eval()
        records = sum(m._merge_record.index.numel() for m in (model[0], model[2]))
        counts = [None] * WORLD
        dist.all_gather_object(counts, records)
        assert sum(counts) > 0, "plain rounding would have restored W: this run does not test exactness"
        model.train()
        _assert_weights_equal(model, w0)


def _assert_weights_equal(model: nn.Module, w0: dict) -> None:
    from fused_lora.distributed import full

    for n, p in model.named_parameters():
        if n.endswith("weight"):
            changed = (full(p) != w0[n]).sum().item()
            assert changed == 0, f"{n}: {changed} elements differ from the original weight"


def fsdp_adapter_files(rank: int, directory: str) -> None:
    """lora_state_dict gathers whole tensors; save_adapter is collective, rank 0 writes; load_adapter
    fills a fresh sharded model and a fresh one-process model with the same adapters."""
    import fused_lora

    x, _ = data()
    with fused_lora.use_backend("reference"):
        trained = tiny_model()
        model = shard(copy.deepcopy(trained))
        state = fused_lora.lora_state_dict(model)
        assert state.keys() == fused_lora.lora_state_dict(trained).keys()
        for k, v in fused_lora.lora_state_dict(trained).items():
            assert type(v) is torch.Tensor and torch.equal(state[k], v), k

        fused_lora.save_adapter(model, directory)  # every rank returns once the files are there
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]

        plain = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))
        with torch.no_grad():  # the same base weights as `trained` (stored [in, out] there for layer 2)
            plain[0].weight.copy_(trained[0].weight)
            plain[0].bias.copy_(trained[0].bias)
            plain[2].weight.copy_(trained[2].weight.t())
            plain[2].bias.copy_(trained[2].bias)
        assert fused_lora.load_adapter(plain, directory) == ["0", "2"]
        with torch.no_grad():
            torch.testing.assert_close(plain(x), trained(x), rtol=1e-5, atol=1e-5)

        fresh = tiny_model()
        with torch.no_grad():
            for m in (fresh[0], fresh[2]):
                m.lora_A.zero_(), m.lora_B.zero_()
        fresh = shard(fresh)
        fused_lora.load_adapter(fresh, directory)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), trained(x), rtol=1e-5, atol=1e-5)
        for k, v in fused_lora.lora_state_dict(fresh).items():
            assert torch.equal(v, state[k]), k


class InPlaceNet(nn.Module):
    """Every fused layer kind, each followed by an in-place op on its output (as real models do: ReLU
    inplace, a scaled or residual add in place): Embedding, LoRALinear, MergedLinear, Conv1d."""

    def __init__(self) -> None:
        import fused_lora

        super().__init__()
        torch.manual_seed(0)
        self.emb = fused_lora.Embedding(17, IN, r=R, lora_alpha=4)
        self.fc1 = fused_lora.LoRALinear(IN, HIDDEN, R, 8)
        self.act = nn.ReLU(inplace=True)
        self.qkv = fused_lora.MergedLinear(HIDDEN, 3 * OUT, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.conv = fused_lora.Conv1d(3 * OUT, OUT, 3, r=2, lora_alpha=4, padding=1)
        self.fc2 = fused_lora.LoRALinear(OUT, OUT, R, 8, fan_in_fan_out=True)
        with torch.no_grad():
            for n, p in self.named_parameters():
                if "lora_" in n:
                    p.normal_(std=0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h.mul_(2.0)
        h = self.act(self.fc1(h))  # ReLU(inplace=True) on fc1's output
        q = self.qkv(h)
        q += 1.0
        c = self.conv(q.transpose(1, 2))
        c.mul_(0.5)
        y = self.fc2(c.transpose(1, 2))
        y += c.transpose(1, 2)  # a residual added in place
        return y


def peft_in_place_net() -> nn.Module:
    """A PEFT model whose lora.Embedding and lora.Linear are patched to the kernels."""
    import peft

    import fused_lora

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(17, IN), nn.Linear(IN, OUT)

        def forward(self, ids):
            h = self.emb(ids)
            h.mul_(2.0)
            y = self.fc(h)
            y += 1.0
            return y

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=R, lora_alpha=4, target_modules=["emb", "fc"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.3)
    assert len(fused_lora.patch_peft_model(model).patched) == 2
    return model


def fsdp_in_place(rank: int) -> None:
    """FSDP2 with every fused layer its own unit (resharded after forward) and in-place ops on their
    outputs: the pre-backward hooks must still unshard each unit, so the gradients equal one process's
    on the reference backend. With views as outputs the hooks were dropped and backward read freed
    parameters (garbage gradients, different every run)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import fused_lora

    mesh = init_device_mesh("cpu", (WORLD,))
    ids = torch.randint(0, 17, (8, 5), generator=torch.Generator().manual_seed(3))
    target = torch.randn(8, 5, OUT, generator=torch.Generator().manual_seed(4))
    for build, units in ((InPlaceNet, ("emb", "fc1", "qkv", "conv", "fc2")), (peft_in_place_net, None)):
        with fused_lora.use_backend("reference"):
            single = build()
            nn.functional.mse_loss(single(ids), target).backward()
        model = build()
        layers = (
            [getattr(model, u) for u in units] if units else [model.base_model.model.emb, model.base_model.model.fc]
        )
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with fused_lora.use_backend("triton"), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # FSDP2 warns when a unit returns a view
            before = _launches()
            nn.functional.mse_loss(model(ids[rank::WORLD]), target[rank::WORLD]).backward()
            launched = _launches() - before
        assert launched["_lora_grad_kernel"] >= 1 and launched["_lora_embedding_bwd_kernel"] == 1, launched
        got, want = lora_grads(model), lora_grads(single)
        assert got.keys() == want.keys() and len(got) >= 4, (got.keys(), want.keys())
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def dora_distributed(rank: int, directory: str) -> None:
    """DoRA LoRALinear under DDP and FSDP2: gradients of A, B and the magnitude equal one process's (the
    kernels running); with FSDP2, an in-place edit of the sharded base weights between forwards reaches
    the norm (FSDP2 refills its unsharded copies with their version counters preserved, so a ‖W‖² cached
    by version went stale: 0.16 off); reset_magnitude on sharded weights (a collective) equals one
    process's; the adapter files saved from the sharded model load into a one-process model; merge and
    unmerge on sharded weights (a collective) equal a one-process merge and round-trip bit for bit."""
    import fused_lora
    import fused_lora.distributed
    from fused_lora.distributed import full

    x, target = data()
    with fused_lora.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # FSDP2 warns when a unit returns a view
        single = tiny_model(use_dora=True)
        step(single, x, target)
        want = lora_grads(single)
        ddp = nn.parallel.DistributedDataParallel(tiny_model(use_dora=True))
        with _kernels_launched("triton"):
            step(ddp, x[rank::WORLD], target[rank::WORLD])
        _assert_grads_equal(lora_grads(ddp.module), want, 6)
        sharded = shard(tiny_model(use_dora=True))
        with _kernels_launched("triton"):
            step(sharded, x[rank::WORLD], target[rank::WORLD])
        _assert_grads_equal(lora_grads(sharded), want, 6)

    with fused_lora.use_backend("reference"), torch.no_grad():
        single, model = tiny_model(use_dora=True), shard(tiny_model(use_dora=True))
        torch.testing.assert_close(model(x), single(x), rtol=1e-5, atol=1e-6)
        fused_lora.distributed.reshard_all(model)  # the root unit kept unsharded copies after that forward
        for layer in (0, 2):  # the sharded base weights changed in place, as a state_dict load does
            model[layer].weight.to_local().mul_(0.5)
            single[layer].weight.mul_(0.5)
        torch.testing.assert_close(model(x), single(x), rtol=1e-5, atol=1e-6, msg=lambda m: f"after the edit: {m}")
        for layer in (0, 2):
            model[layer].reset_magnitude()
            single[layer].reset_magnitude()
            torch.testing.assert_close(full(model[layer].lora_magnitude), single[layer].lora_magnitude,
                                       rtol=1e-6, atol=1e-7)  # fmt: skip
        torch.testing.assert_close(model(x), single(x), rtol=1e-5, atol=1e-6)

        fused_lora.distributed.reshard_all(model)
        with torch.no_grad():
            for layer in (0, 2):
                model[layer].lora_magnitude.to_local().mul_(1.5)
                single[layer].lora_magnitude.mul_(1.5)
        fused_lora.save_adapter(model, directory)
        fresh = tiny_model(use_dora=True)
        with torch.no_grad():
            for layer in (0, 2):
                fresh[layer].weight.mul_(0.5)
                fresh[layer].lora_A.zero_(), fresh[layer].lora_B.zero_(), fresh[layer].lora_magnitude.zero_()
        fused_lora.load_adapter(fresh, directory)
        torch.testing.assert_close(fresh(x), single(x), rtol=1e-5, atol=1e-6, msg=lambda m: f"loaded: {m}")

        # merge / unmerge as a collective: each rank merges its block with the whole layer's m/n; the merged
        # model computes what the unmerged one does, equals a one-process merge, and unmerges bit for bit
        unmerged = model(x)
        fused_lora.distributed.reshard_all(model)
        w0 = {n: full(p).clone() for n, p in model.named_parameters() if n.endswith("weight")}
        assert fused_lora.merge_lora(model) == 2 and fused_lora.merge_lora(single) == 2
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():
            if n.endswith("weight"):
                torch.testing.assert_close(full(p), single.get_parameter(n), rtol=1e-6, atol=1e-7)
        assert fused_lora.unmerge_lora(model) == 2
        _assert_weights_equal(model, w0)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-6, atol=1e-7)


def _launches():
    from fused_lora.kernels import LAUNCHES

    return LAUNCHES.copy()


# ---------------------------------------------------------------- one spawn per test (imports cost seconds)


def gradients(rank: int) -> None:
    ddp_gradients(rank, "triton")
    fsdp_gradients(rank, "triton")


def in_place(rank: int) -> None:
    fsdp_in_place(rank)


def sharded_state(rank: int, directory: str) -> None:
    fsdp_merge(rank)
    fsdp_adapter_files(rank, directory)


def dora(rank: int, directory: str) -> None:
    dora_distributed(rank, directory)
