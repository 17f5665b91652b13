"""pytest plugin for scripts/peft_suite_coverage.py: runs PEFT's own test suite with every model patched.

Loaded with ``-p peft_suite_plugin`` (scripts/ on PYTHONPATH). Environment:

- ``FUSED_LORA_SUITE_MODE``: ``patched`` (every PEFT tuner is patched right after it is built, and so
  every layer ``add_adapter`` / ``load_adapter`` adds) or ``unpatched`` (PEFT alone: the baseline);
- ``FUSED_LORA_SUITE_OUT``: a JSON file written at the end of the session: each LoRA layer the suite
  created (counted once per layer object), its kind and whether it runs on fused_lora's path or why not.

PEFT's sdist ships its tests without the modules only its other test files need at import
(``diffusers``, ``datasets``): when missing, an empty stand-in is registered so that
``test_custom_models.py`` imports (the tests that would use them are not in its LoRA selection).
"""

from __future__ import annotations

import json
import os
import sys
import types
import weakref
from collections import Counter

STUBBED = []
for _name, _attrs in (("diffusers", ("StableDiffusionPipeline",)), ("datasets", ("load_dataset",))):
    try:
        __import__(_name)
    except ImportError:
        _mod = types.ModuleType(_name)
        for _attr in _attrs:
            setattr(_mod, _attr, None)
        sys.modules[_name] = _mod
        STUBBED.append(_name)

MODE = os.environ.get("FUSED_LORA_SUITE_MODE", "patched")
OUT = os.environ.get("FUSED_LORA_SUITE_OUT")
_SEEN: weakref.WeakSet = weakref.WeakSet()
LAYERS: Counter = Counter()  # (kind, outcome) -> layers; outcome "fused" or the reason
DORA: Counter = Counter()  # layers holding a DoRA adapter: "variant" (left for that alone) or their other reason
ERRORS: Counter = Counter()  # exceptions raised by patch_peft_model itself


def _record(model) -> None:
    from fused_lora.integrations import peft_patch
    from fused_lora.integrations.peft_kinds import kind_for_class

    for _, layer in peft_patch._lora_layers(model):
        if layer in _SEEN:
            continue
        _SEEN.add(layer)
        kind = kind_for_class(type(layer))
        name = kind.name if kind is not None else peft_patch._peft_name(type(layer))
        if kind is not None and type(layer) is kind._fused:
            outcome = "fused"
        elif kind is None:
            outcome = f"{type(layer).__name__} layer (no fused path for this class)"
        else:
            outcome = kind.static_reason(layer) or "not patched"
        LAYERS[(name, outcome)] += 1
        if any(getattr(layer, "use_dora", {}).values()):  # left for being DoRA alone, or for another reason too
            DORA["variant" if outcome == "DoRA / LoRA variant" else outcome] += 1


def _install() -> None:
    from peft.tuners.tuners_utils import BaseTuner

    import fused_lora
    from fused_lora.integrations import peft_patch

    original_init, original_patch_layers = BaseTuner.__init__, peft_patch._patch_layers

    def patch_layers(model):  # also what PatchNewLayers runs after add_adapter / load_adapter
        report = original_patch_layers(model)
        _record(model)
        return report

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if peft_patch._lora_layers(self):
            try:
                fused_lora.patch_peft_model(self)
            except Exception as e:  # counted and shown: the suite then runs PEFT's forward for this model
                ERRORS[f"{type(e).__name__}: {e}"[:200]] += 1

    peft_patch._patch_layers = patch_layers
    BaseTuner.__init__ = init


def pytest_configure(config) -> None:
    if MODE == "patched":
        _install()


def pytest_sessionfinish(session, exitstatus) -> None:
    if OUT:
        rows = [{"kind": k, "outcome": o, "layers": n} for (k, o), n in sorted(LAYERS.items())]
        data = {"mode": MODE, "layers": rows, "dora": dict(DORA), "patch_errors": dict(ERRORS), "stubbed": STUBBED}
        with open(OUT, "w") as f:
            json.dump(data, f, indent=1)
