"""Decode and prefill paths side by side (T = 1..8 and one prefill size), each under a CUDA graph, with each
kernel's own time (torch.profiler): the register-FMA and tensor-core small-batch kernels of the Triton path at
the same token counts (which one should take 2-4 tokens: ffn.FMA_MAX_T), the CuPy path, and the dense twin.
Tune caches are ignored (DECO_KERNELS_AUTOTUNE=0): these are the defaults.

    python benchmarks/probe_decode_paths.py --presets 1.2b 0.1b --tokens 1 2 3 4 8 --prefill 4096 --out p.json
"""
import argparse
import json
import os

os.environ["DECO_KERNELS_AUTOTUNE"] = "0"

import torch  # noqa: E402

from deco_kernels import DecoConfig, backends, ops  # noqa: E402
from deco_kernels.benchmark import GpuTimer, environment, layer_inputs  # noqa: E402
from deco_kernels.triton import ffn  # noqa: E402

from probe_small_batch import kernel_us  # noqa: E402

COLUMNS = ("dense_twin", "triton_fma", "triton_dot", "triton", "cupy", "cupy_prefill", "cupy_scalar_red")


def variants(x, w, dense, T):
    """name -> (call, FMA_MAX_T to set while it runs or None)."""
    out = {"dense_twin": (lambda: ops.dense_swiglu(x, **dense), None)}
    if T <= ffn.SMALL_BATCH_MAX:
        if T <= 8:
            out["triton_fma"] = (lambda: ops.deco_ffn(x, **w, backend="triton"), 8)
        if T >= 2:
            out["triton_dot"] = (lambda: ops.deco_ffn(x, **w, backend="triton"), 1)
    else:
        out["triton"] = (lambda: ops.deco_ffn(x, **w, backend="triton"), None)
    if backends.available("cupy", x.device):
        out["cupy"] = (lambda: ops.deco_ffn(x, **w, backend="cupy"), None)
        if T > 8:
            out["cupy_scalar_red"] = (lambda: scalar_reductions(lambda: ops.deco_ffn(x, **w, backend="cupy")), None)
        elif T > 1:
            out["cupy_prefill"] = (lambda: prefill_path(lambda: ops.deco_ffn(x, **w, backend="cupy")), None)
    return out


def prefill_path(fn):
    """fn() with the CuPy backend's grouped (prefill) kernels at any token count."""
    from deco_kernels.cupy import geometry
    saved, geometry.DECODE_MAX_T = geometry.DECODE_MAX_T, 0
    try:
        return fn()
    finally:
        geometry.DECODE_MAX_T = saved


def scalar_reductions(fn):
    """fn() with the CuPy prefill's vector reductions off."""
    from deco_kernels.cupy import ffn as cupy_ffn
    cupy_ffn.VECTOR_REDUCTIONS = False
    try:
        return fn()
    finally:
        cupy_ffn.VECTOR_REDUCTIONS = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 3, 4, 8])
    p.add_argument("--prefill", nargs="*", type=int, default=[4096])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    default_fma = ffn.FMA_MAX_T
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        sizes = args.tokens + args.prefill
        x_all, w, dense = layer_inputs(cfg, max(sizes), "cuda")
        for T in sizes:
            x = x_all[:T]
            for name, (fn, fma_max) in variants(x, w, dense, T).items():
                ffn.FMA_MAX_T = default_fma if fma_max is None else fma_max
                try:
                    with torch.no_grad():
                        row = dict(preset=preset, T=T, variant=name, graph_us=timer(fn, True),
                                   kernels_us=kernel_us(fn))
                except Exception as e:  # a failing variant must not hide the others
                    row = dict(preset=preset, T=T, variant=name, error=f"{type(e).__name__}: {e}"[:300])
                finally:
                    ffn.FMA_MAX_T = default_fma
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"{'preset':>6} {'T':>5} " + " ".join(f"{v:>11}" for v in COLUMNS))
    for preset in args.presets:
        for T in args.tokens + args.prefill:
            got = {r["variant"]: r.get("graph_us") for r in rows if r["preset"] == preset and r["T"] == T}
            print(f"{preset:>6} {T:>5} " + " ".join(f"{got[v]:11.1f}" if got.get(v) else f"{'-':>11}"
                                                   for v in COLUMNS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
