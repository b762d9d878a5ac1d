"""The router's weight gradients of the training backward, dW_router = dr^T x and dwbar = x^T dmu, timed alone
under CUDA graphs in the ways they can be computed: two cuBLAS GEMMs (dr^T x and the GEMV dmu x), one cuBLAS
GEMM over [dr | dmu] (dmu as column N of one [T, N+1] buffer, or the buffer stored transposed: what
training._router_grads does). bf16, T=4096, the presets' N and d. results/h200/probe_router_wgrad.json also has
the rows of a Triton kernel (a fixed-order split over T, at 18 tiles) that this script timed at commit 55c94ec;
it lost to the transposed GEMM at every tile and is gone.

    python benchmarks/probe_router_wgrad.py --presets 0.1b 1.2b --out probe_router_wgrad.json
"""
import argparse
import torch

from deco_kernels import DecoConfig
from deco_kernels.benchmark import GpuTimer, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import training


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
           "cublas_one_gemm_stored_transposed": lambda: gt @ x,
           "training._router_grads": lambda: training._router_grads(x, gt, w_router)}
    return out, g.t().float() @ x.float(), (x, gt, w_router)


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
        calls, reference, (x, gt, w_router) = cases(cfg, args.tokens)
        dwbar, dw_router = training._router_grads(x, gt, w_router)
        err = max(rel_err(dw_router, reference[:-1]), rel_err(dwbar, reference[-1]))
        for name, fn in calls.items():
            try:
                us = timer(fn, True)
            except Exception as exc:  # noqa: BLE001  (recorded; the other variants still run)
                rows.append(dict(preset=preset, T=args.tokens, variant=name, error=repr(exc)[:200]))
                continue
            rows.append(dict(preset=preset, T=args.tokens, variant=name, us=us))
            print(f"{preset} T={args.tokens} {name}: {us:.1f} µs", flush=True)
        print(f"{preset}: training._router_grads, rel err vs fp32 {err:.2e}")
        rows.append(dict(preset=preset, T=args.tokens, variant="router_grads_rel_err", rel_err=err))
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
