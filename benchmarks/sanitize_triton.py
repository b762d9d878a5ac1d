"""Run the Triton decode, small-batch and prefill paths once each, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/sanitize_triton.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_triton.py --preset 1.2b --tokens 4096
    compute-sanitizer --tool memcheck python benchmarks/sanitize_triton.py --train

With --tokens, runs only those token counts (no max_active) at the given preset. With --train, the training path
instead: a forward and backward (x and every weight require grad; gradients into y and the gates) per case, with
the synchronised pair sizing and again with the sync-free one (triton/training.py; h saved for 10% of the slots,
so the pair backward also recomputes h).
"""
import argparse

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import layer_inputs
from deco_kernels.triton import training

p = argparse.ArgumentParser()
p.add_argument("--preset", default="0.1b")
p.add_argument("--tokens", nargs="*", type=int)
p.add_argument("--train", action="store_true")
args = p.parse_args()
cfg = DecoConfig.preset(args.preset)
cases = [(T, None) for T in args.tokens] if args.tokens else [(1, None), (1, 4), (24, None), (300, None), (300, 3)]
training.STATIC_H_SHARE = 0.1
for sync_free in (False, True) if args.train else (False,):
    training.SYNC_FREE = sync_free
    for T, max_active in cases:
        x, w, _ = layer_inputs(cfg, T, "cuda", seed=T)
        if args.train:
            leaves = [t.detach().requires_grad_() for t in (x, *w.values())]
            y, g = ops.deco_ffn(leaves[0], **dict(zip(w, leaves[1:])), max_active=max_active, backend="triton",
                                return_gates=True)
            grads = torch.autograd.grad(y.float().square().sum() + g.sum(), leaves)
            finite = all(bool(torch.isfinite(t).all()) for t in (y, *grads))
        else:
            with torch.no_grad():
                y = ops.deco_ffn(x, **w, max_active=max_active, backend="triton")
            finite = bool(torch.isfinite(y).all())
        torch.cuda.synchronize()
        print("T", T, "max_active", max_active, "train" if args.train else "inference",
              "sync-free" if sync_free else "", "ok", finite)
