"""One layer call for Nsight Compute (`ncu --profile-from-start off ... python benchmarks/ncu_layer.py`): warm-up
calls first (compilation), then the profiled one between cudaProfilerStart/Stop.

    ncu --profile-from-start off --section SpeedOfLight python benchmarks/ncu_layer.py --preset 1.2b -T 8
    ncu --profile-from-start off -k regex:deco_prefill --section SpeedOfLight --section WarpStateStats \
        python benchmarks/ncu_layer.py --backend cupy -T 4096
"""
import argparse

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs

p = argparse.ArgumentParser()
p.add_argument("--preset", default="1.2b")
p.add_argument("-T", type=int, default=8)
p.add_argument("--backend", default="triton")
args = p.parse_args()
cfg = DecoConfig.preset(args.preset)
x, w, _ = layer_inputs(cfg, args.T, "cuda")
with torch.no_grad():
    for _ in range(3):
        ops.deco_ffn(x, **w, backend=args.backend)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    ops.deco_ffn(x, **w, backend=args.backend)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
