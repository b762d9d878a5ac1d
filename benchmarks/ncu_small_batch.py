"""One small-batch layer call for Nsight Compute (`ncu --section ... python benchmarks/ncu_small_batch.py`):
warm-up calls first (compilation), then the profiled one between cudaProfilerStart/Stop.

    ncu --profile-from-start off --section SpeedOfLight python benchmarks/ncu_small_batch.py --preset 1.2b -T 8
"""
import argparse

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs

p = argparse.ArgumentParser()
p.add_argument("--preset", default="1.2b")
p.add_argument("-T", type=int, default=8)
args = p.parse_args()
cfg = DecoConfig.preset(args.preset)
x, w, _ = layer_inputs(cfg, args.T, "cuda")
with torch.no_grad():
    for _ in range(3):
        ops.deco_ffn(x, **w, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    ops.deco_ffn(x, **w, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
