"""Run the Triton decode, small-batch and prefill paths once each, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_triton.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_triton.py --preset 1.2b --tokens 4096

With --tokens, runs only those token counts (no max_active) at the given preset.
"""
import argparse

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs

p = argparse.ArgumentParser()
p.add_argument("--preset", default="0.1b")
p.add_argument("--tokens", nargs="*", type=int)
args = p.parse_args()
cfg = DecoConfig.preset(args.preset)
cases = [(T, None) for T in args.tokens] if args.tokens else [(1, None), (1, 4), (24, None), (300, None), (300, 3)]
with torch.no_grad():
    for T, max_active in cases:
        x, w, _ = layer_inputs(cfg, T, "cuda", seed=T)
        y = ops.deco_ffn(x, **w, max_active=max_active, backend="triton")
        torch.cuda.synchronize()
        print("T", T, "max_active", max_active, "ok", bool(torch.isfinite(y).all()))
