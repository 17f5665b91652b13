#!/usr/bin/env bash
# Install (into .venv) and run the benchmark: the full sweep on a CUDA GPU; without one, the smoke run,
# the saved-for-backward table and the modelled table. Flags go to python -m fused_lora.bench (--help).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m fused_lora.bench "$@"
