"""The checkout's top level shadows no installed package.

``python -m pytest`` and ``python -c`` put the current directory first on ``sys.path``; run in the
checkout's root, a top-level folder or module there wins over an installed package of the same name.
A top-level ``kernels/`` once did: transformers 5.x imports Hugging Face's ``kernels`` package, found
ours instead, and ``import peft`` failed with "cannot import name 'CUDAProperties' from 'kernels'", so
the benchmark's PEFT provider silently fell back to the reference formula (CI: 134 MB kept for backward,
not PEFT's 101 MB). The kernels now live in ``fused_lora/kernels``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _top_level_names() -> set[str]:
    """Names `import <name>` would resolve to in the checkout's root: folders holding Python, modules."""
    names = set()
    for entry in REPO.iterdir():
        if entry.name.startswith(".") or entry.name == "fused_lora":
            continue
        if entry.is_dir() and (any(entry.glob("*.py")) or (entry / "__init__.py").exists()):
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_no_top_level_name_is_an_installed_package():
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {name: installed[name] for name in _top_level_names() if name in installed}
    assert not clashes, (
        f"top-level names in {REPO} shadow installed packages when run from the checkout's root: {clashes}"
    )


def test_no_kernels_folder_at_the_top():
    assert not (REPO / "kernels").exists(), "kernels/ at the top shadows Hugging Face's `kernels` package"
    assert (REPO / "fused_lora" / "kernels" / "lora_gemm.py").exists()


@pytest.mark.integration
def test_peft_imports_from_the_checkouts_root():
    """What `python -m pytest` and `python -c` see: the root first on sys.path."""
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed (the integrations extra)")
    code = "import peft, transformers, fused_lora.kernels as k; print(k.__file__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).parent == REPO / "fused_lora" / "kernels"
