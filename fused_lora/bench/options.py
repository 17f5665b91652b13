"""The benchmark's command line: every flag checked by argparse itself, so a bad value is one line
naming the flag and what it accepts (``argument --ranks: 0 is not a rank; ranks are integers >= 1``),
never a traceback from inside the run; ``--help`` shows every flag's default."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from . import model
from .providers import SHAPES

DTYPES = ("bf16", "fp16", "fp32")
CASES = ("linear", "decoder")
DEFAULT_RANKS = "1,4,8,16,32,64,128,256"
DECODER_RANKS = "16"
ALL_PROVIDERS = tuple(
    dict.fromkeys(model.PROVIDERS + model.QLORA_PROVIDERS + model.DORA_PROVIDERS + model.DECODER_PROVIDERS)
)
RESULTS_DIR = "bench/results/local"  # ignored by git: a run never writes into tracked files

DESCRIPTION = """\
The main job: time per rank of a LoRA linear layer — fused_lora against PEFT's lora.Linear, Unsloth's
cuBLAS addmm chain and the bare cuBLAS GEMM (the floor) — forward, backward and both. With --case decoder:
the time of a whole Llama-3-8B decoder layer with LoRA on its seven projections (fused_lora's fused,
hybrid and auto, PEFT's get_peft_model, the bare layer as the floor): the gain per training step.

On a CUDA GPU it measures the sweep (shapes x tokens x ranks x dropout x modes x providers). Without one
it says so and runs what needs none: a tiny smoke run through Triton's interpreter (correctness only,
no speed claims), the bytes each provider keeps for backward at full size (real autograd on the meta
device), and the roofline model's time for the GPU named by --gpu-spec, labelled as modelled.

Either way it ends with a short summary; the full tables, the results (JSON lines) and the plots go to
files under --out's folder."""

EPILOG = """\
examples:
  python -m fused_lora.bench                                   # everything; results in bench/results/local/
  python -m fused_lora.bench --shapes attn-7b --ranks 16       # one case
  python -m fused_lora.bench --out /tmp/run.jsonl --no-plots   # results elsewhere, no PNGs
  python -m fused_lora.bench --case decoder --dropout 0,0.1     # a Llama-3-8B decoder layer, 4 x 2048 tokens
  python -m fused_lora.bench --case decoder --tokens 2048,8192  # ... and a smaller M"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and adds "(default: ...)" where the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default is not argparse.SUPPRESS and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _items(text: str) -> list[str]:
    out: list[str] = []
    for v in (v.strip() for v in text.split(",")):
        if v and v not in out:
            out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("an empty list")
    return out


def names(kind: str, allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = _items(text)
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(repr(b) for b in bad)}; choose from {', '.join(allowed)}"
            )
        return items

    parse.__name__ = f"{kind} list"
    return parse


def numbers(kind: str, cast: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        out = []
        for item in _items(text):
            try:
                value = cast(item)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not a {kind}; {rule}") from None
            if not ok(value):
                raise argparse.ArgumentTypeError(f"{item} is not a valid {kind}; {rule}")
            out.append(value)
        return out

    parse.__name__ = f"{kind} list"
    return parse


def results_file(text: str) -> Path:
    """An existing results file (for the plots and report commands)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file (results files come from python -m fused_lora.bench)")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fused_lora.bench", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    add = ap.add_argument
    add(
        "--case",
        default="linear",
        choices=CASES,
        help="linear: one LoRA projection, over --shapes and --ranks; decoder: a whole Llama-3-8B decoder layer "
        "(q, k, v, o, gate, up, down adapted, attention through SDPA), M = --tokens as sequences of --seq-len",
    )
    add(
        "--shapes",
        type=names("shape", list(SHAPES)),
        default=None,
        help=f"linear case: layer shapes (in -> out features of real models), comma list of: {', '.join(SHAPES)} "
        "(default: all)",
    )
    add(
        "--tokens",
        type=numbers("token count", int, lambda v: v >= 1, "token counts (M) are integers >= 1"),
        default="8192",
        help="tokens per batch M, comma list",
    )
    add(
        "--seq-len",
        type=positive_int,
        default=2048,
        help="decoder case: tokens per sequence; M tokens run as M / seq-len sequences (one of M when M is smaller)",
    )
    add("--llama-tokens", action="store_true", help="also run attn-7b at M = 2048 and 16384")
    add(
        "--ranks",
        type=numbers("rank", int, lambda v: v >= 1, "ranks are integers >= 1"),
        default=None,
        help=f"LoRA ranks r, comma list (default: {DEFAULT_RANKS}; {DECODER_RANKS} for the decoder case)",
    )
    add("--dtype", default="bf16", choices=DTYPES, help="activation and base-weight dtype")
    add(
        "--adapter-dtype",
        default=None,
        choices=DTYPES,
        help="lora_A / lora_B dtype (default: the same as --dtype for the linear case; fp32 for the decoder case, "
        "PEFT's own default under 16-bit weights)",
    )
    add(
        "--dropout",
        default="0,0.1",
        help="lora_dropout values, comma list, each in [0, 1)",
        type=numbers("dropout", float, lambda v: math.isfinite(v) and 0.0 <= v < 1.0, "dropout is in [0, 1)"),
    )
    add(
        "--modes",
        type=names("mode", model.MODES),
        default=",".join(model.MODES),
        help=f"what is timed, comma list of: {', '.join(model.MODES)} (forward, backward, both)",
    )
    add(
        "--providers",
        type=names("provider", ALL_PROVIDERS),
        default=None,
        help=f"implementations side by side, comma list. Linear case (fused_lora/bench/providers.py says what each "
        f"is): {', '.join(model.PROVIDERS)} (default: all of these); opt-in (QLoRA, 4-bit base weights): "
        f"{', '.join(model.QLORA_PROVIDERS)}; opt-in (DoRA): {', '.join(model.DORA_PROVIDERS)}. Decoder case (fused_lora/bench/decoder.py): "
        f"{', '.join(model.DECODER_PROVIDERS)} (default: all)",
    )
    add(
        "--gpu-spec",
        default=None,
        choices=list(model.GPUS),
        help="GPU whose datasheet the modelled columns use (default: the GPU present, else h100)",
    )
    add(
        "--out",
        default=None,
        metavar="FILE.jsonl",
        help=f"results file, JSON lines, appended to; the tables (FILE-tables.txt) and plots (FILE-*.png) "
        f"go beside it (default: {RESULTS_DIR}/<gpu name>.jsonl, or no-gpu.jsonl; <...>-decoder.jsonl for the decoder "
        "case; ignored by git)",
    )
    add("--rep", type=positive_int, default=100, help="time per measurement for triton's do_bench, ms (GPU only)")
    add("--no-plots", action="store_true", help="skip the PNGs (they need matplotlib)")
    add("--no-progress", action="store_true", help="no progress bar")
    return ap  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with the per-case defaults filled in and the checks that span flags made (argparse
    errors, as for a single flag)."""
    ap = parser()
    ns = ap.parse_args(argv)
    decoder = ns.case == "decoder"
    allowed = model.DECODER_PROVIDERS if decoder else model.PROVIDERS + model.QLORA_PROVIDERS + model.DORA_PROVIDERS
    ns.providers = ns.providers or list(model.DECODER_PROVIDERS if decoder else model.PROVIDERS)
    bad = [p for p in ns.providers if p not in allowed]
    if bad:
        ap.error(f"argument --providers: {', '.join(repr(b) for b in bad)} not a provider of the {ns.case} case; "
                 f"choose from {', '.join(allowed)}")  # fmt: skip
    if decoder and ns.shapes is not None:
        ap.error("argument --shapes: the decoder case has one shape (Llama-3-8B's layer); it is for --case linear")
    ns.shapes = ns.shapes or list(SHAPES)
    ns.ranks = ns.ranks or [int(r) for r in (DECODER_RANKS if decoder else DEFAULT_RANKS).split(",")]
    if decoder:
        ns.adapter_dtype = ns.adapter_dtype or "fp32"
        uneven = [M for M in ns.tokens if M % ns.seq_len and ns.seq_len < M]
        if uneven:
            ap.error(f"argument --tokens: {', '.join(map(str, uneven))} is not a whole number of sequences of "
                     f"--seq-len {ns.seq_len}")  # fmt: skip
    return ns
