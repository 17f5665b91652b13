# Sourced by scripts/test.sh and scripts/bench.sh: a .venv with fused_lora and its extras installed.
#
# torch: one already on the system (e.g. a CUDA build on a GPU machine) is reused (the venv sees system
# site-packages). Otherwise torch==2.13.0 (FUSED_LORA_TORCH picks another version) is installed:
#   - FUSED_LORA_TORCH_INDEX=URL names the index (e.g. https://download.pytorch.org/whl/cu130);
#   - with an NVIDIA GPU (nvidia-smi lists one): PyPI's build, which is CUDA's (several GB of wheels);
#   - without one: the CPU build (~200 MB), `torch==2.13.0+cpu` from pip's own sources (a local wheel
#     folder, as on our CI machines) or else from https://download.pytorch.org/whl/cpu.
# triton: pinned to 3.6.0 (what the CUDA 13 builds of torch 2.11 ship; the oldest we support) unless one
# is present or FUSED_LORA_TRITON names another version; with it numpy<2.4, because triton 3.6's
# interpreter turns 1-element arrays into Python ints, which numpy 2.4 refuses (3.8 is fixed).
# fused_lora itself (editable, with the test, bench and integrations extras) is installed once and again
# only when pyproject.toml changes (a stamp in .venv holds its hash; FUSED_LORA_REINSTALL=1 forces it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

has_module() {  # importable, without importing it (importing torch takes seconds)
  python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null
}

if ! has_module torch; then
  torch_version=${FUSED_LORA_TORCH:-2.13.0}
  if [ -n "${FUSED_LORA_TORCH_INDEX:-}" ]; then
    pip install -q "torch==$torch_version" --index-url "$FUSED_LORA_TORCH_INDEX"
  elif nvidia-smi -L > /dev/null 2>&1; then
    echo "env.sh: an NVIDIA GPU is present: installing PyPI's (CUDA) torch $torch_version, several GB" >&2
    pip install -q "torch==$torch_version"
  else
    echo "env.sh: no NVIDIA GPU found: installing torch $torch_version's CPU build" \
         "(FUSED_LORA_TORCH_INDEX=<an index URL> installs another)" >&2
    pip install -q "torch==$torch_version+cpu" 2> /dev/null \
      || pip install -q "torch==$torch_version" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
has_module triton || pip install -q "triton==${FUSED_LORA_TRITON:-3.6.0}" "numpy<2.4"

stamp=.venv/.fused_lora-installed  # pyproject.toml's hash and the checkout it was installed from
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd -P)"
if [ "${FUSED_LORA_REINSTALL:-0}" != 0 ] || [ "$(cat "$stamp" 2> /dev/null)" != "$want" ] \
   || ! python -c "import importlib.metadata as m; m.version('fused_lora')" 2> /dev/null; then
  rm -f "$stamp"
  pip install -q -e ".[test,bench,integrations,qlora]"
  echo "$want" > "$stamp"
fi
