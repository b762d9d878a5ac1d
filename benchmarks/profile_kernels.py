"""Per-kernel GPU time of the Triton path (torch.profiler), to see where a layer's time goes.

    python benchmarks/profile_kernels.py --preset 1.2b --tokens 1 8 64 4096
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.2b")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 4096])
    p.add_argument("--backend", default="triton")
    args = p.parse_args()
    cfg = DecoConfig.preset(args.preset)
    for T in args.tokens:
        x, w, _ = layer_inputs(cfg, T, "cuda", seed=T)   # the benchmark's layer, ~20% active
        with torch.no_grad():
            for _ in range(3):
                ops.deco_ffn(x, **w, backend=args.backend)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    ops.deco_ffn(x, **w, backend=args.backend)
                torch.cuda.synchronize()
        print(f"== {args.preset} T={T}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
