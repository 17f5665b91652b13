#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one call (the device lease is short): environment, the GPU tests
# (bf16 parity, compiled kernels at realistic sizes, CUDA graphs) with the rest of the suite on CUDA
# tensors, then the benchmark at the reference shape. Logs and results go to $OUT (default ./gpu-out).
# Usage on a GPU machine with torch and triton installed:  bash scripts/gpu_check.sh [bench flags...]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton, sys; print(f'python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} gpu {torch.cuda.get_device_name()}')" | tee "$OUT/versions.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# One configuration per kernel variant for the tests (FUSED_LORA_AUTOTUNE=0): correctness, not tuning.
FUSED_LORA_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-330}" python3 -m pytest tests -q -rs -n 8 -m "not compile" \
    -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -15 "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-220}" python3 -m fused_lora.bench --shapes attn-7b --ranks 16 --dropout 0,0.1 \
    --out "$OUT/bench.jsonl" "$@" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; tail -40 "$OUT/bench.log"
