"""Dequantise bitsandbytes' 4-bit storage (NF4 / FP4) to a 16- or 32-bit weight, in one launch.

    packed [ceil(T / 2)] uint8, T = N·K elements of W [N, K] in row-major (flat) order
    element e: nibble (packed[e // 2] >> 4) for even e (high nibble first), packed[e // 2] & 15 for odd e
    block  b = e // blocksize (blocks run across rows: K need not be a multiple of the blocksize)
    scale  absmax[b]                                              plain: fp32 (16-bit absmax is cast, exact)
           fl32(fl32(code2[qabs[b]] · absmax2[b // bs2]) + offset)  double quantisation: qabs uint8,
                                                                  code2 [256] fp32, absmax2 fp32, offset fp32
    W[e]   = round_out(fl32(lut[nibble] · scale))                 lut: the 16 NF4 / FP4 values (fp32)

which is, operation for operation and rounding for rounding, what bitsandbytes computes:
``dequantize_blockwise`` (code2 · absmax2, one fp32 product) then ``absmax += offset`` (one fp32 sum)
for the nested scale, then its 4-bit kernel's ``lut[q] * absmax`` in fp32, stored in the output type
(round to nearest even). The kernel is compiled with ``enable_fp_fusion=False``: a contracted fma of
``code2 · absmax2 + offset`` would round once instead of twice and differ from bitsandbytes in the last
bit. The value table is bitsandbytes' CUDA kernel's (fused_lora.quant holds it and the format notes);
FP4 code 0b1000 is −0.0 there (sign · 0), as it is here.

Each program owns BLOCK consecutive elements as a [BLOCK / GROUP, GROUP] tile, GROUP = min(blocksize,
BLOCK), so one tile row shares one scale: BLOCK / 2 bytes in (one pass, vector loads), BLOCK values out
(one pass, vector stores), BLOCK / GROUP scale loads, and one table gather per element from a 64-byte
table that stays in L1. Memory-bound: 2.5 bytes per element moved for bf16/fp16 output (0.5 in, 2 out),
4.5 for fp32 (docs/design.md §13 has the bandwidth floor).

Under Triton's interpreter an fp32 → bf16 cast truncates (the GPU's ``cvt.rn`` rounds to nearest even),
so there the launcher asks for the rounding to be done on the bits (BF16_BITS); compiled kernels use the
hardware conversion.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .configs import DequantConfig, dequant_table
from .configs import launch_kwargs as config_kwargs
from .configs import name as config_name
from .utils import bucket, interpreting, launch

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# fmt: off
@triton.jit
def _dequant4bit_kernel(
    # pointers: packed nibbles, per-block scale (fp32, or uint8 codes when nested), the nested scale's
    # fp32 per-group scale, its 256-entry code and its offset [1], the 16-entry value table, the output
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, lut_ptr, out_ptr,
    # sizes: elements, packed bytes (numel + 1) // 2, blocks, the nested scale's blocksize
    numel, n_bytes, n_blocks, blocksize2,
    # meta-parameters
    LOG2_BS: tl.constexpr, NESTED: tl.constexpr, BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr, GROUP: tl.constexpr,
):
    # fmt: on
    ROWS: tl.constexpr = BLOCK // GROUP
    HALF: tl.constexpr = GROUP // 2
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    row_e = pid * BLOCK + rows * GROUP  # first element of each tile row (all of a row shares one block)

    byte = (pid * (BLOCK // 2) + rows * HALF)[:, None] + tl.arange(0, HALF)[None, :]  # [ROWS, HALF]
    q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    nib = tl.interleave(q >> 4, q & 15).to(tl.int32)  # [ROWS, GROUP]: high nibble first
    value = tl.load(lut_ptr + nib)

    blk = row_e >> LOG2_BS
    blk_ok = blk < n_blocks
    if NESTED:
        qabs = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // blocksize2, mask=blk_ok, other=0.0)
        scale = tl.load(code2_ptr + qabs) * scale2  # one fp32 product, as dequantize_blockwise
        scale = scale + tl.load(offset_ptr)  # then one fp32 sum, as `absmax += offset` (no fma)
    else:
        scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0).to(tl.float32)
    w = value * scale[:, None]

    e = row_e[:, None] + tl.arange(0, GROUP)[None, :]
    ok = e < numel
    if BF16_BITS:  # round to nearest even on the bits (the interpreter's own cast truncates); NaN kept
        bits = w.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(w != w, bits >> 16, rounded)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + e, rounded.to(tl.int16), mask=ok)
    else:
        tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=ok)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def value_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 fp32 values of `quant_type` on `device` (made once per device)."""
    key = (quant_type, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        from fused_lora.quant import code_values  # the format's one description (no bitsandbytes needed)

        table = _TABLES[key] = code_values(quant_type).to(device)
    return table


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    out: torch.Tensor,
    *,
    quant_type: str,
    blocksize: int,
    nested: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Write W = dequant(packed) into `out` (contiguous [N, K], fp16 / bf16 / fp32) and return it.

    packed: uint8, contiguous, at least ceil(N·K / 2) bytes (bitsandbytes' [(N·K + 1) // 2, 1]; other
    quant_storage dtypes are to be viewed as uint8 by the caller). absmax: [ceil(N·K / blocksize)] fp32
    (or 16-bit), or uint8 codes when `nested` = (absmax2 fp32, code2 fp32 [256], offset fp32 [1],
    blocksize2) is given. Shapes and dtypes are the caller's contract (fused_lora.quant checks them);
    this launcher only checks what would make the kernel read out of bounds.
    """
    numel = out.numel()
    if not out.is_contiguous() or out.dtype not in OUT_DTYPES:
        raise ValueError(f"out must be a contiguous fp16/bf16/fp32 tensor, got {out.dtype} strides {out.stride()}")
    if packed.dtype != torch.uint8 or not packed.is_contiguous() or packed.numel() < (numel + 1) // 2:
        raise ValueError(f"packed must be contiguous uint8 with >= {(numel + 1) // 2} bytes, got {packed.dtype} "
                         f"{packed.numel()}")  # fmt: skip
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    n_blocks = -(-numel // blocksize)
    if absmax.numel() < n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, {n_blocks} blocks need one each")
    if numel == 0:
        return out
    lut = value_table(quant_type, out.device)
    if nested is not None:
        absmax2, code2, offset, blocksize2 = nested
        if absmax2.numel() < -(-n_blocks // blocksize2) or code2.numel() < 256 or offset.numel() != 1:
            raise ValueError("nested absmax: absmax2, code2 [256] or offset [1] too small for the blocks")
    else:
        absmax2, code2, offset, blocksize2 = absmax, lut, lut, 1  # unused pointers
    bf16_bits = out.dtype == torch.bfloat16 and interpreting()
    variant = dict(LOG2_BS=blocksize.bit_length() - 1, NESTED=nested is not None, BF16_BITS=bf16_bits)

    def run(c: DequantConfig) -> torch.Tensor:
        group = min(blocksize, c.BLOCK)
        # fmt: off
        launch(
            _dequant4bit_kernel, (triton.cdiv(numel, c.BLOCK),),
            packed, absmax, absmax2, code2, offset, lut, out,
            numel, (numel + 1) // 2, n_blocks, blocksize2,
            **variant, GROUP=group, **config_kwargs(c), enable_fp_fusion=False,
        )
        # fmt: on
        return out

    configs = {config_name(c): c for c in dequant_table()}
    key = (str(out.dtype), nested is not None, blocksize, bucket(numel, hi=1 << 30))
    chosen = tuning.table("dequant").pick(key, list(configs), lambda n: (lambda: run(configs[n])), out.device)
    return run(configs[chosen])
