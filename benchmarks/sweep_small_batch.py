"""Time the small-batch Triton path over a grid of tile configs (one layer, bf16, CUDA graph per config).

    python benchmarks/sweep_small_batch.py --preset 1.2b --tokens 1 8 --out sweep.json

A first, exhaustive form of what the autotune harness will do; prints the best configs last.
"""
import argparse
import itertools
import json

import torch
from triton.testing import do_bench

from bench_layer import make_layer
from deco_kernels import DecoConfig, layout
from deco_kernels.triton import ffn

GRID = dict(up_block_r=[16, 64], up_block_k=[128, 256], up_warps=[4, 8], up_stages=[3],
            down_block_d=[16, 64], down_group=[1, 4], down_warps=[4])


def run(x, w, bias, g, y, cfg):
    wbar = layout.expert_mean(w["w_up"])
    ffn._small_batch(x, w, wbar, bias, 0.0, None, g, y, cfg)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.2b")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    p.add_argument("--out", default="sweep.json")
    args = p.parse_args()
    cfg_model = DecoConfig.preset(args.preset)
    results = []
    for T in args.tokens:
        x, w, bias, _ = make_layer(cfg_model, T, seed=T)
        g = torch.empty(T, cfg_model.num_experts, device="cuda", dtype=torch.float32)
        y = torch.empty_like(x)
        keys = list(GRID)
        for values in itertools.product(*GRID.values()):
            cfg = dict(zip(keys, values))
            if cfg["up_block_r"] > cfg_model.expert_dim:
                continue
            try:
                with torch.no_grad():
                    run(x, w, bias, g, y, cfg)
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        run(x, w, bias, g, y, cfg)
                us = do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3
            except Exception as e:  # a config that fails to compile or launch is skipped, not fatal
                us = None
                print("fail", cfg, type(e).__name__, str(e)[:80])
            results.append(dict(T=T, us=us, **cfg))
        best = sorted((r for r in results if r["T"] == T and r["us"]), key=lambda r: r["us"])[:5]
        default = ffn.small_batch_config(T)
        print(f"T={T} default={default}")
        for r in best:
            print(f"  {r['us']:7.1f} us  " + " ".join(f"{k}={r[k]}" for k in keys))
    with open(args.out, "w") as f:
        json.dump(dict(preset=args.preset, gpu=torch.cuda.get_device_name(), rows=results), f, indent=1)


if __name__ == "__main__":
    main()
