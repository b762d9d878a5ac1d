"""The whole model's training step (forward, backward, AdamW on 4096 tokens), host-bound on the lent machine:
this session's two host-side changes against their predecessors, interleaved in one run so the shared host's
drift hits every variant alike.

Variants: "dense_twin" (the dense-twin model); "deco" (as shipped: the direct Triton launcher and the fused
gate_stats op); "deco_torch_stats" (gate_stats through the reference's torch ops, i.e. the ~30 small launches
per layer of before); "deco_before" (that, and every Triton launch through Triton's own entry). Per variant
and round: the median wall time of 5 steps (each synchronised), and per step the CPU time of the calling
thread (forward, optimizer) and of the whole process (autograd's device thread runs the backward).

    python benchmarks/probe_train_host.py --preset 0.1b --out train_host.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from unittest import mock

import torch

from deco_kernels import DecoConfig, calibrate, modules
from deco_kernels.benchmark import bench_model, environment
from deco_kernels.reference import ops as ref

VARIANTS = ("dense_twin", "deco", "deco_torch_stats", "deco_before")


def _reference_stats(g, lam, num_layers, backend="auto"):
    return ref.gate_stats(g, lam, num_layers)


def make_step(cfg, dense_twin: bool, tokens: int):
    model, ids = bench_model(cfg, dense_twin)
    if not dense_twin:
        calibrate(model, ids(1024), 0.2, strict=False)
    model.train()
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-6)
    batch = ids(tokens)

    def step():
        opt.zero_grad(set_to_none=True)
        model(batch, labels=batch).loss.backward()
        opt.step()
    return step


def measure(step, steps: int = 5) -> tuple[float, float, float]:
    """(median wall ms per step, CPU ms per step of the calling thread, CPU ms per step of the process), each
    step synchronised. The calling thread runs the forward and the optimizer; autograd runs a CUDA backward
    on its own device thread, which only the process figure counts."""
    walls, cpu0, proc0 = [], time.thread_time(), time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    return (statistics.median(walls), (time.thread_time() - cpu0) * 1e3 / steps,
            (time.process_time() - proc0) * 1e3 / steps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="0.1b")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = DecoConfig.preset(args.preset)
    steps = {"dense_twin": make_step(cfg, True, args.tokens)}
    steps["deco"] = steps["deco_torch_stats"] = steps["deco_before"] = make_step(cfg, False, args.tokens)
    runs = {v: {"wall_ms": [], "cpu_ms": [], "process_cpu_ms": []} for v in VARIANTS}
    for r in range(args.rounds + 1):   # round 0 warms up (compilation, allocator) and is not kept
        for v in VARIANTS:
            os.environ["DECO_KERNELS_FAST_LAUNCH"] = "0" if v == "deco_before" else "1"
            patch = mock.patch.object(modules.ops, "gate_stats", _reference_stats) if v in (
                "deco_torch_stats", "deco_before") else contextlib.nullcontext()
            with patch:
                wall, cpu, proc = measure(steps[v])
            if r:
                runs[v]["wall_ms"].append(wall)
                runs[v]["cpu_ms"].append(cpu)
                runs[v]["process_cpu_ms"].append(proc)
    os.environ.pop("DECO_KERNELS_FAST_LAUNCH")
    summary = {v: {k: min(x) for k, x in runs[v].items()} for v in VARIANTS}
    for v in VARIANTS:
        summary[v]["tokens_per_s"] = args.tokens / (summary[v]["wall_ms"] * 1e-3)
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            what = ("whole-model training step; least over rounds of (median wall of 5 synchronised steps, "
                    "calling thread's CPU per step, process CPU per step)")
            json.dump(dict(environment(), preset=args.preset, tokens=args.tokens, what=what, summary=summary,
                           runs=runs), f, indent=1)


if __name__ == "__main__":
    main()
