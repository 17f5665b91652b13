"""4-bit base weights in bitsandbytes' storage format (QLoRA): the format, a plain-PyTorch reference
dequantiser, and :class:`QuantizedWeight`, the base weight the fused ops understand besides a dense one.

The format (bitsandbytes 0.4x–0.50 ``quantize_4bit``; read from its Python and C/CUDA sources):

    W [N, K] (quant_state.shape), T = N·K elements in row-major order, blocks of `blocksize` consecutive
    elements (32, 64, …, 4096; blocks run across row ends: K need not be a multiple of the blocksize)
    packed   uint8 [(T + 1) // 2, 1]: element 2i in the high nibble of byte i, element 2i + 1 in the low
             one. Params4bit may store the same bytes as another dtype (``quant_storage``, e.g. bf16 for
             FSDP): the bytes are what count, read as uint8.
    absmax   fp32 [ceil(T / blocksize)]: each block's max |w|, or, with double quantisation
             (``compress_statistics`` / ``bnb_4bit_use_double_quant``), uint8 codes into a 256-value
             table (``state2.code``, the dynamic map) scaled per `state2.blocksize` (256) blocks by
             ``state2.absmax`` (fp32), plus ``offset`` (fp32, the mean that was subtracted)
    values   a fixed 16-entry table per quant_type (NF4: normal quantiles; FP4: sign, 2 exponent bits, 1
             mantissa bit, normalised to max 1). bitsandbytes ignores ``quant_state.code`` when it
             dequantises 4-bit data and uses these tables; so do we.

Dequantisation, in bitsandbytes' order of fp32 operations (each rounds once):

    scale[b] = absmax[b]                                          or, nested,
    scale[b] = fl(fl(code2[absmax[b]] · state2.absmax[b // state2.blocksize]) + offset)
    W[e]     = round_to(dtype, fl(value[nibble(e)] · scale[e // blocksize]))

bitsandbytes' forward (``matmul_4bit`` → ``gemm_4bit``) dequantises straight to the compute dtype, which
is what this module and the kernel do; its backward rounds to ``quant_state.dtype`` first and then to the
gradient's dtype (two roundings where they differ, which our backward does not copy: it uses the
forward's weight). FP4 code 0b1000 is −0.0 in bitsandbytes' CUDA kernel and its scalar CPU code, +0.0 in
its AVX-512 CPU code and its Python fallback (``get_4bit_type`` builds it from the int ``-0``): the sign of
a zero, never a different sum. Here it is −0.0, as on the GPU.

Not handled: the CPU-only layout bitsandbytes' ``Linear4bit.forward`` repacks a weight into in eval mode
on the CPU (``quant_state.packing_format_for_cpu``: nibbles permuted per 32 rows, absmax rounded to bf16 —
lossy, so the original weight cannot be recovered exactly); it is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The 16 values as fp32 bit patterns, index = the 4-bit code (bitsandbytes' csrc/kernels.cu tables, which
# get_4bit_type reproduces bit for bit, but for FP4's −0).
_BITS = {
    "nf4": (0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
            0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000),
    "fp4": (0x00000000, 0x3BAAAAAB, 0x3F2AAAAB, 0x3F800000, 0x3EAAAAAB, 0x3F000000, 0x3E2AAAAB, 0x3E800000,
            0x80000000, 0xBBAAAAAB, 0xBF2AAAAB, 0xBF800000, 0xBEAAAAAB, 0xBF000000, 0xBE2AAAAB, 0xBE800000),
}  # fmt: skip


def code_values(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values of `quant_type` ('nf4' or 'fp4'), on the CPU."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in _BITS[quant_type]], dtype=torch.int32)
    return bits.view(torch.float32)


@dataclasses.dataclass
class NestedAbsmax:
    """Double quantisation of the per-block scales (bitsandbytes' ``state2`` + ``offset``)."""

    absmax: torch.Tensor  # fp32 [ceil(blocks / blocksize)]
    code: torch.Tensor  # fp32 [256]
    blocksize: int
    offset: torch.Tensor  # fp32, one element


@dataclasses.dataclass
class QuantizedWeight:
    """A 4-bit W [N, K] = `shape`: packed nibbles + quantisation state. Knows its shape, its original dtype
    (bitsandbytes' ``quant_state.dtype``) and how to produce the dense weight.

    `packed` is uint8 (any other storage dtype is viewed as its bytes); `absmax` is fp32 (or 16-bit), or
    uint8 codes when `nested` is set. Build one from bitsandbytes with :meth:`from_bnb` (no copy)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    quant_type: str
    blocksize: int
    dtype: torch.dtype = torch.float32
    nested: NestedAbsmax | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        check_quantized(self)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> QuantizedWeight:
        """From a bitsandbytes ``Params4bit`` (or its data and ``quant_state``), sharing every tensor."""
        qs = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if qs is None:
            raise ValueError("this 4-bit weight has no quant_state: it was never quantised (move it to a device "
                             "first, as bitsandbytes quantises on .to(device)) or its state was lost")  # fmt: skip
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError(
                "this 4-bit weight was repacked by bitsandbytes' CPU inference path (Linear4bit.forward in eval "
                "mode on the CPU with an input that needs no grad sets quant_state.packing_format_for_cpu): that "
                "layout permutes the nibbles and rounds absmax to bf16, so the weight it held cannot be recovered "
                "exactly. Reload the model, or run bitsandbytes' layer in training mode (or on inputs that "
                "require grad) before handing it to fused_lora"
            )
        shape = tuple(qs.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape must be 2-D [out, in], got {list(shape)}")
        nested = None
        if getattr(qs, "nested", False):
            s2 = qs.state2
            nested = NestedAbsmax(s2.absmax, s2.code, int(s2.blocksize), qs.offset)
            if s2.dtype != torch.float32:
                raise ValueError(f"nested absmax in {s2.dtype}: only fp32 (what bitsandbytes writes) is supported")
        # a view of the parameter itself (never requires grad: integer storage), so tools that follow views
        # (saved-tensor accounting) see the weight, not a copy
        packed = weight.reshape(-1) if weight.dtype == torch.uint8 else weight.reshape(-1).view(torch.uint8)
        return cls(packed, qs.absmax, shape, qs.quant_type, int(qs.blocksize), qs.dtype, nested)

    def as_parameter(self) -> torch.nn.Parameter:
        """The packed bytes as a frozen Parameter carrying a ``quant_state`` with bitsandbytes' attribute
        names (what :class:`fused_lora.LoRALinear4bit` takes; no bitsandbytes needed)."""
        p = torch.nn.Parameter(self.packed, requires_grad=False)
        n = self.nested
        state2 = None
        if n is not None:
            state2 = SimpleNamespace(absmax=n.absmax, code=n.code, blocksize=n.blocksize, dtype=torch.float32)
        p.quant_state = SimpleNamespace(absmax=self.absmax, shape=torch.Size(self.shape), quant_type=self.quant_type,
                                        blocksize=self.blocksize, dtype=self.dtype, nested=n is not None,
                                        state2=state2, offset=n.offset if n else None)  # fmt: skip
        return p

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense W [N, K] in `dtype` (default: the original dtype), written into `out` if given
        (contiguous, [N, K] or at least N·K elements). The Triton kernel on CUDA tensors and under the
        interpreter (backend 'triton'), the plain-PyTorch :func:`dequantize_reference` otherwise and
        for float64."""
        from .backend import resolve_backend

        dtype = dtype or (out.dtype if out is not None else self.dtype)
        if dtype not in OUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUT_DTYPES}, got {dtype}")
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif out.dtype != dtype or not out.is_contiguous() or out.numel() < self.numel:
            raise ValueError(f"out must be contiguous {dtype} with >= {self.numel} elements, got {out.dtype} "
                             f"{list(out.shape)}")  # fmt: skip
        out = out.reshape(-1)[: self.numel].view(self.shape)
        if dtype == torch.float64 or self.device.type == "meta" or resolve_backend(self.device) != "triton":
            return out.copy_(dequantize_reference(self, dtype))
        from .kernels.dequant import dequantize_4bit

        n = self.nested
        nested = (n.absmax, n.code, n.offset.reshape(1), n.blocksize) if n is not None else None
        return dequantize_4bit(self.packed, self.absmax, out, quant_type=self.quant_type, blocksize=self.blocksize,
                               nested=nested)  # fmt: skip

    # --- what the custom operators take (tensors and ints only) ---

    def op_args(self) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """(packed, tensors, info) for ``fused_lora::lora_linear_fwd`` / ``_bwd``; :meth:`from_op_args` inverts."""
        n = self.nested
        tensors = [self.absmax] + ([n.absmax, n.code, n.offset] if n is not None else [])
        info = [self.shape[0], self.shape[1], self.blocksize, QUANT_TYPES.index(self.quant_type),
                n.blocksize if n is not None else 0, _DTYPES.index(self.dtype)]  # fmt: skip
        return self.packed, tensors, info

    @classmethod
    def from_op_args(cls, packed: torch.Tensor, tensors: list[torch.Tensor], info: list[int]) -> QuantizedWeight:
        N, K, bs, qt, bs2, dt = info
        nested = NestedAbsmax(tensors[1], tensors[2], bs2, tensors[3]) if bs2 else None
        return cls(packed, tensors[0], (N, K), QUANT_TYPES[qt], bs, _DTYPES[dt], nested)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _refuse(what: str) -> None:
    raise ValueError(f"QuantizedWeight: {what}")


def check_quantized(q: QuantizedWeight) -> None:
    """Shapes, dtypes and sizes of a 4-bit weight, with clear errors (never an out-of-bounds read)."""
    N, K = q.shape
    if N <= 0 or K <= 0:
        _refuse(f"shape must be positive [out, in], got {list(q.shape)}")
    if q.quant_type not in QUANT_TYPES:
        _refuse(f"quant_type must be one of {QUANT_TYPES}, got {q.quant_type!r}")
    if q.blocksize not in BLOCKSIZES:
        _refuse(f"blocksize must be one of {BLOCKSIZES}, got {q.blocksize}")
    if q.dtype not in _DTYPES:
        _refuse(f"dtype (the original weight's) must be one of {_DTYPES}, got {q.dtype}")
    if q.packed.dtype != torch.uint8 or q.packed.dim() != 1 or not q.packed.is_contiguous():
        _refuse(f"packed must be a contiguous 1-D uint8 tensor, got {q.packed.dtype} {list(q.packed.shape)}")
    if q.packed.numel() < (N * K + 1) // 2:
        _refuse(f"packed holds {q.packed.numel()} bytes, [{N}, {K}] needs {(N * K + 1) // 2}")
    want = torch.uint8 if q.nested is not None else None
    if (want and q.absmax.dtype != want) or (not want and q.absmax.dtype not in _DTYPES):
        _refuse(f"absmax must be {'uint8 codes (nested)' if want else 'fp32 or 16-bit'}, got {q.absmax.dtype}")
    if q.absmax.numel() < q.n_blocks or not q.absmax.is_contiguous():
        _refuse(f"absmax must be contiguous with >= {q.n_blocks} entries, got {list(q.absmax.shape)}")
    devices = {q.packed.device, q.absmax.device}
    if q.nested is not None:
        n = q.nested
        if n.blocksize <= 0 or n.absmax.numel() < -(-q.n_blocks // n.blocksize) or n.code.numel() != 256:
            _refuse(f"nested absmax: state2.absmax {list(n.absmax.shape)} / blocksize {n.blocksize} / code "
                    f"{list(n.code.shape)} do not cover {q.n_blocks} blocks with a 256-entry code")  # fmt: skip
        if (n.absmax.dtype, n.code.dtype, n.offset.dtype) != (torch.float32,) * 3 or n.offset.numel() != 1:
            _refuse("nested absmax: state2.absmax, state2.code and offset must be fp32 (offset one element)")
        if not (n.absmax.is_contiguous() and n.code.is_contiguous()):
            _refuse("nested absmax: state2.absmax and state2.code must be contiguous")
        devices |= {n.absmax.device, n.code.device, n.offset.device}
    if len(devices) > 1:
        _refuse(f"its tensors are on different devices: {sorted(str(d) for d in devices)}")


def dequantize_reference(q: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [N, K] in `dtype` from plain PyTorch ops, in bitsandbytes' order of fp32 roundings (the spec the
    kernel is tested against; needs no bitsandbytes). float64 is the fp32 result, widened exactly."""
    dtype = dtype or q.dtype
    T = q.numel
    packed = q.packed[: (T + 1) // 2]
    nib = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:T].long()  # high nibble first
    values = code_values(q.quant_type).to(q.device)[nib]
    if q.nested is not None:
        n = q.nested
        blocks = torch.arange(q.n_blocks, device=q.device)
        scale = n.code[q.absmax[: q.n_blocks].long()] * n.absmax[blocks // n.blocksize]  # one fp32 product
        scale = scale + n.offset.reshape(())  # then one fp32 sum
    else:
        scale = q.absmax[: q.n_blocks].float()
    w = values * scale.repeat_interleave(q.blocksize)[:T]  # one fp32 product per element
    return w.to(dtype).view(q.shape)
