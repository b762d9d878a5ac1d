"""wbar = the fp32 mean of w_up's rows, and its split into three bf16 rows for the tensor-core router mu, in
one launch: every Triton path reads them from here (inference once per weight version, through layout.memoize;
the training path every step, where the weights change).

In torch they took six launches (a column reduce, slow on a wide matrix, and five elementwise ones for the
split). Here program (column block, row chunk) sums its rows of w_up in fp32 and stores the partial sums; the
last program of a column block to arrive (an arrival counter, left at zero) adds the chunks in chunk order, so
the result does not depend on which program arrives last, divides by the row count and writes wbar and the
split: hi = bf16(wbar), mid = bf16(wbar - hi), lo = bf16(wbar - hi - mid), each rounded to nearest even (the
Triton interpreter truncates instead: other parts, the same sum). Their fp32 sum is wbar to within fp32 rounding
(bf16 has fp32's exponent range, so no part underflows short of fp32's own subnormals), and each part times a
bf16 number is exact in fp32, so x . wbar can run on tensor cores beside the router logits (router.py, MU_MMA).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import layout
from . import ffn
from ._jit import fixed_order_sum
from .launch import launch

BLOCK_C = 64      # columns per program
BLOCK_R = 64      # rows per step
MAX_CHUNKS = 32   # row chunks per column block: enough programs to stream w_up (a reduction, nothing to pipeline)


@triton.jit
def _expert_mean_kernel(w_ptr, wbar_ptr, split_ptr, partial_ptr, counter_ptr, R, D,
                        STEPS: tl.constexpr, MAX_CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Program (column block, chunk of STEPS * BLOCK_R rows); the steps are unrolled, so their loads are in
    flight together."""
    cb = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < D
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for step in tl.static_range(STEPS):
        rs = (chunk * STEPS + step) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc += tl.load(w_ptr + rs.to(tl.int64)[:, None] * D + cols[None, :],
                       mask=(rs < R)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    tl.store(partial_ptr + chunk.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + cb, 1, sem="acq_rel") == chunks - 1:
        wbar = fixed_order_sum(partial_ptr, 0, chunks, D, cols, cmask, MAX_CHUNKS) / R
        tl.store(wbar_ptr + cols, wbar, mask=cmask)
        hi = wbar.to(tl.bfloat16)
        rest = wbar - hi.to(tl.float32)      # exact in fp32
        mid = rest.to(tl.bfloat16)
        tl.store(split_ptr + cols, hi, mask=cmask)
        tl.store(split_ptr + D + cols, mid, mask=cmask)
        tl.store(split_ptr + 2 * D + cols, (rest - mid.to(tl.float32)).to(tl.bfloat16), mask=cmask)
        tl.atomic_xchg(counter_ptr + cb, 0)


class ExpertMean(NamedTuple):
    wbar: torch.Tensor    # fp32 [d], the mean of w_up's rows
    split: torch.Tensor   # bf16 [3, d], hi + mid + lo = wbar


def expert_mean(w_up: torch.Tensor) -> ExpertMean:
    """wbar and its split of w_up [R, d] (contiguous; R = N * de rows), computed now."""
    R, d = w_up.shape
    dev = w_up.device
    wbar = ffn._empty(d, device=dev, dtype=torch.float32)
    split = ffn._empty(3, d, device=dev, dtype=torch.bfloat16)
    steps = ffn.cdiv(ffn.cdiv(R, MAX_CHUNKS), BLOCK_R)
    grid = (ffn.cdiv(d, BLOCK_C), ffn.cdiv(R, steps * BLOCK_R))
    partial = ffn._empty(grid[1], d, device=dev, dtype=torch.float32)
    launch(_expert_mean_kernel, grid, w_up, wbar, split, partial, ffn._zeroed(dev, torch.int32, grid[0]), R, d,
           STEPS=steps, MAX_CHUNKS=MAX_CHUNKS, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    return ExpertMean(wbar, split)


def cached_expert_mean(w_up: torch.Tensor) -> ExpertMean:
    """expert_mean(w_up), computed once per (tensor, storage, version) of w_up (layout.memoize): inference."""
    return layout.memoize(w_up, expert_mean)
