#!/usr/bin/env bash
# Install (into .venv) and run the benchmark: the full sweep on a CUDA GPU; without one, the smoke run,
# the saved-for-backward table and the modelled table. Results, full tables and plots go to
# bench/results/local/ (ignored by git) unless --out names a file. Flags go to python -m fused_lora.bench
# (.venv/bin/python -m fused_lora.bench --help lists them with their defaults).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m fused_lora.bench "$@"
