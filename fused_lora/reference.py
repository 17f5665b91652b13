"""The LoRA linear layer in plain PyTorch: the specification every kernel is tested against, the CPU
path, and the 'peft' provider of the benchmarks when PEFT itself is not installed.

    x [..., K], W [N, K], bias [N] or None, A [r, K], B [N, r], s = lora_alpha / r (/ √r with rsLoRA)
    drop(x) = x ⊙ mask / (1 - p) in training with p > 0, x otherwise

    y  = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ
    dX = dY·W + s·mask ⊙ ((dY·B)·A) / (1 - p)
    dA = s·(dY·B)ᵀ·drop(x)        dB = s·dYᵀ·(drop(x)·Aᵀ)
    dW = dYᵀ·x                    dbias = Σ dY

The low-rank path runs in the wider of x's and the adapters' dtypes (PEFT casts x to the adapters'
dtype: the same for 16-bit x with fp32 adapters, which compute that path in fp32; float64 x is not
rounded through fp32 adapters' precision), and the sum is rounded to x's dtype once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_dropout_mask(x: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """A bool keep-mask shaped like x from torch's generator (P(keep) = 1 - p)."""
    return torch.rand(x.shape, device=x.device) >= dropout_p


def dropped(x: torch.Tensor, dropout_p: float, mask: torch.Tensor | None) -> torch.Tensor:
    """drop(x) = x ⊙ mask / (1 - p); x itself when p = 0 or there is no mask."""
    if dropout_p == 0.0 or mask is None:
        return x
    return x * mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    dropout_mask: torch.Tensor | None = None,
    groups: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ, differentiable by autograd.

    `dropout_mask` (bool, x's shape) replaces the random mask: tests pass the kernels' own mask.
    `groups` = (group_n, bounds): output column n uses only rank columns bounds[q] .. bounds[q + 1] of
    its row of B, q = n // group_n. The gradient of B is the dense one (dYᵀ·xa everywhere), as the
    kernels compute it: B is meant to be zero outside the blocks and kept so by the caller (MergedLinear
    builds it from its blocks, so nothing reaches the other entries)."""
    y = F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
    if lora_A.shape[0] == 0:
        return y
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and dropout_mask is None:
        dropout_mask = draw_dropout_mask(x, p)
    if groups is not None:  # forward: only the blocks; gradient of B: dense, as the kernels compute dB
        lora_B = lora_B + (lora_B * group_mask(lora_B, *groups) - lora_B).detach()
    dt = torch.promote_types(x.dtype, lora_A.dtype)
    xd = dropped(x, p, dropout_mask).to(dt)
    low = F.linear(F.linear(xd, lora_A.to(dt)), lora_B.to(dt)) * scaling
    if low.dtype == y.dtype:
        return y + low
    return (y.to(low.dtype) + low).to(y.dtype)  # one rounding of the sum, as PEFT does


def group_mask(lora_B: torch.Tensor, group_n: int, bounds: torch.Tensor) -> torch.Tensor:
    """Bool [N, r]: True where row n of B may be nonzero, rank columns bounds[n // group_n] .. the next bound."""
    N, r = lora_B.shape
    q = torch.arange(N, device=lora_B.device) // group_n
    cols = torch.arange(r, device=lora_B.device)
    lo, hi = bounds[q].unsqueeze(1), bounds[q + 1].unsqueeze(1)
    return (cols >= lo) & (cols < hi)


def lora_linear_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The backward in closed form, for tests: {'x', 'weight', 'bias', 'lora_A', 'lora_B'}, each in the
    dtype of the inputs given (pass float64 for the ground truth)."""
    K, N = x.shape[-1], weight.shape[0]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    mask2 = dropout_mask.reshape(-1, K) if dropout_mask is not None else None
    xd = dropped(x2, dropout_p, mask2)
    g = dy2 @ lora_B  # [M, r]
    dx = dy2 @ weight + scaling * dropped(g @ lora_A, dropout_p, mask2)
    return {
        "x": dx.reshape(x.shape),
        "weight": dy2.t() @ x2,
        "bias": dy2.sum(0),
        "lora_A": scaling * g.t() @ xd,
        "lora_B": scaling * dy2.t() @ (xd @ lora_A.t()),
    }


def merge_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s·B·A [N, K] in fp32: what merging adds to W (and unmerging takes away) — multiplied in float64
    and rounded once to fp32, so no autocast / TF32 setting changes it (fused_lora.merging)."""
    return (lora_B.detach().double() @ lora_A.detach().double()).mul_(scaling).float()
