"""The prefill router launch alone over (router_block_t, block_k, num_stages, num_warps, ROUTER_SPLIT_BLOCKS): its
gates against torch in fp32 (same active set, rel error), the run-to-run spread of the gates over five calls, and
µs of the launch replayed in a CUDA graph (the kernel's own time; buffers allocated once, outside the graph).

    python benchmarks/probe_router.py --preset 1.2b 0.1b --tokens 512 4096 --out results/h200/probe_router.json
"""
import argparse
import itertools

import torch

from deco_kernels import DecoConfig
from deco_kernels.benchmark import GpuTimer, layer_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn, means

TIMER = GpuTimer(rep_ms=40, warmup_ms=10)


def router_call(x, w, mean, **geometry):
    """call() -> g: the router launch on buffers poisoned with NaN once (every later call overwrites them)."""
    T, n = x.shape[0], w["w_router"].shape[0]
    g, mu, gt = (torch.full(s, float("nan"), device=x.device) for s in ((T, n), (T,), (n, T)))

    def call():
        ffn._router(x, w["w_router"], mean, 0.0, None, 0.0, None, g, mu, gt, **geometry)
        return g
    return call


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--block-t", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--block-k", nargs="+", type=int, default=[64])
    p.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3, 4])
    p.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--split-blocks", nargs="+", type=int, default=[ffn.ROUTER_SPLIT_BLOCKS],
                   help="values of ffn.ROUTER_SPLIT_BLOCKS: below this many token blocks K is split")
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for preset, T in itertools.product(args.preset, args.tokens):
        x, w, _ = layer_inputs(DecoConfig.preset(preset), T, "cuda", seed=T)
        mean = means.cached_expert_mean(w["w_up"])
        g_ref = torch.relu(x.float() @ w["w_router"].float().t())
        for block_t, block_k, stages, warps, split_blocks in itertools.product(
                args.block_t, args.block_k, args.stages, args.warps, args.split_blocks):
            row = dict(preset=preset, T=T, router_block_t=block_t, block_k=block_k, stages=stages, warps=warps,
                       split_blocks=split_blocks)
            ffn.ROUTER_SPLIT_BLOCKS = split_blocks
            try:
                call = router_call(x, w, mean, block_t=block_t, stages=stages, warps=warps, block_k=block_k)
                runs = [call().clone() for _ in range(5)]
                row.update(same_set=bool(torch.equal(runs[0] > 0, g_ref > 0)), rel_err=rel_err(runs[0], g_ref),
                           spread=max(float((r - runs[0]).abs().nan_to_num(1e9).max()) for r in runs[1:]),
                           us=TIMER(call, graph=True))
            except Exception as e:  # noqa: BLE001 - an over-large tile fails alone (out of shared memory)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(row, flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
