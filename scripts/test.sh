#!/usr/bin/env bash
# Install (into .venv) and run the whole test suite. Without a GPU the kernels run through Triton's
# interpreter, every kernel config is compiled for sm_80/sm_90a, and the GPU tests are skipped (listed).
#
# A full run (no arguments) then compiles every kernel again under each Triton version named by
# FUSED_LORA_CHECK_TRITON (default 3.8.0; space-separated; "none" skips it): tests/test_compile.py runs
# with that version put ahead of the venv's (pip install --target .venv/tritons/<version>), after the
# main run rather than beside it, so the two do not share the cores. Each run's verdict is printed at the
# end and any failure fails the script. With arguments only pytest runs, unless the variable is set.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

if [ $# -eq 0 ]; then
  check_tritons=${FUSED_LORA_CHECK_TRITON-3.8.0}
else
  check_tritons=${FUSED_LORA_CHECK_TRITON-}
fi
case "$check_tritons" in none | off | 0) check_tritons= ;; esac

main_triton=$(python -c "import importlib.metadata as m; print(m.version('triton'))" 2> /dev/null || echo "?")
summary=()
status=0

set +e
python -m pytest -n "${PYTEST_WORKERS:-auto}" "$@"
rc=$?
set -e
if [ $rc -eq 0 ]; then
  summary+=("tests (triton $main_triton): passed")
else
  summary+=("tests (triton $main_triton): FAILED (pytest exit code $rc; see above)")
  status=1
fi

for version in $check_tritons; do
  target=.venv/tritons/$version
  log=.venv/tritons/$version.log
  echo
  echo "=== compile check under triton $version (tests/test_compile.py; FUSED_LORA_CHECK_TRITON=none skips it) ==="
  mkdir -p .venv/tritons
  if [ "$(PYTHONPATH=$target python -c 'import triton; print(triton.__version__)' 2> /dev/null)" != "$version" ]; then
    rm -rf "$target"
    if ! pip install -q --no-deps --target "$target" "triton==$version" > "$log.install" 2>&1; then
      cat "$log.install"
      summary+=("compile check, triton $version: NOT RUN (pip could not install triton==$version; see above)")
      status=1
      continue
    fi
  fi
  set +e
  PYTHONPATH=$target FUSED_LORA_EXPECT_TRITON=$version \
    python -m pytest tests/test_compile.py -n 0 -q -p no:cacheprovider 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [ $rc -eq 0 ]; then
    summary+=("compile check, triton $version: passed")
  else
    summary+=("compile check, triton $version: FAILED (pytest exit code $rc; log $log; the table alone:
    PYTHONPATH=$target .venv/bin/python -m fused_lora.compile_check)")
    status=1
  fi
done

echo
echo "=== summary ==="
printf '%s\n' "${summary[@]}"
exit $status
