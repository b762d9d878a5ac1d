"""Run the Triton decode, small-batch and prefill paths once each, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_triton.py
"""
import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs

cfg = DecoConfig.preset("0.1b")
with torch.no_grad():
    for T, max_active in ((1, None), (1, 4), (24, None), (300, None), (300, 3)):
        x, w, _ = layer_inputs(cfg, T, "cuda", seed=T)
        y = ops.deco_ffn(x, **w, max_active=max_active, backend="triton")
        torch.cuda.synchronize()
        print("T", T, "max_active", max_active, "ok", bool(torch.isfinite(y).all()))
