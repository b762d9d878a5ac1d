"""Host cost of one Triton launch on this machine, and where it goes: Triton's JIT entry (argument binding,
specialisation, cache key) against calling the compiled kernel's launcher directly, for an empty kernel with
few and with many arguments, next to torch's own per-op host cost. Writes JSON.

    python benchmarks/probe_launch.py --out launch.json

--layers adds the eager figures this cost sets, with the direct launcher on and off (DECO_KERNELS_FAST_LAUNCH)
in the same run, alternating: one layer's forward at T=64 and 512, and its forward + backward at T=4096; both
the eager time (GPU events) and the host thread's CPU time per call.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
import triton.language as tl

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import GpuTimer, environment, layer_inputs, train_inputs


@triton.jit
def _empty4(a, b, n, m, BLOCK: tl.constexpr):
    pass


@triton.jit
def _empty30(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15, p16, p17, p18, p19,
             n0, n1, n2, n3, n4, n5, n6, f0, f1, f2, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    pass


def per_call_us(fn, calls: int = 2000) -> float:
    """Median over 5 rounds of the host time per call (the GPU keeps up: the kernels are empty)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def direct(compiled, grid):
    """The compiled kernel's C launcher, called with what Triton's JIT entry would pass it."""
    from triton import knobs
    from triton.runtime.driver import driver

    compiled._init_handles()
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    fn, meta = compiled.function, compiled.packed_metadata
    enter, exit_ = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    return lambda *args: compiled.run(g0, g1, g2, stream, fn, meta, None, enter, exit_, *args)


def cpu_us(fn, calls: int = 20) -> float:
    """Median over 5 rounds of the calling thread's CPU time per call (time.thread_time): the host's own work,
    without the time the thread waits descheduled on a shared machine (a synchronisation's spin-wait counts)."""
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        rounds.append((time.thread_time() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(rounds)[2]


def layer_rows(preset: str) -> list[dict]:
    """Eager µs (least of five medians, GpuTimer) and host CPU µs per call with the direct launcher on and off,
    alternating twice."""
    cfg = DecoConfig.preset(preset)
    timer = GpuTimer()
    x, w, _ = layer_inputs(cfg, 512, "cuda")
    xt, wt, _, dy = train_inputs(cfg, 4096)
    calls = {f"forward T={T}": (lambda T=T: ops.deco_ffn(x[:T], **w, backend="triton")) for T in (64, 512)}
    calls["forward+backward T=4096"] = lambda: ops.deco_ffn(xt, **wt, backend="triton").backward(dy)
    rows = []
    for name, fn in calls.items():
        us = {"direct": [], "triton_entry": []}
        cpu = {"direct": [], "triton_entry": []}
        for _ in range(2):
            for mode, flag in (("direct", "1"), ("triton_entry", "0")):
                os.environ["DECO_KERNELS_FAST_LAUNCH"] = flag
                with torch.no_grad() if "backward" not in name else torch.enable_grad():
                    fn()
                    us[mode].append(timer(fn, False))
                    cpu[mode].append(cpu_us(fn))
        os.environ.pop("DECO_KERNELS_FAST_LAUNCH")
        rows.append(dict(preset=preset, call=name, us={k: min(v) for k, v in us.items()},
                         cpu_us={k: min(v) for k, v in cpu.items()}, runs=us, cpu_runs=cpu))
        print({k: rows[-1][k] for k in ("preset", "call", "us", "cpu_us")})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--layers", nargs="*", default=[], help="presets for the eager layer figures")
    args = p.parse_args()
    dev = "cuda"
    t = [torch.empty(1024, device=dev) for _ in range(20)]
    ints = [4096, 1792, 102, 64, 7, 1, 13]
    floats = [1e-5, 0.5, 2.0]
    rows = {}
    a4 = (t[0], t[1], 4096, 17)
    k4 = _empty4[(1,)](*a4, BLOCK=64)
    rows["triton_jit_4_args"] = per_call_us(lambda: _empty4[(1,)](*a4, BLOCK=64))
    d4 = direct(k4, (1,))
    rows["triton_direct_4_args"] = per_call_us(lambda: d4(*a4, 64))
    a30 = (*t, *ints, *floats)
    k30 = _empty30[(3, 2)](*a30, A=64, B=32, C=16)
    rows["triton_jit_30_args"] = per_call_us(lambda: _empty30[(3, 2)](*a30, A=64, B=32, C=16))
    d30 = direct(k30, (3, 2))
    rows["triton_direct_30_args"] = per_call_us(lambda: d30(*a30, 64, 32, 16))
    x = torch.randn(64, 64, device=dev)
    rows["torch_empty"] = per_call_us(lambda: torch.empty(4096, 64, device=dev))
    rows["torch_add_"] = per_call_us(lambda: x.add_(1.0))
    rows["torch_mm"] = per_call_us(lambda: torch.mm(x, x))
    layers = [row for preset in args.layers for row in layer_rows(preset)]
    out = dict(environment(), what="host µs per call (median of 5 rounds of 2000 calls, empty kernels)",
               rows=rows, layers=layers)
    print(json.dumps(rows, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
