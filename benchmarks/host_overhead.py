"""Host time of one ops.deco_ffn call on the Triton backend with every kernel launch replaced by a no-op: the
Python cost of validation, dispatch, config lookup, allocation and grids that an eager call pays on top of
Triton's own launch cost (CUDA graphs pay neither). Runs on the CPU (TRITON_INTERPRET=1) or a GPU.

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py
"""
from __future__ import annotations

import statistics
import time

import torch

from deco_kernels import ops
from deco_kernels.testing import make_layer
from deco_kernels.triton import ffn

KERNELS = ("_up_kernel", "_decode_down_kernel", "_union_down_kernel", "_router_kernel", "_group_kernel",
           "_grouped_up_kernel", "_grouped_down_kernel")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_us(T: int, device: str, calls: int = 1000, rounds: int = 5) -> list[float]:
    x, w = make_layer(T, 1792, 102, 64, 128, dtype=torch.bfloat16, device=device, seed=0, active=0.2)  # 1.2b
    with torch.no_grad():
        for _ in range(50):
            ops.deco_ffn(x, **w, backend="triton")
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                ops.deco_ffn(x, **w, backend="triton")
            out.append((time.perf_counter() - start) / calls * 1e6)
    return out


def main():
    for name in KERNELS:
        setattr(ffn, name, _NoLaunch())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for T in (1, 8):  # the small-batch path: the grouped path's host work includes real torch ops (shared expert)
        us = host_us(T, device)
        print(f"1.2b T={T} on {device}: {min(us):.1f} µs per call at best, {statistics.median(us):.1f} median "
              f"(kernel launches stubbed)")


if __name__ == "__main__":
    main()
