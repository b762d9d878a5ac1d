#!/usr/bin/env bash
# Everything one device session runs, in order: install, GPU tests, tile sweep, sanitizer, kernel profile,
# benchmark. Results go to $OUT (the device tool provides it).
#   bash benchmarks/gpu_session.sh [bench_layer.py args]
# Steps are skipped with SKIP_CHECK=1 (per-case path check), SKIP_TESTS=1, SKIP_SWEEP=1, SKIP_SANITIZER=1, SKIP_PROFILE=1, SKIP_BENCH=1.
# TESTS="tests/..." picks the test files (default: every test; the GPU-only ones are marked gpu).
# SWEEP="1.2b:1,8,64,4096 0.1b:1,8" (SWEEP_QUICK=1: first knob group only) and PROFILE="1.2b:1,8" pick the presets and token counts of the sweep
# and of the kernel profile.
set -uo pipefail
OUT=${OUT:-/tmp/deco_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ -z "${SKIP_CHECK:-}" ]; then
  python3 benchmarks/check_triton_paths.py 2>&1 | tee "$OUT/check_triton_paths.log"
fi
if [ -z "${SKIP_TESTS:-}" ]; then
  # a hung test must not eat the device call: a per-test limit where pytest-timeout is installed
  python3 -m pytest -q $(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=180) ${TESTS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
fi
if [ -z "${SKIP_SWEEP:-}" ]; then
  for spec in ${SWEEP:-1.2b:1,8,64,4096 0.1b:1,8}; do
    preset=${spec%%:*}
    tokens=${spec#*:}
    (cd benchmarks && python3 sweep_tiles.py ${SWEEP_QUICK:+--quick} --preset "$preset" --tokens $(echo "$tokens" | tr , " ") \
      --out "$OUT/sweep_tiles_$preset.json") 2>&1 | grep -v "^fail" | tee -a "$OUT/sweep.log"
  done
fi
if [ -z "${SKIP_SANITIZER:-}" ]; then
  (cd benchmarks && compute-sanitizer --tool memcheck python3 sanitize_triton.py) 2>&1 | tail -8 | tee "$OUT/memcheck.log"
fi
if [ -z "${SKIP_PROFILE:-}" ]; then
  for spec in ${PROFILE:-1.2b:1,8,64,512,4096}; do
    (cd benchmarks && python3 profile_kernels.py --preset "${spec%%:*}" --tokens $(echo "${spec#*:}" | tr , " "))
  done > "$OUT/profile.log" 2>&1
  grep -E "^==|Self CUDA|_kernel|gemm|elementwise|copy" "$OUT/profile.log" | cut -c1-60,100-140 | head -60
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  python3 benchmarks/bench_layer.py "$@" --out "$OUT/bench_layer.json" 2>&1 | tee "$OUT/bench.log" | tail -16
fi
