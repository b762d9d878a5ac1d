"""Registers, spills and shared memory of the sparse training path's kernels as compiled for a GPU target, without
a GPU: one layer's training step runs on CPU tensors with every Triton launch recorded instead of run (the
grouping kernel stubbed to give every expert T/5 tokens, as in host_overhead.py), and each recorded launch is
compiled for sm_<cc> with autotune.compile (the launch's own specialisation: dtypes, 16-divisibility, constexprs,
warps and stages). The numbers are this machine's Triton's; the device's Triton may differ.

    python benchmarks/probe_train_registers.py --preset 1.2b --out train_registers.json
"""
from __future__ import annotations

import argparse
import json

import torch
import triton

from deco_kernels.autotune import compile as compile_only
from deco_kernels.autotune import launches
from deco_kernels import DecoConfig
from deco_kernels.testing import make_layer
from deco_kernels.triton import ffn, means, swiglu, training


class _FixedCounts:
    """The grouping kernel's outputs for every expert taking `per_expert` tokens (counts and offsets)."""

    def __init__(self, per_expert: int):
        self.per_expert = per_expert

    def __getitem__(self, grid):
        def run(gt, tokens, counts, offsets, *args, **kwargs):
            counts.fill_(self.per_expert)
            tokens.zero_()
            if offsets is not counts:
                torch.arange(0, offsets.numel() * self.per_expert, self.per_expert, out=offsets)
        return run


def record_step(preset: str, T: int):
    cfg = DecoConfig.preset(preset)
    x, w = make_layer(T, cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim, dtype=torch.bfloat16,
                      requires_grad=True)
    saved = ffn._group_kernel
    ffn._group_kernel = _FixedCounts(T // 5)
    try:
        with launches.recording(training, ffn, swiglu, means) as recorded:
            y, _ = training.deco_ffn_train(x.detach().requires_grad_(), {k: v.contiguous() for k, v in w.items()},
                                           0.0, 0.0, None)
            y.float().sum().backward()
    finally:
        ffn._group_kernel = saved
    return recorded


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.2b")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--cc", default="9.0", help="compute capability of the target, e.g. 9.0 or 8.7")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cc = tuple(int(v) for v in args.cc.split("."))
    rows, seen = [], set()
    for launch in record_step(args.preset, args.tokens):
        key = compile_only.binary_key(launch, cc)
        if key in seen:
            continue
        seen.add(key)
        usage = compile_only.compile_launch(launch, capability=cc)
        consts = {k: v for k, v in launch.constexprs().items() if k.isupper()}
        rows.append(dict(kernel=launch.name, constexprs=consts, **usage))
        print(launch.name, consts, {k: usage[k] for k in ("regs", "spills", "shared", "num_warps", "num_stages")})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=args.preset, tokens=args.tokens, target=f"sm_{cc[0]}{cc[1]}",
                           triton=triton.__version__, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
