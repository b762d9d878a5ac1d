"""Time the CuPy prefill of one DECO layer over its tile constants (bf16, one CUDA graph per config).

    python benchmarks/sweep_cupy_prefill.py --preset 1.2b 0.1b --tokens 4096 --out sweep_cupy_prefill.json

The constants live in deco_kernels.cupy.geometry and reach the kernels as compile options, so each config
compiles its own module: LONG_PREFILL_WARPS (warps per expert block), M_TILES (16-token m-tiles per warp),
UP_STAGES (prefill_up's pipeline depth) and DOWN_FEATURES (output features per prefill_down block). Every
combination that fits is timed (layer µs under a CUDA graph, and each prefill kernel's µs from the profiler) and
its output checked against the default config's. Prints default vs best and writes every timing to JSON.
"""
import argparse
import contextlib
import itertools
import json
from unittest import mock

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import GpuTimer, kernel_times, layer_inputs, write_result
from deco_kernels.cupy import geometry as geo
from deco_kernels.testing import rel_err

# (four up stages of 128 tokens need 110 KB, over geometry.DYN_SMEM_LIMIT)
KNOBS = dict(LONG_PREFILL_WARPS=[4, 8], m_tiles=[1, 2], UP_STAGES=[2, 3], DOWN_FEATURES=[256, 512, 1024])
QUICK = dict(LONG_PREFILL_WARPS=[4], m_tiles=[1, 2], UP_STAGES=[2, 3], DOWN_FEATURES=[512])
TOL = 2e-2  # bf16 outputs of two summation orders (the down projection's atomics add in no fixed order)
TIMER = GpuTimer(rep_ms=60, warmup_ms=10)


@contextlib.contextmanager
def patched(config: dict, de: int):
    """geometry holding ``config`` (m_tiles: M_TILES[de]) inside the with block."""
    values = {k: v for k, v in config.items() if k != "m_tiles"}
    with mock.patch.multiple(geo, **values), mock.patch.dict(geo.M_TILES, {de: config["m_tiles"]}):
        yield


def measure(x, w, config: dict, de: int, reference) -> dict:
    """Layer µs (CUDA graph), per-kernel µs and the error against ``reference`` under ``config``."""
    with patched(config, de):
        T = x.shape[0]
        tile = geo.expert_tile(x.dtype, de, geo.prefill_warps(T, x.dtype, de))
        if config["LONG_PREFILL_WARPS"] != tile["warps"] or config["m_tiles"] != tile["mt"]:
            return dict(skipped=f"does not fit (the plan takes {tile['warps']} warps x {tile['mt']} m-tiles)")
        try:
            def call():
                return ops.deco_ffn(x, **w, backend="cupy")
            y = call()
            err = rel_err(y, reference) if reference is not None else 0.0
            if err > TOL:
                return dict(error=f"output differs from the default config's by {err:.2e}")
            us = TIMER(call, graph=True)
            kernels = {k: v for k, v in kernel_times(call).items() if k.startswith("deco_")}
            return dict(us=us, kernels_us=kernels, err=err)
        except Exception as exc:  # noqa: BLE001  (a config that fails to compile or launch is recorded)
            return dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["1.2b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="four warps only, 512 features per down block")
    args = p.parse_args()
    knobs = QUICK if args.quick else KNOBS
    rows, summary = [], []
    for preset in args.preset:
        cfg = DecoConfig.preset(preset)
        de = cfg.expert_dim
        default = dict(LONG_PREFILL_WARPS=geo.LONG_PREFILL_WARPS, m_tiles=geo.M_TILES[de], UP_STAGES=geo.UP_STAGES,
                       DOWN_FEATURES=geo.DOWN_FEATURES)
        for T in args.tokens:
            x, w, _ = layer_inputs(cfg, T, "cuda")
            with torch.no_grad():
                reference = ops.deco_ffn(x, **w, backend="cupy").float()
                base = measure(x, w, default, de, None)
                best, best_us = default, base.get("us")
                for values in itertools.product(*knobs.values()):
                    config = dict(zip(knobs, values))
                    result = measure(x, w, config, de, reference)
                    rows.append(dict(preset=preset, T=T, config=config, **result))
                    if "us" in result:
                        print(f"{preset} T={T} {config}: {result['us']:.1f} µs "
                              + " ".join(f"{k[5:]}={v:.1f}" for k, v in result["kernels_us"].items()), flush=True)
                        if best_us is None or result["us"] < best_us:
                            best, best_us = config, result["us"]
            line = dict(preset=preset, T=T, default=default, default_us=base.get("us"),
                        default_kernels_us=base.get("kernels_us"), best=best, best_us=best_us)
            summary.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        write_result(args.out, summary=summary, rows=rows)


if __name__ == "__main__":
    main()
