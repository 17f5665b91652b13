#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite. Without a GPU the kernels run through Triton's
# interpreter, every kernel config is compiled for sm_80/sm_90a, and the GPU tests are skipped (listed).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
