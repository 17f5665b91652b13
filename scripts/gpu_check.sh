#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in stages that each fit one device call (10 minutes; the lease is 30):
#
#   bash scripts/gpu_check.sh tests      # the whole suite on CUDA tensors, GPU-marked tests included (~5 min)
#   bash scripts/gpu_check.sh sanitize   # compute-sanitizer memcheck + racecheck over every kernel family
#   bash scripts/gpu_check.sh bench      # the reference shape, every provider and implementation, p = 0 / 0.1
#   bash scripts/gpu_check.sh sweep      # as much of the full sweep as SWEEP_TIMEOUT allows
#   bash scripts/gpu_check.sh ncu        # Nsight Compute: the fused GEMM and cuBLAS at the reference shape
#   (no "all": tests + sanitize + bench need ~20 min, one device call runs 10 at most; plan one stage per call)
#
# Logs and results go to $OUT (default ./gpu-out): versions.txt (GPU, torch, triton, commit), per-stage
# logs, bench.jsonl rows (device name, versions, date, commit in every row). Extra arguments go to the
# benchmark. Needs torch and triton installed (the lent machines have them).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAGE=${1:-all}
shift || true
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'EOF' | tee "$OUT/versions.txt"
import subprocess, sys, torch, triton
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"gpu {torch.cuda.get_device_name()} | python {sys.version.split()[0]} | torch {torch.__version__} | "
      f"triton {triton.__version__} | commit {commit or 'unknown'}")
EOF
if compgen -G "scripts/wheels/*.whl" > /dev/null; then  # wheels the GPU image lacks (loralib), kept in the repo
  python3 -m pip install -q --no-index --no-deps scripts/wheels/*.whl >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# outside $OUT (emptied before every call): a warm machine keeps its choices between calls; copied to $OUT at exit
export FUSED_LORA_CACHE_DIR=/tmp/fused_lora_cache
trap 'cp "$FUSED_LORA_CACHE_DIR"/choices-*.json "$OUT/" 2>/dev/null || true' EXIT

tests() {  # one configuration per kernel variant (correctness, not tuning), then the autotuning tests
  FUSED_LORA_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-500}" python3 -m pytest tests -q -rs -n 8 -m "not compile" \
      -p no:cacheprovider --durations=40 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/tests.log"
}

sanitize() {  # forced GEMM configs still apply with AUTOTUNE=0; nothing else is timed under the sanitizer
  export FUSED_LORA_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1
  timeout 200 python3 scripts/sanitize_calls.py --quick > "$OUT/sanitize-plain.log" 2>&1  # compiles (warms the cache), checks
  echo "plain rc=$?"; tail -2 "$OUT/sanitize-plain.log"
  for tool in memcheck racecheck; do
    timeout "${SANITIZE_TIMEOUT:-180}" compute-sanitizer --tool "$tool" --print-limit 20 \
        python3 scripts/sanitize_calls.py --quick > "$OUT/sanitize-$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|FAIL|failed" "$OUT/sanitize-$tool.log" | tail -5
  done
}

bench() {
  timeout "${BENCH_TIMEOUT:-300}" python3 -m fused_lora.bench --shapes attn-7b --tokens 8192 --ranks 16 \
      --dropout 0,0.1 --no-plots --no-progress --out "$OUT/bench.jsonl" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -40 "$OUT/bench.log"
}

sweep() {
  # rows are appended per case, so a timeout keeps what was measured; the cases most worth having come first
  timeout "${SWEEP_TIMEOUT:-500}" python3 -m fused_lora.bench --shapes attn-7b,mlp-up-7b,mlp-down-7b --tokens 512,2048,8192 \
      --ranks 16,64 --dropout 0,0.1 --modes fwdbwd --no-plots --no-progress --out "$OUT/sweep.jsonl" "$@" > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$? (124: stopped at SWEEP_TIMEOUT, rows so far kept)"; tail -30 "$OUT/sweep.log"
}

ncu_run() {  # achieved TFLOP/s and DRAM bytes of one training step at the reference shape
  cat > /tmp/ncu_step.py <<'EOF'
import os, torch, fused_lora
layer = fused_lora.LoRALinear(4096, 4096, r=16, lora_alpha=32, lora_dropout=0.1, device="cuda",
                              dtype=torch.bfloat16, lora_dtype=torch.float32)
torch.nn.init.normal_(layer.lora_B, std=0.02)
x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
for _ in range(3):  # tune (first run, outside ncu) / warm up; only the step below is profiled
    layer(x).float().sum().backward()
torch.cuda.synchronize()
if not os.environ.get("NCU_TUNE_ONLY"):
    torch.cuda.profiler.start()
    layer(x).float().sum().backward()
    torch.matmul(x, layer.weight.t())  # cuBLAS at the same shape
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
EOF
  NCU_TUNE_ONLY=1 timeout 240 python3 /tmp/ncu_step.py > "$OUT/ncu-tune.log" 2>&1; echo "tune rc=$?"
  timeout "${NCU_TIMEOUT:-300}" ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed \
      --csv python3 /tmp/ncu_step.py > "$OUT/ncu.csv" 2> "$OUT/ncu.log"
  echo "ncu rc=$?"; tail -20 "$OUT/ncu.csv"
}

case "$STAGE" in
  tests) tests ;;
  sanitize) sanitize ;;
  bench) bench "$@" ;;
  sweep) sweep "$@" ;;
  ncu) ncu_run ;;
  all) echo "tests+sanitize+bench need ~20 min; one device call runs 10 at most: one stage per call" >&2; exit 2 ;;
  *) echo "usage: bash scripts/gpu_check.sh tests|sanitize|bench|sweep|ncu|all [bench flags]" >&2; exit 2 ;;
esac
