"""The training statistics of one DecoMoE layer per step (reg_loss forward + backward, the active ratio and the
counters): the torch ops DecoMoE ran before (ref.entropy_loss, ref.active_ratio, the count) against
ops.gate_stats on Triton (one launch each way). Writes JSON.

    python benchmarks/probe_gate_stats.py --out gate_stats.json

Per case and DECO layer: "host_us_per_layer", the host time of a step's statistics of --layers layers (one
backward of their summed losses, as in training) with the GPU keeping up (median of 5 rounds), and
"eager_us_per_layer", the GpuTimer figure of the same call; also the forward alone under no_grad.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from deco_kernels import ops
from deco_kernels.benchmark import GpuTimer, environment
from deco_kernels.reference import ops as ref


def per_call_us(fn, calls: int = 100) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(rounds)[2]


def calls(gates, lam, num_layers):
    """One step's statistics of len(gates) layers and one backward of their summed losses, as in training."""
    counts = [torch.zeros((), dtype=torch.int64, device=gates[0].device) for _ in range(2)]

    def torch_ops():   # DecoMoE.forward's training statistics before gate_stats
        total = 0
        for g in gates:
            ratio = ref.active_ratio(g.detach())
            total = total + ref.entropy_loss(g, lam, num_layers)
            counts[0] += (g.detach() > 0).sum()
            counts[1] += g.numel()
        total.backward()
        return ratio

    def fused():       # and with it
        total = 0
        for g in gates:
            loss, active = ops.gate_stats(g, lam, num_layers, backend="triton")
            counts[0] += active
            counts[1] += g.numel()
            ratio = (active / g.numel()).float()
            total = total + loss
        total.backward()
        return ratio

    def fused_forward():
        with torch.no_grad():
            for g in gates:
                ops.gate_stats(g, lam, num_layers, backend="triton")

    def torch_forward():
        with torch.no_grad():
            for g in gates:
                ref.entropy_loss(g, lam, num_layers)
                ref.active_ratio(g)
                (g > 0).sum()

    return {"torch_ops": torch_ops, "gate_stats": fused, "torch_ops_forward_only": torch_forward,
            "gate_stats_forward_only": fused_forward}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--tokens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--experts", type=int, nargs="*", default=[42, 102])
    p.add_argument("--layers", type=int, default=15, help="DECO layers per step (one backward for all)")
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for T in args.tokens:
        for n in args.experts:
            gates = [torch.relu(torch.randn(T, n, device="cuda") - 0.8).requires_grad_() for _ in range(args.layers)]
            lam = torch.tensor(1e-3, device="cuda")
            for name, fn in calls(gates, lam, args.layers + 1).items():
                row = dict(T=T, N=n, call=name, host_us_per_layer=per_call_us(fn) / args.layers,
                           eager_us_per_layer=timer(fn, False) / args.layers)
                rows.append(row)
                print(row)
    out = dict(environment(), what="µs per DECO layer of a step's training statistics", rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
