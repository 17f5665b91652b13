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
DEFAULT_RANKS = "1,4,8,16,32,64,128,256"
RESULTS_DIR = "bench/results/local"  # ignored by git: a run never writes into tracked files

DESCRIPTION = """\
The main job: time per rank of a LoRA linear layer — fused_lora against PEFT's lora.Linear, Unsloth's
cuBLAS addmm chain and the bare cuBLAS GEMM (the floor) — forward, backward and both.

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
  python -m fused_lora.bench --out /tmp/run.jsonl --no-plots   # results elsewhere, no PNGs"""


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
        "--shapes",
        type=names("shape", list(SHAPES)),
        default=",".join(SHAPES),
        help=f"layer shapes (in -> out features of real models), comma list of: {', '.join(SHAPES)}",
    )
    add(
        "--tokens",
        type=numbers("token count", int, lambda v: v >= 1, "token counts (M) are integers >= 1"),
        default="8192",
        help="tokens per batch M, comma list",
    )
    add("--llama-tokens", action="store_true", help="also run attn-7b at M = 2048 and 16384")
    add(
        "--ranks",
        type=numbers("rank", int, lambda v: v >= 1, "ranks are integers >= 1"),
        default=DEFAULT_RANKS,
        help="LoRA ranks r, comma list",
    )
    add("--dtype", default="bf16", choices=DTYPES, help="activation and base-weight dtype")
    add(
        "--adapter-dtype",
        default=None,
        choices=DTYPES,
        help="lora_A / lora_B dtype (default: the same as --dtype; PEFT's own default under 16-bit is fp32)",
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
        type=names("provider", model.PROVIDERS + model.QLORA_PROVIDERS),
        default=",".join(model.PROVIDERS),
        help=f"implementations side by side (fused_lora/bench/providers.py says what each is), comma list of: "
        f"{', '.join(model.PROVIDERS)}; opt-in (QLoRA, 4-bit base weights): {', '.join(model.QLORA_PROVIDERS)}",
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
        f"go beside it (default: {RESULTS_DIR}/<gpu name>.jsonl, or no-gpu.jsonl; ignored by git)",
    )
    add("--rep", type=positive_int, default=100, help="time per measurement for triton's do_bench, ms (GPU only)")
    add("--no-plots", action="store_true", help="skip the PNGs (they need matplotlib)")
    add("--no-progress", action="store_true", help="no progress bar")
    return ap  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)
