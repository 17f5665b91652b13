"""What the shared measuring code (sweep.measure_case, offline.memory_rows and model_rows) needs from a
kind of benchmark case: its weights, its providers, the FLOPs that TFLOP/s divide, and its roofline model.

    LINEAR   one projection, fused_lora/bench/providers.py (the default sweep)
    DECODER  a whole decoder layer, fused_lora/bench/decoder_run.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import model
from .providers import Provider, build, make_weights
from .tables import modelled


class Suite(NamedTuple):
    make_weights: Callable[[Any], dict]  # case -> weights every provider is built from
    build: Callable[[str, Any, dict], Provider]  # (provider name, case, weights) -> Provider
    flops: Callable[[Any, str, str], float]  # (case, provider, mode) -> the FLOPs TFLOP/s divide
    modelled: Callable[[Any, str, str, model.GPUSpec], dict]  # (case, provider, mode, gpu) -> model columns


def _linear_flops(case, provider: str, mode: str) -> float:
    if provider == "floor":
        return model.floor_flops(mode, case.M, case.K, case.N)
    return model.useful_flops(mode, case.M, case.K, case.N, case.r)


LINEAR = Suite(make_weights, build, _linear_flops, modelled)
