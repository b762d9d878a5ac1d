"""What the sync-free pair sizing costs one layer's training step, and what a CUDA graph saves (issue 4), side by
side in one run: forward + backward of one layer on T tokens (bf16, ~20% active, benchmark.train_inputs) for the
dense twin and for Triton with

    eager            the synchronised sizing (eager calls' default)
    eager_static     training.SYNC_FREE: static sizes, h saved for STATIC_H_SHARE = 0.25 of the slots
    eager_recompute  the same with STATIC_H_SHARE = 0: the pair backward recomputes h for every pair
    graph            replayed from a CUDA graph (static sizes, share 0.25; the dense twin's too)
    graph_recompute  the same with share 0
    eager_gemm       ffn.DOWN_GEMM, the deterministic mode: y and dx's expert part by cuBLAS GEMMs over
                     token-major activations instead of the two atomic scatters
    graph_gemm       the same from a CUDA graph

Per variant: µs (eager: GpuTimer's least of medians; graph: median replay), GPU-busy µs of the eager ones
(torch.profiler), the step's peak memory above what is allocated before it, and every gradient's rel_err against
the eager default's (a variant that changes results shows). Rounds are interleaved over the variants.

    python benchmarks/probe_train_graph.py --presets 1.2b 0.1b --tokens 4096 --out results/h200/probe_train_graph.json
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import GpuTimer, device_busy_us, step_peak_bytes, train_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn, training

# name: (graph, training module attributes while it runs, ffn module attributes)
VARIANTS = {
    "eager": (False, dict(SYNC_FREE=False), dict(DOWN_GEMM=0)),
    "eager_static": (False, dict(SYNC_FREE=True, STATIC_H_SHARE=0.25), dict(DOWN_GEMM=0)),
    "eager_recompute": (False, dict(SYNC_FREE=True, STATIC_H_SHARE=0.0), dict(DOWN_GEMM=0)),
    "graph": (True, dict(SYNC_FREE=False, STATIC_H_SHARE=0.25), dict(DOWN_GEMM=0)),
    "graph_recompute": (True, dict(SYNC_FREE=False, STATIC_H_SHARE=0.0), dict(DOWN_GEMM=0)),
    "eager_gemm": (False, dict(SYNC_FREE=False), dict(DOWN_GEMM=1)),
    "graph_gemm": (True, dict(SYNC_FREE=False, STATIC_H_SHARE=0.25), dict(DOWN_GEMM=1)),
}


def gradients(fn, leaves) -> list[torch.Tensor]:
    for t in leaves:
        t.grad = None
    fn()
    return [t.grad.float().clone() for t in leaves]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    timer = GpuTimer(rep_ms=100, warmup_ms=10)
    rows = []
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        for T in args.tokens:
            x, w, dense, dy = train_inputs(cfg, T)
            leaves = [x, *w.values()]
            calls = {"dense_twin": lambda: ops.dense_swiglu(x, **dense).backward(dy),
                     "triton": lambda: ops.deco_ffn(x, **w, backend="triton").backward(dy)}
            reference = gradients(calls["triton"], leaves)
            cases = [("dense_twin", v) for v in ("eager", "graph")] + [("triton", v) for v in VARIANTS]
            times = {case: [] for case in cases}
            extra = {}
            for r in range(args.rounds):
                for name, variant in cases:
                    graph, attrs, ffn_attrs = VARIANTS[variant]
                    with mock.patch.multiple(training, **attrs), mock.patch.multiple(ffn, **ffn_attrs):
                        times[(name, variant)].append(timer(calls[name], graph))
                        if r == 0:
                            info = extra.setdefault((name, variant), {})
                            if not graph:
                                info["gpu_us"] = device_busy_us(calls[name])
                                info["peak_bytes"] = step_peak_bytes(calls[name])
                                if name == "triton":
                                    info["rel_err"] = max(rel_err(a, b) for a, b in
                                                          zip(gradients(calls[name], leaves), reference))
            for name, variant in cases:
                row = dict(preset=preset, T=T, backend=name, variant=variant, us=statistics.median(times[(name, variant)]),
                           us_rounds=times[(name, variant)], **extra.get((name, variant), {}))
                rows.append(row)
                print(f"{preset} T={T} {name:>10s} {variant:>16s}: {row['us']:8.1f} µs "
                      + " ".join(f"{k} {v:.3g}" for k, v in row.items() if k in ("gpu_us", "peak_bytes", "rel_err")),
                      flush=True)
            torch.cuda.empty_cache()
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
