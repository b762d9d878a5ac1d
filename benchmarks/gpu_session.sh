#!/usr/bin/env bash
# Everything one device session runs, in order: install, GPU tests, sanitizer, benchmark.
#   bash benchmarks/gpu_session.sh   (OUT=<dir> collects the results; the device tool sets it)
set -uo pipefail
OUT=${OUT:-/tmp/deco_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q tests/test_triton.py -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
(cd benchmarks && compute-sanitizer --tool memcheck python3 sanitize_triton.py) 2>&1 | tail -8 | tee "$OUT/memcheck.log"
python3 benchmarks/bench_layer.py "$@" --out "$OUT/bench_layer.json" 2>&1 | tee "$OUT/bench.log" | tail -16
