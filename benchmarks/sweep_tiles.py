"""Time the Triton paths of one DECO layer over tile configs (bf16, one CUDA graph per config).

    python benchmarks/sweep_tiles.py --preset 1.2b --tokens 1 8 64 4096 --out sweep.json

For each token count, the path's default config (ffn.small_batch_config / ffn.grouped_config) is the start;
each group of knobs below is swept with the others at their best so far (a coordinate sweep, a first form of
what the autotune harness does). Prints default vs best per T and writes every timing to JSON. For the
prefill path it also times a scatter-only kernel (the down-projection's fp32 atomics without the GEMM) as the
floor of that design.
"""
import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from deco_kernels import DecoConfig
from deco_kernels.benchmark import GpuTimer, layer_inputs, write_result
from deco_kernels.triton import ffn, means

SMALL_FMA = [dict(rows=[2, 4, 8], up_warps=[2, 4, 8]), dict(block_d=[8, 16, 32], slots=[8, 16, 32]),
             dict(down_warps=[4, 8])]
SMALL_DOT = [dict(split_k=[1, 2, 3, 4, 6], block_k=[64, 128, 256]), dict(rows=[32, 64]),
             dict(up_warps=[4, 8], up_stages=[2, 3, 4]), dict(group=[2, 4, 8, 16], block_d=[64, 128, 256]),
             dict(down_warps=[4, 8], down_stages=[1, 2, 3])]
GROUPED = [dict(router_block_t=[16, 32, 64]),
           dict(block_m=[64, 128], block_k=[64, 128]),
           dict(up_warps=[4, 8], up_stages=[2, 3, 4]), dict(block_d=[64, 128], down_warps=[4, 8], down_stages=[2, 3])]
TIMER = GpuTimer(rep_ms=60, warmup_ms=10)  # every timing here is a CUDA-graph replay: TIMER(fn, graph=True)


def layer_runner(x, w, bias, T, n):
    """run(cfg): the layer's Triton path under tile config cfg, returning its output (one buffer, reused)."""
    g = torch.empty(T, n, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    mean = means.cached_expert_mean(w["w_up"])
    path = ffn._small_batch if T <= ffn.SMALL_BATCH_MAX else ffn._grouped

    def run(cfg):
        path(x, w, mean, bias, None, 0.0, None, g, y, cfg)
        return y
    return run


@triton.jit
def _scatter_only_kernel(tok_ptr, count_ptr, y_ptr, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    count = tl.load(count_ptr + e)
    if m0 < count:
        ms = m0 + tl.arange(0, BLOCK_M)
        mmask = ms < count
        toks = tl.load(tok_ptr + e * T + ms, mask=mmask, other=0).to(tl.int64)
        val = tl.full([BLOCK_M, BLOCK_D], 1.0, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            tl.atomic_add(y_ptr + toks[:, None] * D + cols[None, :], val, mask=mmask[:, None] & (cols < D)[None, :],
                          sem="relaxed")


def scatter_floor_us(x, w, bias, block_m=64, block_d=64):
    """µs of the prefill down-projection's atomics alone, on the layer's real (token, expert) lists."""
    T, d = x.shape
    n = w["w_router"].shape[0]
    g = torch.empty(T, n, device="cuda", dtype=torch.float32)
    mu = torch.empty(T, device="cuda", dtype=torch.float32)
    tokens, counts = ffn._group_by_expert(x, w["w_router"], means.cached_expert_mean(w["w_up"]), bias, None, 0.0, None,
                                          g, mu)
    acc = torch.zeros(T, d, device="cuda", dtype=torch.float32)
    grid = (n, triton.cdiv(T, block_m))
    return TIMER(lambda: _scatter_only_kernel[grid](tokens, counts, acc, T, d, BLOCK_M=block_m, BLOCK_D=block_d),
                 graph=True)


def sweep(run, base, groups, T, results):
    best_cfg, best_us = dict(base), None
    try:
        best_us = TIMER(lambda: run(best_cfg), graph=True)
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        print("default failed", type(e).__name__, str(e)[:200])
    default_us = best_us
    for group in groups:
        keys = list(group)
        for values in itertools.product(*group.values()):
            cfg = {**best_cfg, **dict(zip(keys, values))}
            try:
                us = TIMER(lambda: run(cfg), graph=True)
            except Exception as e:  # noqa: BLE001 - a config that fails to compile or launch is skipped
                print("fail", cfg, type(e).__name__, str(e)[:120])
                us = None
            results.append(dict(T=T, us=us, cfg=cfg))
            if us is not None and (best_us is None or us < best_us):
                best_cfg, best_us = cfg, us
    return default_us, best_us, best_cfg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.2b")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 4096])
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--quick", action="store_true", help="sweep only the first group of knobs of each path")
    args = p.parse_args()
    model = DecoConfig.preset(args.preset)
    results, summary = [], []
    for T in args.tokens:
        x, w, _ = layer_inputs(model, T, "cuda", seed=T)   # the benchmark's layer, ~20% active
        bias = 0.0
        run = layer_runner(x, w, bias, T, model.num_experts)
        if T <= ffn.SMALL_BATCH_MAX:
            base = ffn.small_batch_config(T, x.dtype)
            groups = SMALL_DOT if base["use_dot"] else SMALL_FMA
        else:
            base, groups = ffn.grouped_config(T), GROUPED
        groups = groups[:1] if args.quick else groups
        with torch.no_grad():
            default_us, best_us, best_cfg = sweep(run, base, groups, T, results)
            line = dict(T=T, default_us=default_us, best_us=best_us, best=best_cfg)
            if T > ffn.SMALL_BATCH_MAX:
                line["scatter_only_us"] = scatter_floor_us(x, w, bias, best_cfg["block_m"], best_cfg["block_d"])
        summary.append(line)
        print(json.dumps(line), flush=True)
    write_result(args.out, preset=args.preset, summary=summary, rows=results)


if __name__ == "__main__":
    main()
