#!/usr/bin/env bash
# Everything a device session runs, in priority order, each step under its own time limit; results go to one
# archive, $OUT/results.tgz (the device tool brings back at most 8 files), and each step's log tail is printed.
#   bash benchmarks/gpu_session.sh                       # every step
#   STEPS="check tests bench" bash benchmarks/gpu_session.sh
# Steps (default order): check (per-case path checks of triton and cupy; the prefill launches one by one,
# benchmarks/check_grouped.py), host (the Python cost of an eager call,
# benchmarks/host_overhead.py), tests (the gpu-marked tests),
# sanitizer (compute-sanitizer memcheck of the Triton paths), tune (deco-kernels tune, all presets, into
# $RES/tune_caches; validate and commit them afterwards, on any machine), bench (deco-kernels bench --quick),
# parity (50-step training parity), elastic (the elastic experiment; needs data/shakespeare, see benchmarks/elastic_experiment.py
# prepare; ELASTIC_ARGS adds arguments), bench_repeat (the bench again, into bench_repeat/, for
# benchmarks/compare_bench.py), micro (the pytest-benchmark microbenchmarks of benchmarks/; quick unless
# MICRO_QUICK=0), ddp (benchmarks/ddp_check.py on DDP_GPUS=2 GPUs, its own limit DDP_TIMEOUT s), sweep and
# profile (tile sweep and kernel profile), layer_profile (one layer's training step, benchmarks/profile_model.py),
# host_profile (the same for 0.1b plus the whole model's training step, with the Python functions' host time)
# train_sweep (the training kernels' tiles, benchmarks/sweep_train_tiles.py), train_graph (one layer's training
# step eager and from a CUDA graph, synchronised and sync-free sizing, benchmarks/probe_train_graph.py), router
# (the prefill router launch alone over its geometry, benchmarks/probe_router.py) and decode (the small-batch
# paths with and without programmatic dependent launch, benchmarks/probe_decode_paths.py) and recheck (the cost
# model's picks re-measured against the tune's best on the shipped cache of this GPU, benchmarks/recheck_picks.py;
# RECHECK_ROUNDS rounds); the last twelve are not in the default list.
# Per-step limits in seconds: LIMIT_<step> (defaults below); TESTS picks test paths, TEST_ARGS replaces "-m gpu"
# (e.g. TEST_ARGS=-x also runs the interpreter tests, on the GPU); TUNE_BUDGET (s) the tune's
# budget, TUNE_ARGS more tune arguments (e.g. --kernels small_batch); SWEEP="1.2b:8,64 0.1b:8" and PROFILE="1.2b:1,8" pick presets and token counts.
set -uo pipefail
OUT=${OUT:-/tmp/deco_out}
RES=${RES:-/tmp/deco_results}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 RES
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$RES/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

declare -A LIMIT=([check]=270 [host]=60 [tests]=400 [sanitizer]=240 [tune]=420 [bench]=300 [parity]=90 [elastic]=300
                  [bench_repeat]=300 [micro]=200 [ddp]=240 [sweep]=300 [profile]=120
                  [layer_profile]=150 [host_profile]=240 [train_sweep]=300 [train_graph]=300 [router]=240 [decode]=200
                  [recheck]=300)
TIMEOUT_FLAG=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=180)

run_step() {
  local name=$1
  case $name in
    check) python3 benchmarks/check_triton_paths.py && python3 benchmarks/check_cupy.py \
             && (cd benchmarks && python3 check_grouped.py --preset 1.2b --tokens 512 4096 \
                 && python3 check_grouped.py --preset 0.1b --tokens 4096) ;;
    host) python3 benchmarks/host_overhead.py && python3 benchmarks/host_overhead.py --train ;;
    # eval: TEST_ARGS may quote, e.g. TEST_ARGS='-m gpu -k "cuda_graph or small_batch"'
    tests) eval python3 -m pytest -q "$TIMEOUT_FLAG" "${TEST_ARGS:--m gpu}" "${TESTS:-tests}" ;;
    sanitizer) (cd benchmarks && compute-sanitizer --tool memcheck python3 sanitize_triton.py \
                  && compute-sanitizer --tool memcheck python3 sanitize_triton.py --train) ;;
    # The tune writes into a copy of the shipped caches under $RES after every entry, so a step cut by its
    # limit still brings back what was measured. No --validate here: its held-out refits are minutes of CPU
    # (they cut the step of 2026-12-05); run `deco-kernels tune --validate-cache FILE` on the results instead.
    tune) rm -rf "$RES/tune_caches" && cp -r autotune/caches "$RES/tune_caches" \
            && deco-kernels tune --preset all --budget "${TUNE_BUDGET:-360}" --out "$RES/tune_caches" \
                 ${TUNE_ARGS:-} ;;
    bench) deco-kernels bench --quick --out "$RES/bench" ;;
    bench_repeat) deco-kernels bench --quick --out "$RES/bench_repeat" ;;
    micro) DECO_BENCH_QUICK=${MICRO_QUICK:-1} python3 -m pytest -q -p no:cacheprovider benchmarks \
             --benchmark-json="$RES/micro_ops.json" --benchmark-columns=median,rounds ;;
    parity) python3 benchmarks/train_parity.py --out "$RES/train_parity.json" ;;
    elastic) python3 benchmarks/elastic_experiment.py all --out "$RES/elastic" ${ELASTIC_ARGS:-} ;;
    ddp) torchrun --nproc_per_node="${DDP_GPUS:-2}" benchmarks/ddp_check.py --timeout "${DDP_TIMEOUT:-200}" --out "$RES/ddp_check.json" ;;
    sweep) for spec in ${SWEEP:-1.2b:8,64 0.1b:8}; do
             (cd benchmarks && python3 sweep_tiles.py --preset "${spec%%:*}" --tokens $(echo "${spec#*:}" | tr , " ") \
               --out "$RES/sweep_tiles_${spec%%:*}.json")
           done ;;
    decode) python3 benchmarks/probe_decode_paths.py --presets 1.2b 0.1b --tokens 1 2 8 64 --prefill \
              --out "$RES/probe_decode_paths.json" ;;
    router) (cd benchmarks && python3 probe_router.py --preset 1.2b 0.1b --tokens 512 4096 --block-k 64 128 \
               --stages 1 3 --out "$RES/probe_router.json") ;;
    recheck) python3 benchmarks/recheck_picks.py --rounds "${RECHECK_ROUNDS:-3}" --out "$RES/recheck_picks.json" ;;
    train_sweep) python3 benchmarks/sweep_train_tiles.py --preset 1.2b 0.1b --out "$RES/sweep_train_tiles.json" ;;
    train_graph) python3 benchmarks/probe_train_graph.py --presets 1.2b 0.1b --tokens 4096 \
                   --out "$RES/probe_train_graph.json" ;;
    layer_profile) python3 benchmarks/profile_model.py --layers 0.1b 1.2b --models --out "$RES/profile_model.json" ;;
    host_profile) python3 benchmarks/profile_model.py --layers 0.1b --models --train-models 0.1b --python \
                    --out "$RES/profile_host.json" ;;
    profile) for spec in ${PROFILE:-1.2b:1,8,4096}; do
               (cd benchmarks && python3 profile_kernels.py --preset "${spec%%:*}" --tokens $(echo "${spec#*:}" | tr , " "))
             done ;;
    *) echo "unknown step $name"; return 2 ;;
  esac
}

for name in ${STEPS:-check host tests sanitizer tune bench parity elastic}; do
  start=$(date +%s)
  limit_var="LIMIT_$name"
  limit=${!limit_var:-${LIMIT[$name]:-300}}
  timeout "$limit" bash -c "$(declare -f run_step); TIMEOUT_FLAG='$TIMEOUT_FLAG' run_step $name" \
    > "$RES/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)"
  tail -n 12 "$RES/$name.log" | cut -c1-220
  tar czf "$OUT/results.tgz" -C "$RES" .   # after every step: a later timeout keeps what is done
done
