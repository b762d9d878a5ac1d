"""The training backward of one layer with and without the dx scatter on a second stream
(training.OVERLAP_DX_SCATTER): the backward alone (training._backward on what the forward saved) captured in a
CUDA graph, so that the figure is the GPU's time from its first kernel to its last, overlap included (the
profiler's per-kernel sum that the bench reports as GPU-busy would count overlapped kernels twice). bf16,
T=4096, ~20% active; the gradients of both variants are compared.

    python benchmarks/probe_backward_overlap.py --presets 0.1b 1.2b --out probe_backward_overlap.json
"""
import argparse

import torch

from deco_kernels import DecoConfig
from deco_kernels.benchmark import GpuTimer, train_inputs, write_result
from deco_kernels.triton import swiglu, training


def backward_call(cfg: DecoConfig, T: int):
    """(fn, outputs): fn() runs training._backward on one forward's saved tensors (no autograd)."""
    x, w, _, dy = train_inputs(cfg, T)
    with torch.no_grad():
        x, w = x.detach(), {k: v.detach() for k, v in w.items()}
        shared, _ = swiglu.shared_expert(x, w["ws_gate"], w["ws_up"], w["ws_down"])
        y, g, mu, offsets, pair_tok, h, wbar = training._forward(
            x, w["w_router"], w["router_scale"], w["w_up"], w["gamma"], w["w_down"], shared, None, 0.0, 0.0, 0,
            None)
    weights = (w["w_router"], w["router_scale"], w["w_up"], w["gamma"], w["w_down"])
    return lambda: training._backward(dy, None, x, *weights, g, mu, offsets, pair_tok, h, wbar)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="*", default=["0.1b", "1.2b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for preset in args.presets:
        fn = backward_call(DecoConfig.preset(preset), args.tokens)
        grads = {}
        for overlap in (False, True):
            training.OVERLAP_DX_SCATTER = overlap
            grads[overlap] = [t.float().clone() for t in fn()]
            us = timer(fn, True)
            rows.append(dict(preset=preset, T=args.tokens, overlap=overlap, graph_us=us))
            print(f"{preset} T={args.tokens} overlap={overlap}: backward {us:.1f} µs (CUDA graph)", flush=True)
        diff = max(((a - b).norm() / max(b.norm(), 1e-30)).item() for a, b in zip(grads[True], grads[False])
                   if b.numel())
        rows.append(dict(preset=preset, T=args.tokens, max_rel_diff=diff))
        print(f"{preset}: largest relative difference of a gradient between the two: {diff:.1e}")
    training.OVERLAP_DX_SCATTER = True
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
