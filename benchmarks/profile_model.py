"""Where the time of the host-bound figures goes: one layer's forward + backward (the training path), the
whole model's prefill and its training step, each profiled with torch.profiler (GPU kernels and host
operators), next to the eager wall time of one call. When the wall time is far above the kernels' sum, the
host (launches, synchronisation) sets it; --python adds the Python functions that take the host's time
(cProfile: own time and time including callees, per call).

    python benchmarks/profile_model.py --layers 0.1b 1.2b --models 0.5b --tokens 4096 --out profile.json
    python benchmarks/profile_model.py --layers 0.1b --models --train-models 0.1b --python --out host.json
"""
import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import TARGET_RATIO, bench_model, device_kernels, train_inputs, write_result
from deco_kernels.elastic import calibrate


PYTHON = False   # --python: add the cProfile rows


def python_profile(fn, reps: int, top: int) -> dict:
    """The Python functions with the most host time per call: by own time and by time including callees."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats   # {(file, line, name): (calls, prim calls, own s, cumulative s, callers)}

    def name(key):
        path, line, func = key
        return f"{'/'.join(path.split('/')[-2:])}:{line}({func})"

    def rows(column):
        ranked = sorted(stats.items(), key=lambda kv: -kv[1][column])[:top]
        return [(name(k), round(v[column] / reps * 1e6, 1), round(v[0] / reps, 1)) for k, v in ranked]
    return dict(python_own_us=rows(2), python_cum_us=rows(3))


def breakdown(fn, reps: int = 5, top: int = 24) -> dict:
    """Eager wall µs per call, GPU kernel µs per call (sum over the device-side events only), the top kernels
    and the top host operators (self CPU time); with PYTHON also the top Python functions (µs per call, calls
    per call)."""
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
    out = dict(wall_us=wall, kernel_sum_us=sum(v for _, v in kernels),
               kernels=[(k[:100], round(v, 1)) for k, v in kernels[:top]],
               host=[(k[:70], round(v, 1)) for k, v in host[:top]])
    if PYTHON:
        out.update(python_profile(fn, reps, 3 * top))
    return out


def layer_rows(preset: str, T: int) -> list:
    cfg = DecoConfig.preset(preset)
    x, w, dense, dy = train_inputs(cfg, T)   # the benchmark's training case
    calls = {"dense_twin": lambda: ops.dense_swiglu(x, **dense).backward(dy),
             "triton": lambda: ops.deco_ffn(x, **w, backend="triton").backward(dy)}
    return [dict(part="layer_train", preset=preset, T=T, variant=k, **breakdown(fn)) for k, fn in calls.items()]


def models(preset: str):
    """(variant, model, next_ids) for the dense-twin model and DECO (routers calibrated to ~20% active), the
    benchmark's model part's models, one at a time."""
    cfg = DecoConfig.preset(preset)
    for dense_twin in (True, False):
        model, next_ids = bench_model(cfg, dense_twin)
        if not dense_twin:
            calibrate(model, next_ids(1024), TARGET_RATIO, strict=False)
        yield "dense_twin" if dense_twin else "deco", model, next_ids


def model_rows(preset: str, T: int) -> list:
    """The whole model's prefill of T tokens."""
    rows = []
    for variant, model, next_ids in models(preset):
        ids = next_ids(T)
        model.eval()
        with torch.no_grad():
            rows.append(dict(part="model_prefill", preset=preset, T=T, variant=variant,
                             **breakdown(lambda: model(ids))))
    return rows


def train_model_rows(preset: str, T: int) -> list:
    """The whole model's training step (zero_grad, forward with labels, backward, AdamW), as the benchmark's
    model part times it."""
    rows = []
    for variant, model, next_ids in models(preset):
        model.train()
        opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-6)
        batch = next_ids(T)

        def step():
            opt.zero_grad(set_to_none=True)
            model(batch, labels=batch).loss.backward()
            opt.step()
        rows.append(dict(part="model_train", preset=preset, T=T, variant=variant, **breakdown(step)))
    return rows


def main():
    global PYTHON
    p = argparse.ArgumentParser()
    p.add_argument("--layers", nargs="*", default=["0.1b", "1.2b"])
    p.add_argument("--models", nargs="*", default=["0.5b"])
    p.add_argument("--train-models", nargs="*", default=[])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--python", action="store_true", help="add the cProfile rows (Python host time)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    PYTHON = args.python
    rows = []
    for preset in args.layers:
        rows += layer_rows(preset, args.tokens)
    for preset in args.models:
        rows += model_rows(preset, args.tokens)
    for preset in args.train_models:
        rows += train_model_rows(preset, args.tokens)
    for r in rows:
        print(f"== {r['part']} {r['preset']} T={r['T']} {r['variant']}: wall {r['wall_us']:.0f} µs, "
              f"kernels {r['kernel_sum_us']:.0f} µs")
        print("   kernels:", r["kernels"][:8])
        print("   host:   ", r["host"][:8])
        for key in ("python_own_us", "python_cum_us"):
            for entry in r.get(key, [])[:25]:
                print(f"   {key[7:10]} {entry[1]:9.1f} µs {entry[2]:7.1f}x  {entry[0]}")
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
