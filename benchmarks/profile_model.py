"""Where the time of the host-bound figures goes: one layer's forward + backward (the training path) and the
whole model's prefill, each profiled with torch.profiler (GPU kernels and host operators), next to the eager
wall time of one call. When the wall time is far above the kernels' sum, the host (launches, synchronisation)
sets it.

    python benchmarks/profile_model.py --layers 0.1b 1.2b --models 0.5b --tokens 4096 --out profile.json
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import TARGET_RATIO, bench_model, device_kernels, train_inputs, write_result
from deco_kernels.elastic import calibrate


def breakdown(fn, reps: int = 5, top: int = 12) -> dict:
    """Eager wall µs per call, GPU kernel µs per call (sum over the device-side events only), the top kernels
    and the top host operators (self CPU time)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = device_kernels(events, reps)
    host = sorted(((e.key, e.self_cpu_time_total / reps) for e in events), key=lambda kv: -kv[1])
    return dict(wall_us=wall, kernel_sum_us=sum(v for _, v in kernels),
                kernels=[(k[:70], round(v, 1)) for k, v in kernels[:top]],
                host=[(k[:70], round(v, 1)) for k, v in host[:top]])


def layer_rows(preset: str, T: int) -> list:
    cfg = DecoConfig.preset(preset)
    x, w, dense, dy = train_inputs(cfg, T)   # the benchmark's training case
    calls = {"dense_twin": lambda: ops.dense_swiglu(x, **dense).backward(dy),
             "triton": lambda: ops.deco_ffn(x, **w, backend="triton").backward(dy)}
    return [dict(part="layer_train", preset=preset, T=T, variant=k, **breakdown(fn)) for k, fn in calls.items()]


def model_rows(preset: str, T: int) -> list:
    cfg = DecoConfig.preset(preset)
    rows = []
    for dense_twin in (True, False):
        model, next_ids = bench_model(cfg, dense_twin)
        if not dense_twin:
            calibrate(model, next_ids(1024), TARGET_RATIO, strict=False)
        ids = next_ids(T)
        model.eval()
        with torch.no_grad():
            rows.append(dict(part="model_prefill", preset=preset, T=T,
                             variant="dense_twin" if dense_twin else "deco", **breakdown(lambda: model(ids))))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", nargs="*", default=["0.1b", "1.2b"])
    p.add_argument("--models", nargs="*", default=["0.5b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for preset in args.layers:
        rows += layer_rows(preset, args.tokens)
    for preset in args.models:
        rows += model_rows(preset, args.tokens)
    for r in rows:
        print(f"== {r['part']} {r['preset']} T={r['T']} {r['variant']}: wall {r['wall_us']:.0f} µs, "
              f"kernels {r['kernel_sum_us']:.0f} µs")
        print("   kernels:", r["kernels"][:8])
        print("   host:   ", r["host"][:8])
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
