"""Shared test helpers: input factories and the tolerance rule.

Tolerance rule (after flash-attention's tests): a kernel's result must be as close to the float64
reference as plain torch in the same dtype is, within a factor, plus a floor that scales with the
result's magnitude and the dtype's epsilon:

    max|kernel - ref64|  <=  FACTOR * max|torch_same_dtype - ref64|  +  FLOOR * eps(dtype) * max|ref64|
"""

from __future__ import annotations

import torch

FACTOR = 3.0
FLOOR = 4.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_to_ref(
    name: str, got: torch.Tensor, ref64: torch.Tensor, same: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Check `got` against the float64 reference by the rule above; on failure say where and by how much."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    dtype = dtype or got.dtype
    got64, same64, ref64 = got.double().cpu(), same.double().cpu(), ref64.double().cpu()
    if ref64.numel() == 0:
        return
    assert not torch.isnan(got64).any() or torch.isnan(ref64).any(), f"{name}: NaN where the reference has none"
    err = (got64 - ref64).abs()
    torch_err = (same64 - ref64).abs().max().item()
    bound = FACTOR * torch_err + FLOOR * eps(dtype) * ref64.abs().max().item()
    worst = err.max().item()
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name} ({dtype}, shape {tuple(ref64.shape)}): max error {worst:.3e} at {idx} "
            f"(got {got64[idx].item():.6g}, reference {ref64[idx].item():.6g}) exceeds bound {bound:.3e} = "
            f"{FACTOR}*torch_err {torch_err:.3e} + {FLOOR}*eps*max|ref| ({ref64.abs().max().item():.3e}); "
            f"{(err > bound).sum().item()} of {err.numel()} elements over"
        )


def lora_inputs(
    M: int,
    K: int,
    N: int,
    r: int,
    dtype=torch.float32,
    lora_dtype=None,
    bias=True,
    device="cpu",
    lead: tuple[int, ...] | None = None,
    scale_b: float = 0.5,
):
    """x [*lead or M, K], W [N, K], A [r, K], B [N, r] (non-zero, so the low-rank term is tested), bias [N]."""
    lora_dtype = lora_dtype or dtype
    shape = (*lead, K) if lead else (M, K)
    x = torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype)
    w = (torch.randn(N, K) / K**0.5).to(device=device, dtype=dtype)
    a = (torch.randn(r, K) / K**0.5).to(device=device, dtype=lora_dtype)
    b = (torch.randn(N, r) * scale_b).to(device=device, dtype=lora_dtype)
    bb = torch.randn(N).to(device=device, dtype=dtype) if bias else None
    return x, w, a, b, bb


def f64(*ts):
    return [t.double().cpu() if t is not None else None for t in ts]


def host_syncs(fn) -> list[str]:
    """What `fn()` does that makes a GPU wait for the host to read a value: item() (_local_scalar_dense),
    tolist(), nonzero, masked_select, and indexing with a bool mask (a nonzero inside).
    Seen on CPU tensors too, so a test without a GPU can tell that a GPU run would sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
            bool_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
            if name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_index:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    real_tolist = torch.Tensor.tolist  # reads every value back, without dispatching an op on the CPU

    def tolist(t):
        seen.append("tolist")
        return real_tolist(t)

    torch.Tensor.tolist = tolist
    try:
        with Watch():
            fn()
    finally:
        torch.Tensor.tolist = real_tolist
    return seen
