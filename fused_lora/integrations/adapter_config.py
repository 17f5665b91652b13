"""PEFT's ``adapter_config.json``, read as ``PeftModel.from_pretrained`` reads it, and checked.

A file loads here only if fused_lora's layers compute with it what PEFT computes: every setting that
changes what PEFT computes beyond plain LoRA (DoRA, lora_bias, aLoRA, BD-LoRA, KaSA, layer replication,
LoRA on parameters, ...) or that makes PEFT change the *base* weights while it loads the file (the
PiSSA / OLoRA / CorDA / LoftQ / LoRA-GA initialisations: PEFT re-runs them on load, W ← W − s·B₀A₀) is
refused with a ValueError that names it, as is an unknown setting that is set (fused_lora cannot tell
what it does). Values are checked too (r, lora_alpha, lora_dropout, use_rslora, the patterns).

Per-module ranks and alphas: PEFT gives module ``name`` the value of the first key of ``rank_pattern``
(``alpha_pattern``) that matches ``(.*\\.)?(key)$`` from the start of the name (PEFT ≥ 0.15's
``get_pattern_key``), else ``r`` (``lora_alpha``). A key is thus a suffix rule: ``fc`` also matches
``head.fc``, ``0`` also matches ``1.0``. :func:`pattern_key` writes ``^`` + the escaped full name, which
matches that module only (the form PEFT's documentation recommends for exactly this). PEFT < 0.15 matched
``.*\\.(key)$``, else looked the module's name itself up; neither finds an anchored key, so per-module
ranks and alphas in these files need PEFT ≥ 0.15 (the escaped full names written before were found there
only for top-level names without a dot).
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

from ..validation import check_alpha, check_dropout, check_rank

CONFIG_NAME = "adapter_config.json"

# Settings PEFT computes differently with (a LoRA variant), or that change the model beyond adapters.
CHANGES_THE_MATH = {
    "lora_bias": "lora_bias (a bias on lora_B)",
    "alora_invocation_tokens": "activated LoRA (the adapter acts only after the invocation tokens)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "kasa_config": "KaSA (truncates W's singular values and scales the adapter by its own)",
    "arrow_config": "Arrow (routing among several adapters)",
    "monteclora_config": "MonteCLoRA (sampled adapter weights)",
    "velora_config": "VeLoRA",
    "layer_replication": "layer_replication (PEFT duplicates layers of the base model)",
    "target_parameters": "target_parameters (LoRA on nn.Parameters rather than modules)",
    "trainable_token_indices": "trainable_token_indices (trainable token embeddings)",
}
# init_lora_weights that PEFT runs again when it loads a file, changing the base weights.
CHANGES_THE_BASE = ("pissa", "corda", "olora", "loftq", "lora_ga")
HARMLESS_INIT = ("gaussian", "eva", "orthogonal", "mica")  # and true / false
# Settings that change nothing PEFT computes from the file on an nn.Linear / nn.Embedding / nn.ConvNd base
# (which modules get LoRA is read from the weights' keys; modules_to_save and bias="all" add keys, which
# are refused there).
KNOWN = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "use_qalora", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "use_dora",
}  # fmt: skip


def pattern_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that PEFT (≥ 0.15) and :func:`pattern_value` match with module
    `name` and no other: ``^`` + the escaped name."""
    return "^" + re.escape(name)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: the value of the first key that matches the end of `name` (after a dot, or whole)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class AdapterConfig:
    """What fused_lora's layers take from a PEFT LoRA config (all checked)."""

    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    use_dora: bool = False  # DoRA LoRALinear layers, a lora_magnitude_vector per module

    def rank(self, name: str) -> int:
        """The rank PEFT gives module `name` (and makes its adapter's tensors)."""
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.lora_alpha)


def _patterns(config: dict, key: str, check) -> dict:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{key} must be a mapping of module-name patterns to values, got {patterns!r}")
    for k, v in patterns.items():
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"{key}: {k!r} is not a regular expression ({e})") from None
        check(v, f"{key}[{k!r}]")
    return dict(patterns)


def _positive_rank(r, what: str) -> int:
    try:
        rank = check_rank(r)
    except (TypeError, ValueError):
        rank = 0
    if rank < 1:
        raise ValueError(f"{what} must be a positive int, got {r!r}")
    return rank


def _refusals(config: dict) -> list[str]:
    """Why fused_lora's layers would not compute what PEFT computes with this config (empty: they do)."""
    why = []
    if config.get("peft_type") != "LORA":
        why.append(f"peft_type is {config.get('peft_type')!r}: only LORA adapters load here")
    for key, what in CHANGES_THE_MATH.items():
        if config.get(key):
            why.append(f"{key}={config[key]!r}: {what} is not what fused_lora's layers compute")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(CHANGES_THE_BASE):
        why.append(
            f"init_lora_weights={init!r}: PEFT runs this initialisation again when it loads the file, which "
            "changes the base weights (W - s·B0·A0) before the trained adapters are loaded; fused_lora does not. "
            "Convert the adapter to a plain LoRA one (PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), or, if the base model given is already the "
            "residual one, set init_lora_weights to true in the config"
        )
    elif not (isinstance(init, bool) or (isinstance(init, str) and init in HARMLESS_INIT)):
        why.append(f"init_lora_weights={init!r} is unknown here: fused_lora cannot tell whether PEFT changes the "
                   "base weights with it")  # fmt: skip
    unknown = sorted(k for k, v in config.items() if k not in KNOWN and k not in CHANGES_THE_MATH and v)
    if unknown:
        why.append(f"settings unknown to fused_lora are set ({', '.join(f'{k}={config[k]!r}' for k in unknown)}): "
                   "it cannot tell whether PEFT computes something else with them")  # fmt: skip
    return why


def read_config(path: Path) -> AdapterConfig:
    """The checked config at `path` (adapter_config.json); a ValueError naming every setting refused."""
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path.parent}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    why = _refusals(config)
    if why:
        raise ValueError(f"{path}: this adapter cannot be loaded into fused_lora's layers: " + "; ".join(why))
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(f"{path}: use_rslora must be true or false, got {use_rslora!r}")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise ValueError(f"{path}: use_dora must be true or false, got {use_dora!r}")

    def alpha(v, what):
        try:
            check_alpha(v, name=what)
        except TypeError as e:
            raise ValueError(str(e)) from None

    try:
        lora_alpha = config.get("lora_alpha", 8)
        alpha(lora_alpha, "lora_alpha")
        dropout = config.get("lora_dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
        return AdapterConfig(
            r=_positive_rank(config.get("r", 8), "r"),
            lora_alpha=lora_alpha,
            lora_dropout=check_dropout(dropout),
            use_rslora=use_rslora,
            rank_pattern=_patterns(config, "rank_pattern", _positive_rank),
            alpha_pattern=_patterns(config, "alpha_pattern", alpha),
            use_dora=use_dora,
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
