"""The router's weight gradients of the training backward, dW_router = dr^T x and dwbar = x^T dmu, timed alone
under CUDA graphs in the ways they can be computed: two cuBLAS GEMMs (dr^T x and the GEMV dmu x), one cuBLAS
GEMM over [dr | dmu] (dmu as column N of one [T, N+1] buffer, or the buffer stored transposed), and
training._router_wgrad_kernel at several tiles. bf16, T=4096, the presets' N and d.

    python benchmarks/probe_router_wgrad.py --presets 0.1b 1.2b --out probe_router_wgrad.json
"""
import argparse
from unittest import mock

import torch

from deco_kernels import DecoConfig
from deco_kernels.benchmark import GpuTimer, write_result
from deco_kernels.triton import training

TILES = [dict(BLOCK_M=64, BLOCK_C=c, CHUNKS=k, num_warps=w) for c in (32, 64, 128) for k in (4, 8, 16)
         for w in (4, 8)]


def cases(cfg: DecoConfig, T: int):
    n, d = cfg.num_experts, cfg.d_model
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=gen).to(torch.bfloat16)
    g = torch.randn(T, n + 1, device="cuda", generator=gen).to(torch.bfloat16)   # [dr | dmu]
    gt = g.t().contiguous()
    dr, dmu = g[:, :n].contiguous(), g[:, n].contiguous()
    w_router = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
    out = {"cublas_two_gemms": lambda: (dmu @ x, dr.t() @ x),
           "cublas_one_gemm": lambda: g.t() @ x,
           "cublas_one_gemm_stored_transposed": lambda: gt @ x}
    for tiles in TILES:
        name = "triton " + " ".join(f"{k}={v}" for k, v in tiles.items())
        out[name] = (lambda tiles=tiles: _triton(tiles, x, dr, dmu, w_router))
    reference = (g.t().float() @ x.float())
    return out, reference, (x, dr, dmu, w_router)


def _triton(tiles, x, dr, dmu, w_router):
    with mock.patch.dict(training.TILES, {"router_wgrad": tiles}):
        return training._router_grads(x, dr, dmu, w_router)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="*", default=["0.1b", "1.2b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        calls, reference, (x, dr, dmu, w_router) = cases(cfg, args.tokens)
        dwbar, dw_router = training._router_grads(x, dr, dmu, w_router)
        err = max(((dw_router.float() - reference[:-1]).norm() / reference[:-1].norm()).item(),
                  ((dwbar - reference[-1]).norm() / reference[-1].norm()).item())
        for name, fn in calls.items():
            try:
                us = timer(fn, True)
            except Exception as exc:  # noqa: BLE001  (a tile that does not compile is recorded)
                rows.append(dict(preset=preset, T=args.tokens, variant=name, error=repr(exc)[:200]))
                continue
            rows.append(dict(preset=preset, T=args.tokens, variant=name, us=us))
            print(f"{preset} T={args.tokens} {name}: {us:.1f} µs", flush=True)
        print(f"{preset}: default triton tiles, rel err vs fp32 {err:.2e}")
        rows.append(dict(preset=preset, T=args.tokens, variant="default_rel_err", rel_err=err))
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
