"""Where the small-batch path's time goes (T = 5..64): the layer under a CUDA graph and each kernel's own time
(torch.profiler), with the router fused into the up-projection (the default) and with the gates from the
router kernel first (max_active = N - 1, which caps nothing at ~20% active: the third-launch path).

    python benchmarks/probe_small_batch.py --presets 1.2b 0.1b --tokens 8 16 64 --out probe.json
"""
import argparse
import json

import torch

from deco_kernels import ops
from deco_kernels.benchmark import GpuTimer, kernel_times, preset_inputs, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for preset, cfg, T, x, w, dense in preset_inputs(args.presets, args.tokens):
        variants = {"dense_twin": lambda: ops.dense_swiglu(x, **dense),
                    "fused_router": lambda: ops.deco_ffn(x, **w, backend="triton"),
                    "router_first": lambda: ops.deco_ffn(x, **w, max_active=cfg.num_experts - 1,
                                                         backend="triton")}
        with torch.no_grad():
            for name, fn in variants.items():
                rows.append(dict(preset=preset, T=T, variant=name, graph_us=timer(fn, True),
                                 kernels_us=kernel_times(fn, 20)))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
