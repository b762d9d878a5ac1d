"""Decode and prefill paths side by side (T = 1..8 and one prefill size), each under a CUDA graph, with each
kernel's own time (torch.profiler): the register-FMA and tensor-core small-batch kernels of the Triton path at
the same token counts (which one should take 2-4 tokens: ffn.FMA_MAX_T), the Triton path as dispatched with and
without programmatic dependent launch (ffn.USE_PDL), the CuPy path, and the dense twin.
Tune caches are ignored (DECO_KERNELS_AUTOTUNE=0): these are the defaults.

    python benchmarks/probe_decode_paths.py --presets 1.2b 0.1b --tokens 1 2 3 4 8 --prefill 4096 --out p.json
"""
import argparse
import contextlib
import json
import os
from unittest import mock

os.environ["DECO_KERNELS_AUTOTUNE"] = "0"

import torch  # noqa: E402

from deco_kernels import backends, ops  # noqa: E402
from deco_kernels.benchmark import GpuTimer, kernel_times, preset_inputs, write_result  # noqa: E402
from deco_kernels.triton import ffn  # noqa: E402

COLUMNS = ("dense_twin", "triton_fma", "triton_dot", "triton", "triton_pdl_off", "cupy", "cupy_prefill",
           "cupy_scalar_red")


def variants(x, w, dense, T):
    """name -> (call, (module, attribute, value) to set while it is timed, or None)."""
    def triton():
        return ops.deco_ffn(x, **w, backend="triton")

    def cupy():
        return ops.deco_ffn(x, **w, backend="cupy")

    out = {"dense_twin": (lambda: ops.dense_swiglu(x, **dense), None)}
    if T <= ffn.SMALL_BATCH_MAX:
        if T <= 8:
            out["triton_fma"] = (triton, (ffn, "FMA_MAX_T", 8))
        if T >= 2:
            out["triton_dot"] = (triton, (ffn, "FMA_MAX_T", 1))
    out["triton"] = (triton, None)
    if T <= ffn.FMA_MAX_T:  # the decode kernels (the only PDL launch) launched plainly
        out["triton_pdl_off"] = (triton, (ffn, "USE_PDL", False))
    if backends.available("cupy", x.device):
        from deco_kernels.cupy import ffn as cupy_ffn, geometry as cupy_geometry

        out["cupy"] = (cupy, None)
        if T > cupy_geometry.DECODE_MAX_T:  # prefill's down-projection with scalar atomics, no vector reductions
            out["cupy_scalar_red"] = (cupy, (cupy_ffn, "VECTOR_REDUCTIONS", False))
        elif T > 1:  # the grouped (prefill) kernels below their token range
            out["cupy_prefill"] = (cupy, (cupy_geometry, "DECODE_MAX_T", 0))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 3, 4, 8])
    p.add_argument("--prefill", nargs="*", type=int, default=[4096])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    timer = GpuTimer()
    rows = []
    for preset, _, T, x, w, dense in preset_inputs(args.presets, args.tokens + args.prefill):
        for name, (fn, setting) in variants(x, w, dense, T).items():
            patch = mock.patch.object(*setting) if setting else contextlib.nullcontext()
            try:
                with patch, torch.no_grad():
                    row = dict(preset=preset, T=T, variant=name, graph_us=timer(fn, True),
                               kernels_us=kernel_times(fn, 20))
            except Exception as e:  # a failing variant must not hide the others
                row = dict(preset=preset, T=T, variant=name, error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'preset':>6} {'T':>5} " + " ".join(f"{v:>11}" for v in COLUMNS))
    for preset in args.presets:
        for T in args.tokens + args.prefill:
            got = {r["variant"]: r.get("graph_us") for r in rows if r["preset"] == preset and r["T"] == T}
            print(f"{preset:>6} {T:>5} " + " ".join(f"{got[v]:11.1f}" if got.get(v) else f"{'-':>11}"
                                                   for v in COLUMNS))
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
