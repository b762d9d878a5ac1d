"""Where the small-batch path's time goes (T = 5..64): the layer under a CUDA graph and each kernel's own time
(torch.profiler), with the router fused into the up-projection (the default) and with the gates from the
router kernel first (max_active = N - 1, which caps nothing at ~20% active: the third-launch path).

    python benchmarks/probe_small_batch.py --presets 1.2b 0.1b --tokens 8 16 64 --out probe.json
"""
import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import GpuTimer, device_kernels, environment, layer_inputs


def kernel_us(fn, reps: int = 20) -> dict:
    """{kernel name: mean µs per call} over ``reps`` eager calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return dict(device_kernels(prof.key_averages(), reps))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        x_all, w, dense = layer_inputs(cfg, max(args.tokens), "cuda")
        for T in args.tokens:
            x = x_all[:T]
            variants = {"dense_twin": lambda: ops.dense_swiglu(x, **dense),
                        "fused_router": lambda: ops.deco_ffn(x, **w, backend="triton"),
                        "router_first": lambda: ops.deco_ffn(x, **w, max_active=cfg.num_experts - 1,
                                                             backend="triton")}
            with torch.no_grad():
                for name, fn in variants.items():
                    row = dict(preset=preset, T=T, variant=name, graph_us=timer(fn, True), kernels_us=kernel_us(fn))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
