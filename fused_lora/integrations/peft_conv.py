"""Exact conversions between loralib's LoRA convolution factors (ours) and PEFT's.

Both define a weight delta for a convolution with W [out, in, k, …] (groups = 1), L = in·k^(d-1):

    ours (loralib):  ΔW.view(out·k, L)      = s·B·A,      A [r·k, L],      B [out·k, r·k]
    PEFT:            ΔW.view(out, k·L)      = s'·B'·A',   A' [r', k·L],    B' [out, r']
                     (A' is lora_A's weight [r', in, k, …] flattened, B' lora_B's [out, r', 1, …])

Row o·k + c of the first view is the c-th block of L columns of row o of the second, so:

PEFT → ours (any A', B'): A = A'.reshape(r'·k, L) and B = B' ⊗ I_k (Kronecker), rank r = r'. The
product's terms are PEFT's plus exact zeros.

ours → PEFT: if B has that Kronecker form (as after a PEFT → ours load, or while B is still zero), its
inverse, rank r' = r. Otherwise the general exact form: B' = [B[0::k] | B[1::k] | … | B[k-1::k]]
(its rows regrouped, [out, k·r·k]) and A' = blockdiag(A, …, A) (k copies), rank r' = r·k². PEFT's rank
is then k² times ours (the cost of loralib's parametrisation: its delta has rank up to r·k² as a PEFT
[out, k·L] matrix); loading such a file back recognises the block-diagonal A' and restores r.

Every conversion only moves numbers (and zeros): B'·A' equals our (B·A) rearranged, term for term.
"""

from __future__ import annotations

import torch


def _is_kron_identity(lora_B: torch.Tensor, out: int, k: int) -> bool:
    """B == B' ⊗ I_k for some B' [out, r]?"""
    b = lora_B.reshape(out, k, -1, k)  # [o, c, t, c']
    diag = torch.diagonal(b, dim1=1, dim2=3)  # [o, t, c]: entries with c == c'
    off = b.clone()
    torch.diagonal(off, dim1=1, dim2=3).zero_()
    return bool((off == 0).all()) and bool((diag == diag[..., :1]).all())


def conv_to_peft(lora_A: torch.Tensor, lora_B: torch.Tensor, out: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [r', k·L], B' [out, r']) from our A [r·k, L], B [out·k, r·k], exactly (see the module)."""
    rk, L = lora_A.shape
    if k == 1:
        return lora_A, lora_B
    if _is_kron_identity(lora_B, out, k):
        return lora_A.reshape(rk // k, k * L), lora_B.reshape(out, k, rk // k, k)[:, 0, :, 0]
    return torch.block_diag(*([lora_A] * k)), lora_B.reshape(out, k * rk)


def conv_from_peft(A_p: torch.Tensor, B_p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r·k, L], B [out·k, r·k]) from PEFT's A' [r', k·L], B' [out, r'] (both 2-D), exactly."""
    r_p, kL = A_p.shape
    out, L = B_p.shape[0], kL // k
    if k == 1:
        return A_p, B_p
    if r_p % (k * k) == 0:  # our own general form, written by conv_to_peft: undo it, rank r'/k²
        rk = r_p // k
        a0 = A_p[:rk, :L]
        if torch.equal(A_p, torch.block_diag(*([a0] * k))):
            return a0.clone(), B_p.reshape(out, k, rk).reshape(out * k, rk).clone()
    eye = torch.eye(k, dtype=B_p.dtype, device=B_p.device)
    return A_p.reshape(r_p * k, L).clone(), torch.kron(B_p, eye)
