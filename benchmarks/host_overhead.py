"""Host time of one ops.deco_ffn call on the Triton backend with every kernel launch replaced by a no-op: the
Python cost of validation, dispatch, config lookup, allocation and grids that an eager call pays on top of
Triton's own launch cost (CUDA graphs pay neither). Runs on the CPU (TRITON_INTERPRET=1) or a GPU.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py            # inference, 1.2b, T = 1 and 8
    TRITON_INTERPRET=1 python benchmarks/host_overhead.py --train    # forward + backward (the training path)

--train times forward + backward of the sparse training path at T=64 on a tiny layer (d=64, N=13, de=16), so
that on the CPU the torch ops around the kernels cost their dispatch and not their arithmetic; the stubbed
grouping kernel gives every expert T/5 tokens, so the pair buffers have their usual size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from deco_kernels import ops
from deco_kernels.testing import make_layer
from deco_kernels.triton import ffn, means, swiglu, training

KERNELS = {ffn: ("_up_kernel", "_decode_down_kernel", "_union_down_kernel", "_router_kernel", "_group_kernel",
                 "_grouped_up_kernel", "_grouped_down_kernel"),
           training: ("_train_up_kernel", "_pair_scatter_kernel", "_pair_bwd_kernel", "_token_bwd_kernel",
                      "_pair_wgrad_kernel"),
           swiglu: ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"), means: ("_expert_mean_kernel",)}


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _FixedCounts:
    """The grouping kernel stubbed to give every expert the same number of tokens, and the pair offsets that
    follow (the training forward reads the total back to size its pair buffers)."""

    def __init__(self, per_expert: int):
        self.per_expert = per_expert

    def __getitem__(self, grid):
        def launch(gt, tokens, counts, offsets, *args, **kwargs):
            counts.fill_(self.per_expert)
            if offsets is not counts:
                torch.arange(0, offsets.numel() * self.per_expert, self.per_expert, out=offsets)
        return launch


def _time(fn, calls: int, rounds: int) -> list[float]:
    for _ in range(max(10, calls // 20)):
        fn()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - start) / calls * 1e6)
    return out


def host_us(T: int, device: str, calls: int = 1000, rounds: int = 5) -> list[float]:
    x, w = make_layer(T, 1792, 102, 64, 128, dtype=torch.bfloat16, device=device, seed=0, active=0.2)  # 1.2b
    with torch.no_grad():
        return _time(lambda: ops.deco_ffn(x, **w, backend="triton"), calls, rounds)


def train_host_us(T: int, device: str, calls: int = 200, rounds: int = 5) -> list[float]:
    x, w = make_layer(T, 64, 13, 16, 32, dtype=torch.float32, device=device, seed=0, active=0.2,
                      requires_grad=True)
    dy = torch.randn_like(x)
    ffn._group_kernel = _FixedCounts(T // 5)
    return _time(lambda: ops.deco_ffn(x, **w, backend="triton").backward(dy), calls, rounds)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="forward + backward of the training path")
    args = p.parse_args()
    for module, names in KERNELS.items():
        for name in names:
            setattr(module, name, _NoLaunch())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.train:
        us = train_host_us(64, device)
        print(f"training forward + backward, T=64 on {device}: {min(us):.1f} µs per call at best, "
              f"{statistics.median(us):.1f} median (kernel launches stubbed)")
        return
    for T in (1, 8):  # the small-batch path: the grouped path's host work includes real torch ops (shared expert)
        us = host_us(T, device)
        print(f"1.2b T={T} on {device}: {min(us):.1f} µs per call at best, {statistics.median(us):.1f} median "
              f"(kernel launches stubbed)")


if __name__ == "__main__":
    main()
