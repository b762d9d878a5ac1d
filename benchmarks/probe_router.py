"""The prefill router kernel alone over (router_block_t, num_stages, num_warps): its gates against torch in fp32
(same active set, rel error), the run-to-run spread of the gates over five calls, and µs (CUDA events).

    python benchmarks/probe_router.py --preset 1.2b --tokens 4096 --out results/h200/probe_router.json
"""
import argparse

import torch

from deco_kernels import DecoConfig, layout
from deco_kernels.benchmark import layer_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn


def call(x, w, wbar, block_t, stages, warps):
    T, n = x.shape[0], w["w_router"].shape[0]
    g = torch.full((T, n), float("nan"), device=x.device)
    mu = torch.full((T,), float("nan"), device=x.device)
    gt = torch.full((n, T), float("nan"), device=x.device)
    ffn._router(x, w["w_router"], wbar, 0.0, None, 0.0, None, g, mu, gt, block_t, stages, warps)
    return g, gt


def time_us(fn, reps=50):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--block-t", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for preset in args.preset:
        model = DecoConfig.preset(preset)
        for T in args.tokens:
            x, w, _ = layer_inputs(model, T, "cuda", seed=T)
            wbar = layout.expert_mean(w["w_up"])
            g_ref = torch.relu(x.float() @ w["w_router"].float().t())
            for block_t in args.block_t:
                for stages in (1, 2, 3, 4):
                    for warps in (4, 8):
                        runs = [call(x, w, wbar, block_t, stages, warps) for _ in range(5)]
                        g, gt = runs[0]
                        row = dict(preset=preset, T=T, router_block_t=block_t, stages=stages, warps=warps,
                                   same_set=bool(torch.equal(g > 0, g_ref > 0)), rel_err=rel_err(g, g_ref),
                                   gt_is_g_transposed=bool(torch.equal(gt, g.t())),
                                   spread=max(float((r[0] - g).abs().nan_to_num(1e9).max()) for r in runs[1:]),
                                   us=time_us(lambda: call(x, w, wbar, block_t, stages, warps)))
                        rows.append(row)
                        print(row, flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
