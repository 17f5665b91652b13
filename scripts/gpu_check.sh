#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in stages that each fit one device call (10 minutes; the lease is 30):
#
#   bash scripts/gpu_check.sh quick      # the numbers that matter most, in one run of at most 8 minutes (below)
#   bash scripts/gpu_check.sh tests      # the whole suite on CUDA tensors, GPU-marked tests included (~5 min)
#   bash scripts/gpu_check.sh sanitize   # compute-sanitizer memcheck + racecheck over every kernel family
#   bash scripts/gpu_check.sh bench      # the reference shape, every provider and implementation, p = 0 / 0.1
#   bash scripts/gpu_check.sh sweep      # as much of the full sweep as SWEEP_TIMEOUT allows
#   bash scripts/gpu_check.sh ncu        # Nsight Compute: the fused GEMM and cuBLAS at the reference shape
#   (no "all": tests + sanitize + bench need ~20 min, one device call runs 10 at most; plan one stage per call)
#
# Logs and results go to $OUT (default ./gpu-out): versions.txt (GPU, torch, triton, commit), per-stage
# logs, bench.jsonl rows (device name, versions, date, commit in every row). Extra arguments go to the
# benchmark. Needs torch with CUDA and triton installed (the lent machines have them); PYTHON names the
# interpreter (default python3). Without a CUDA GPU every stage stops at once with exit code 3.
# Without a GPU, for the script's own plumbing: GPU_CHECK_DRY_RUN=1 prints the plan (commands and timeouts,
# each stage assumed to use its whole timeout: the worst case) and runs nothing; GPU_CHECK_ALLOW_CPU=1 runs
# the stages on the CPU (GPU tests skip, the benchmark takes its no-GPU path: smoke, saved bytes, model).
#
# quick: one run that fits in 8 minutes on an H100/H200 and writes each result to $OUT as it is produced
# (a stage stopped by its timeout keeps what it wrote). In order of importance:
#   1. tests-bf16   pytest -m gpu -k bf16: bf16 parity of the kernels (odd shapes, ranks 1-128, bias, dropout),
#                   realistic sizes, both implementations and tile paths, embedding, QLoRA, the decoder layer
#   2. tests-rest   pytest -m gpu -k "not bf16": fp16/fp32 realistic parity, no recompilation for a new
#                   sequence length, CUDA graphs, the auto-timing test, torch.compile reduce-overhead
#   3. warm         python -m fused_lora.bench.warm: compiles, in 14 processes, every configuration the tuner
#                   will time at the reference shape, into Triton's on-disk cache
#   4. bench        the reference shape: M = 8192, K = N = 4096, r = 16, bf16, fp32 adapters; providers fused
#                   (= FUSED_LORA_IMPL=auto, the per-shape choice), fused-tma (= use_impl("fused"): the fused
#                   GEMM, TMA path, what Hopper runs), hybrid, peft, addmm (adapters cast to bf16 per step),
#                   floor; p = 0 and 0.1; forward and forward+backward -> $OUT/bench.jsonl (+ -tables.txt)
#   5. decoder      a Llama-3-8B decoder layer, 4 x 2048 tokens, the same dtypes: fused (forced), hybrid,
#                   auto, peft, floor; p = 0 and 0.1 -> $OUT/decoder.jsonl (+ -tables.txt)
# Everything the stages print goes to $OUT/quick.log; the terminal gets each stage's verdict and summary.
# Files back from $OUT (8 at most come back from a device call): nvidia-smi.txt, versions.txt, quick.log,
# bench.jsonl, bench-tables.txt, decoder.jsonl, decoder-tables.txt, choices-*.json.
#
# Budget. Estimated from what the code does, NOT measured (no session has run it on a GPU yet: replace the
# estimates with the stage times quick.log records once one has). QUICK_BUDGET (default 440 s, counted from
# the script's start) bounds the whole run: each stage's timeout is min(its cap, the time left less what the
# stages after it need), a stage left less than its minimum is skipped and says so, and timeout's 10 s
# kill grace keeps the worst case under 450 s, inside 8 minutes.
#   prologue     nvidia-smi, versions, pip install -e . (no build)                                 est. 15 s
#   tests-bf16   62 tests, FUSED_LORA_AUTOTUNE=0 (one configuration per variant, not timed): ~65 distinct
#                kernel variants (the odd-shape test alone: shrink 12 = rank buckets 16/64/128 x 2 dtypes x
#                dropout, forward GEMM 4, dX GEMM 4, grad 8; then the pointer path, the hybrid's kernel,
#                ranks 100, embedding, QLoRA), each compiled once (~1.5-3 s) by whichever of 12 xdist
#                workers needs it first; worker start-up (torch, CUDA context) ~15 s  cap 120 s, est. 60-90 s
#   tests-rest   11 tests; the longest: the auto-timing test tunes a bf16 layer (AUTOTUNE on: shrink 11 +
#                GEMM 12 + low-rank 3 forward, grad 8 + GEMM 12 + low-rank 3 backward = 49 compiles in
#                one worker, ~70-100 s), torch.compile reduce-overhead (inductor, ~40 s)  cap 110 s, per
#                test 100 s
#   warm         the tuner's candidates at the reference shape, counted from fused_lora/kernels/configs.py's admission
#                (bf16 x, fp32 adapters, r = 16, sm_90a, TMA, triton 3.6): forward GEMM 12, dX GEMM 12 (p = 0) and 8
#                (dropout), shrink 11 + 11, grad pass 8 + 8, low-rank term 3 + 3 + 3 = 79 compiles; one
#                after another in the benchmark's process (~2-4 min) they would eat the budget, so worker i
#                of 14 compiles configuration i of every table (~10 compiles, ~30 s)  cap 60 s, est. 30-45 s;
#                a split grad pass's candidate warms its split form, the unsplit one compiles in bench
#   bench        the tuner times the 79 candidates on cached binaries (do_bench 10 + 40 ms each, ~10 s),
#                then 6 providers x 2 modes x 2 dropouts, do_bench rep 100 ms (~15 s), import ~10 s
#                (without the warm stage's binaries: ~2-4 min of compiles more)        cap 160 s, est. 40-60 s
#   decoder      the same kernel variants (M, N, K are run-time arguments; Triton specialises only on their
#                divisibility by 16): no compiles, the new projection shapes re-timed (~110 GEMM, ~50
#                shrink/grad/low-rank candidates at ~60 ms: ~15 s), 5 providers x 2 modes x 2 dropouts at
#                rep 200 ms of a ~10-20 ms step (~10 s), layers built (~10 s)      the rest (>= 60 s), est. 60 s
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAGE=${1:-all}
shift || true
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
USAGE="usage: bash scripts/gpu_check.sh quick|tests|sanitize|bench|sweep|ncu|all [bench flags]"
case "$STAGE" in
  quick | tests | sanitize | bench | sweep | ncu) ;;
  all) echo "tests+sanitize+bench need ~20 min; one device call runs 10 at most: one stage per call (quick: 8 min)" >&2; exit 2 ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
if [ -z "${GPU_CHECK_DRY_RUN:-}" ]; then
  if ! found=$(timeout 120 "$PY" -c "import torch; print(torch.__version__, torch.cuda.is_available())" 2>&1); then
    echo "gpu_check.sh: $PY cannot import torch: ${found##*$'\n'}" >&2
    exit 3
  fi
  if [ "${found##* }" != "True" ] && [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
    echo "gpu_check.sh: no CUDA GPU visible to $PY (torch ${found% *}): these checks need one" \
         "(bash scripts/test.sh runs the suite without)" >&2
    exit 3
  fi
  "$PY" - <<'EOF' | tee "$OUT/versions.txt"
import subprocess, sys, torch, triton
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (GPU_CHECK_ALLOW_CPU: plumbing only)"
print(f"gpu {gpu} | python {sys.version.split()[0]} | torch {torch.__version__} | "
      f"triton {triton.__version__} | commit {commit or 'unknown'}")
EOF
fi
if [ -z "${GPU_CHECK_DRY_RUN:-}${GPU_CHECK_ALLOW_CPU:-}" ]; then  # a CPU plumbing run uses the venv as it is
  INSTALL_LOG=/tmp/gpu_check_install.log  # into $OUT only when it fails: the files that come back are few
  : > "$INSTALL_LOG"
  if compgen -G "scripts/wheels/*.whl" > /dev/null; then  # wheels the GPU image lacks (loralib), kept in the repo
    "$PY" -m pip install -q --no-index --no-deps scripts/wheels/*.whl >> "$INSTALL_LOG" 2>&1 || { cp "$INSTALL_LOG" "$OUT/"; cat "$INSTALL_LOG"; exit 1; }
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$INSTALL_LOG" 2>&1 || { cp "$INSTALL_LOG" "$OUT/"; cat "$INSTALL_LOG"; exit 1; }
fi
# outside $OUT (emptied before every call): a warm machine keeps its choices between calls; copied to $OUT at exit
export FUSED_LORA_CACHE_DIR=/tmp/fused_lora_cache
trap 'cp "$FUSED_LORA_CACHE_DIR"/choices-*.json "$OUT/" 2>/dev/null || true' EXIT

tests() {  # one configuration per kernel variant (correctness, not tuning), then the autotuning tests
  FUSED_LORA_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-500}" "$PY" -m pytest tests -q -rs -n 8 -m "not compile" \
      -p no:cacheprovider --durations=40 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/tests.log"
}

sanitize() {  # forced GEMM configs still apply with AUTOTUNE=0; nothing else is timed under the sanitizer
  export FUSED_LORA_AUTOTUNE=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1
  timeout 200 "$PY" scripts/sanitize_calls.py --quick > "$OUT/sanitize-plain.log" 2>&1  # compiles (warms the cache), checks
  echo "plain rc=$?"; tail -2 "$OUT/sanitize-plain.log"
  for tool in memcheck racecheck; do
    timeout "${SANITIZE_TIMEOUT:-180}" compute-sanitizer --tool "$tool" --print-limit 20 \
        "$PY" scripts/sanitize_calls.py --quick > "$OUT/sanitize-$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|FAIL|failed" "$OUT/sanitize-$tool.log" | tail -5
  done
}

bench() {
  timeout "${BENCH_TIMEOUT:-300}" "$PY" -m fused_lora.bench --shapes attn-7b --tokens 8192 --ranks 16 \
      --dropout 0,0.1 --no-plots --no-progress --out "$OUT/bench.jsonl" "$@" > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"; tail -40 "$OUT/bench.log"
}

sweep() {
  # rows are appended per case, so a timeout keeps what was measured; the cases most worth having come first
  timeout "${SWEEP_TIMEOUT:-500}" "$PY" -m fused_lora.bench --shapes attn-7b,mlp-up-7b,mlp-down-7b --tokens 512,2048,8192 \
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
  NCU_TUNE_ONLY=1 timeout 240 "$PY" /tmp/ncu_step.py > "$OUT/ncu-tune.log" 2>&1; echo "tune rc=$?"
  timeout "${NCU_TIMEOUT:-300}" ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum,dram__bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed \
      --csv "$PY" /tmp/ncu_step.py > "$OUT/ncu.csv" 2> "$OUT/ncu.log"
  echo "ncu rc=$?"; tail -20 "$OUT/ncu.csv"
}

# --- quick ----------------------------------------------------------------------------------------------
QUICK_BUDGET=${QUICK_BUDGET:-440}
VERDICTS=()
DRY_CLOCK=0  # a dry run's simulated time: each planned stage is assumed to use its whole timeout

now() {  # seconds used so far: the real clock, or in a dry run the simulated one alone (a plan that does
  # not depend on how long this machine took to start the script: tests/test_gpu_check.py)
  if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then echo "$DRY_CLOCK"; else echo "$SECONDS"; fi
}

stage_time() {  # stage_time CAP RESERVE MIN: min(CAP, time left - RESERVE), or 0 when that is below MIN
  local left=$((QUICK_BUDGET - $(now) - $2)) t=$1
  [ "$left" -lt "$t" ] && t=$left
  [ "$t" -lt "$3" ] && t=0
  echo "$t"
}

run_stage() {  # run_stage NAME CAP RESERVE MIN TAIL command...: under its timeout, output appended to quick.log
  local name=$1 secs tail=$5 rc start=$SECONDS
  secs=$(stage_time "$2" "$3" "$4")
  shift 5
  if [ "$secs" -eq 0 ]; then
    VERDICTS+=("$name: SKIPPED (not enough of QUICK_BUDGET=${QUICK_BUDGET}s left at $(now)s)")
    echo "=== $name: skipped, not enough time left ===" | tee -a "$OUT/quick.log"
    return 0
  fi
  if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    echo "would run [$name, timeout ${secs}s, from ${DRY_CLOCK}s at the latest]: $(printf '%q ' "$@")"
    VERDICTS+=("$name: planned, timeout ${secs}s")
    DRY_CLOCK=$((DRY_CLOCK + secs))
    return 0
  fi
  echo "=== $name: timeout ${secs}s, started at ${SECONDS}s ($(date +%T)) ===" | tee -a "$OUT/quick.log"
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee -a "$OUT/quick.log" > "/tmp/gpu_check_$name.log"
  rc=${PIPESTATUS[0]}
  local verdict="rc=$rc, $((SECONDS - start))s"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict+=" (stopped by its timeout: what it wrote is kept)"
  VERDICTS+=("$name: $verdict")
  echo "=== $name: $verdict ===" | tee -a "$OUT/quick.log"
  tail -n "$tail" "/tmp/gpu_check_$name.log"
}

quick() {
  : > "$OUT/quick.log"
  local pytest_flags=(-m gpu -n "${QUICK_WORKERS:-12}" -v -rfEs -p no:cacheprovider --durations=15)
  if "$PY" -c "import pytest_timeout" 2> /dev/null; then pytest_flags+=(--timeout 100); fi
  [ -n "${GPU_CHECK_DRY_RUN:-}" ] && pytest_flags+=(--timeout 100)
  local ref=(--shapes attn-7b --tokens 8192 --ranks 16 --dtype bf16 --adapter-dtype fp32 --dropout 0,0.1)
  echo "quick: QUICK_BUDGET=${QUICK_BUDGET}s; stages tests-bf16, tests-rest, warm, bench, decoder (results in $OUT)"
  # name cap reserve min tail: the reserve keeps the later, more important stages their time
  run_stage tests-bf16 120 0 30 12 env FUSED_LORA_AUTOTUNE=0 "$PY" -m pytest tests -k bf16 "${pytest_flags[@]}"
  run_stage tests-rest 110 210 30 12 env FUSED_LORA_AUTOTUNE=0 "$PY" -m pytest tests -k "not bf16" "${pytest_flags[@]}"
  run_stage warm 60 160 20 3 "$PY" -m fused_lora.bench.warm "${ref[@]}"
  run_stage bench 160 0 40 30 "$PY" -m fused_lora.bench "${ref[@]}" --modes fwd,fwdbwd \
      --providers fused,fused-tma,hybrid,peft,addmm,floor --no-plots --no-progress --out "$OUT/bench.jsonl"
  run_stage decoder 400 0 60 30 "$PY" -m fused_lora.bench --case decoder --tokens 8192 --seq-len 2048 --ranks 16 \
      --dtype bf16 --adapter-dtype fp32 --dropout 0,0.1 --modes fwd,fwdbwd --rep 200 --no-plots --no-progress \
      --out "$OUT/decoder.jsonl"
  echo "=== quick: $(now)s in all$([ -n "${GPU_CHECK_DRY_RUN:-}" ] && echo ' (dry run: the worst case)') ===" | tee -a "$OUT/quick.log"
  printf '  %s\n' "${VERDICTS[@]}" | tee -a "$OUT/quick.log"
}

case "$STAGE" in
  quick) quick ;;
  tests) tests ;;
  sanitize) sanitize ;;
  bench) bench "$@" ;;
  sweep) sweep "$@" ;;
  ncu) ncu_run ;;
esac
