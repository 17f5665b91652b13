# Sourced by scripts/test.sh and scripts/bench.sh: a .venv with fused_lora and its extras installed.
# A torch already on the system (e.g. a CUDA build on a GPU machine) is reused (the venv sees system
# site-packages); otherwise torch==2.13.0 is installed. From PyPI that is a CUDA build that pulls several
# GB of CUDA wheels; for the CPU build name PyTorch's CPU index:
#   FUSED_LORA_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/test.sh
# (where pip is set up with a local wheel folder, as on our CI machines, plain `pip install` finds the
# CPU build already). FUSED_LORA_TORCH picks another version. Triton is pinned to 3.6.0 (what the
# CUDA 13 builds of torch 2.11 ship) unless one is present or FUSED_LORA_TRITON names another version;
# with it numpy<2.4, because triton 3.6's interpreter turns 1-element arrays into Python ints, which
# numpy 2.4 refuses (3.8 is fixed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${FUSED_LORA_TORCH:-2.13.0}" ${FUSED_LORA_TORCH_INDEX:+--index-url "$FUSED_LORA_TORCH_INDEX"}
fi
python -c "import triton" 2>/dev/null || pip install -q "triton==${FUSED_LORA_TRITON:-3.6.0}" "numpy<2.4"
pip install -q -e ".[test,bench,integrations,qlora]"
