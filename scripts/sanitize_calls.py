"""One small call of every kernel and configuration family, for compute-sanitizer on a GPU machine:

    compute-sanitizer --tool memcheck  python scripts/sanitize_calls.py
    compute-sanitizer --tool racecheck python scripts/sanitize_calls.py --quick

Odd sizes (no multiple of any block), every configuration of every kernel forced through the tuner
(``--quick``: one per epilogue shape), both GEMM paths (TMA, pointers), both implementations, bf16 with
bf16 and fp32 adapters, fp32, dropout on and off, the Embedding and MergedLinear kernels, and the
deterministic kernels. Each result is
checked against the fp64 reference loosely (the parity tests check tightly): a sanitizer run must also
compute the right thing. Prints one line per family and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

import fused_lora
from fused_lora import reference
from fused_lora.kernels import configs, tuning


def _cases(quick: bool):
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    for dtype, adapter in (
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
    ):
        for p in (0.0, 0.1):
            for path in ("tma", "pointer"):
                # only configurations the tuner admits for this variant (a forced one that is not a
                # candidate would be ignored without a word); --quick: one per (SUBTILES, BLOCK_K)
                e, tma = dtype.itemsize, path == "tma" and arch >= 90
                gemm = [c for c in configs.GEMM if configs.keep_gemm(c, e, p > 0, arch, tma, adapter.itemsize)]
                if quick:
                    gemm = list({(c.SUBTILES, c.BLOCK_K): c for c in reversed(gemm)}.values())
                for c in gemm:
                    yield dict(dtype=dtype, adapter=adapter, p=p, path=path, impl="fused", gemm=configs.name(c))
            yield dict(dtype=dtype, adapter=adapter, p=p, path="tma", impl="hybrid", gemm=None)
    for c in [] if quick else configs.SHRINK:
        yield dict(dtype=torch.bfloat16, adapter=torch.float32, p=0.1, path="tma", impl="fused", shrink=configs.name(c))
    for c in [] if quick else configs.GRAD:
        yield dict(dtype=torch.bfloat16, adapter=torch.float32, p=0.1, path="tma", impl="fused", grad=configs.name(c))


def run_case(case: dict, deterministic: bool = False) -> float:
    """Relative max error of y and the three gradients against fp64 for one forced family."""
    torch.manual_seed(0)
    M, K, N, r = 203, 328, 264, 12  # odd tiles; 16-byte aligned rows for the TMA path (bf16: K % 8 == 0)
    dev = "cuda"
    x = torch.randn(M, K, device=dev).to(case["dtype"]).requires_grad_()
    w = (torch.randn(N, K, device=dev) / K**0.5).to(case["dtype"])
    a = (torch.randn(r, K, device=dev) / K**0.5).to(case["adapter"]).requires_grad_()
    b = (torch.randn(N, r, device=dev) * 0.5).to(case["adapter"]).requires_grad_()
    bias = torch.randn(N, device=dev).to(case["dtype"])
    dy = torch.randn(M, N, device=dev).to(case["dtype"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(fused_lora.use_backend("triton"))
        stack.enter_context(fused_lora.use_impl(case["impl"]))
        stack.enter_context(tuning.force("gemm_path", case["path"]))
        for table in ("gemm", "shrink", "grad"):
            if case.get(table):
                stack.enter_context(tuning.force(table, case[table]))
        torch.manual_seed(1)
        y = fused_lora.lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=case["p"])
        y.backward(dy)
    torch.cuda.synchronize()
    mask = None
    if case["p"] > 0:
        torch.manual_seed(1)
        seed = fused_lora.function._draw_seed(x.device)
        mask = fused_lora.kernels.dropout_mask(seed, M, K, case["p"])
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = reference.lora_linear(leaves[0], w.double(), leaves[1], leaves[2], 2.0, bias.double(), case["p"],
                                dropout_mask=mask)  # fmt: skip
    ref.backward(dy.double())
    worst = 0.0
    for got, want in ((y, ref), (x.grad, leaves[0].grad), (a.grad, leaves[1].grad), (b.grad, leaves[2].grad)):
        worst = max(worst, ((got.double() - want.detach()).abs().max() / want.detach().abs().max()).item())
    return worst


def _layer_error(layer: torch.nn.Module, inp: torch.Tensor) -> float:
    """Relative max error of the output and the LoRA gradients, triton backend against reference."""
    torch.nn.init.normal_(layer.lora_A, std=0.05)  # loralib's init zeroes one factor: make both matter
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    results = []
    for backend in ("triton", "reference"):
        layer.zero_grad(set_to_none=True)
        with fused_lora.use_backend(backend):
            y = layer(inp)
            y.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        results.append([y.detach().double(), layer.lora_A.grad.double(), layer.lora_B.grad.double()])
    return max(((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(*results))


def _embedding() -> float:
    torch.manual_seed(2)
    layer = fused_lora.Embedding(1003, 136, r=12, lora_alpha=24, device="cuda", dtype=torch.bfloat16,
                                 lora_dtype=torch.float32)  # fmt: skip
    idx = torch.randint(0, 1003, (7, 29), device="cuda")
    idx[0, :5] = 17  # repeated indices: the scatter of dA accumulates
    return _layer_error(layer, idx)


def _merged() -> float:
    torch.manual_seed(3)
    layer = fused_lora.MergedLinear(328, 3 * 264, r=12, lora_alpha=24, enable_lora=[True, False, True],
                                    device="cuda", dtype=torch.bfloat16)  # fmt: skip
    return _layer_error(layer, torch.randn(203, 328, device="cuda", dtype=torch.bfloat16))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="one GEMM configuration per epilogue shape, no shrink/grad sweep"
    )
    ns = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    bad = 0
    for case in _cases(ns.quick):
        err = run_case(case)
        tol = 3e-2 if case["dtype"] == torch.bfloat16 else 1e-3
        label = ", ".join(f"{k}={v}" for k, v in case.items() if v is not None)
        print(f"{'ok  ' if err < tol else 'FAIL'} {err:.2e}  {label}", flush=True)
        bad += err >= tol
    for name, fn in (("Embedding (gather + low rank, scatter dA)", _embedding), ("MergedLinear (groups)", _merged)):
        err = fn()
        print(f"{'ok  ' if err < 3e-2 else 'FAIL'} {err:.2e}  {name}", flush=True)
        bad += err >= 3e-2
    torch.use_deterministic_algorithms(True)
    err = run_case(dict(dtype=torch.bfloat16, adapter=torch.float32, p=0.1, path="tma", impl="fused"))
    print(f"{'ok  ' if err < 3e-2 else 'FAIL'} {err:.2e}  deterministic kernels", flush=True)
    bad += err >= 3e-2
    print(f"{bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
