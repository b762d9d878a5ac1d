"""One DECO layer vs its dense twin on the present GPU, side by side in one run.

    python benchmarks/bench_layer.py --presets 0.1b 1.2b --tokens 1 8 64 512 4096 --out results.json

A thin wrapper over ``deco_kernels.benchmark`` (the layer part of ``deco-kernels bench``, which also runs the
whole-model figures and the active-ratio sweep and draws the plots). For each preset and token count: the dense
twin (SwiGLU of width d_ff through torch, i.e. cuBLAS), the torch reference path and every available kernel
backend, in bf16, with ~20% of the routed experts active (the tests' weight factory, deco_kernels.testing).
T <= 8 runs under CUDA graphs for the dense twin and the kernels. Times are medians of triton.testing.do_bench
(which flushes L2 between repetitions). Floors: at small T the bytes that must be read (active experts' weights
+ shared + router) over the measured copy bandwidth; at large T the active FLOPs over the measured bf16 matmul
rate. Writes JSON with the device, versions and date (the fields benchmarks/readme_table.py reads), and prints
a table last.
"""
from __future__ import annotations

import argparse
import json

import torch

from deco_kernels import benchmark, benchplot


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(benchmark.QUICK_PRESETS), choices=benchmark.PRESETS)
    p.add_argument("--tokens", nargs="+", type=int, default=list(benchmark.TOKENS))
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference path")
    p.add_argument("--out", default="bench_layer.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_layer.py: needs a CUDA GPU (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    names = benchmark.kernel_backends("cuda")
    timer = benchmark.GpuTimer()
    bw, flops = benchmark.device_ceilings()
    result = dict(environment=benchmark.environment(), copy_bandwidth_Bps=bw, bf16_matmul_flops=flops,
                  one_empty_launch_us=benchmark.launch_floor_us(1, timer),
                  two_empty_launches_us=benchmark.launch_floor_us(2, timer), dtype="bfloat16",
                  graph_max_tokens=benchmark.GRAPH_MAX_T)
    result["rows"] = benchmark.run_layer(args.presets, args.tokens, timer, bw, flops, names,
                                         with_reference=not args.no_reference)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(benchplot.summary(result))


if __name__ == "__main__":
    main()
