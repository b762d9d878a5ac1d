"""A/B of module-level switches on the layer forward: each variant sets attributes of deco_kernels.triton.ffn, and
the variants are timed interleaved (rounds x variants, CUDA graphs, the same inputs) with the output's rel_err
against the torch reference, so a host's drift hits every variant alike.

    python benchmarks/probe_ab.py --presets 1.2b 0.1b --tokens 2048 4096 \
        --variant k64 ROUTER_LONG_BLOCK_K=64 --variant k128 ROUTER_LONG_BLOCK_K=128 --out results/h200/probe_ab.json

results/h200/probe_ab_shared_in_up.json compared a switch SHARED_IN_UP that commit b6ad7f4 had for the run. The
deterministic GEMM down projection against the atomics:

    python benchmarks/probe_ab.py --presets 1.2b 0.1b --tokens 128 512 2048 4096 \
        --variant atomics DOWN_GEMM=0 --variant gemm DOWN_GEMM=1 --out results/h200/probe_ab_down_gemm.json
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

from deco_kernels import ops
from deco_kernels.benchmark import GpuTimer, preset_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn


def parse_variant(items: list[str]) -> tuple[str, dict]:
    name, *pairs = items
    return name, {k: int(v) for k, v in (p.split("=", 1) for p in pairs)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--variant", nargs="+", action="append", required=True,
                   help="NAME ATTR=INT ...: ffn module attributes this variant sets")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    timer = GpuTimer(rep_ms=60, warmup_ms=10)
    rows = []
    for preset, _, T, x, w, _ in preset_inputs(args.presets, args.tokens):
        with torch.no_grad():
            y_ref = ops.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()}, backend="torch")
        times = {name: [] for name, _ in variants}
        errs = {}
        for _ in range(args.rounds):
            for name, attrs in variants:
                with mock.patch.multiple(ffn, **attrs), torch.no_grad():
                    call = lambda: ops.deco_ffn(x, **w, backend="triton")  # noqa: E731
                    errs[name] = rel_err(call().float(), y_ref)
                    times[name].append(timer(call, graph=True))
        for name, attrs in variants:
            row = dict(preset=preset, T=T, variant=name, attrs=attrs, us=statistics.median(times[name]),
                       us_rounds=times[name], rel_err=errs[name])
            rows.append(row)
            print(f"{preset} T={T:5d} {name:>10s}: {row['us']:8.1f} µs  {times[name]}  rel_err {errs[name]:.2e}",
                  flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
