"""Time the sparse training path over tile configs: one layer's forward + backward on T tokens (bf16, ~20% of
the experts active), judged by the step's GPU-busy time (benchmark.device_busy_us: the training forward
synchronises once, so it cannot be replayed from a CUDA graph).

A coordinate sweep over deco_kernels.triton.training.TILES: for each launch in turn, each group of its knobs
below is swept with everything else at its best so far. Every candidate's gradients are checked against the
default tiles' (a tile changes only the order of fp32 sums). Prints default vs best and writes every timing.

    python benchmarks/sweep_train_tiles.py --preset 1.2b --tokens 4096 --out sweep_train_tiles.json
"""
import argparse
import itertools
import json
from unittest import mock

import torch

from deco_kernels import DecoConfig, ops
from deco_kernels.benchmark import device_busy_us, train_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn, training

GATHER = [dict(BLOCK_M=[32, 64, 128], num_warps=[4, 8]), dict(BLOCK_K=[32, 64, 128])]
SCATTER = [dict(BLOCK_M=[32, 64, 128], num_warps=[4, 8]), dict(BLOCK_C=[32, 64, 128, 256])]
KNOBS = {"up": GATHER, "y_scatter": SCATTER, "bwd": GATHER, "dx_scatter": SCATTER,
         "wgrad": [dict(BLOCK_M=[32, 64, 128], num_warps=[4, 8]), dict(BLOCK_C=[64, 128, 256])]}
# bf16 gradients of two summation orders: the norm-wise error, and the largest element's error over the largest
# element (an error confined to a few rows or pairs would hide in the norm).
GRAD_TOL, GRAD_MAX_TOL = 2e-2, 5e-2


def grad_error(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(norm-wise relative error, max |g - ref| / max |ref|)."""
    peak = float(ref.abs().max()) if ref.numel() else 0.0
    worst = float((g.float() - ref.float()).abs().max()) if ref.numel() else 0.0
    return rel_err(g, ref), worst / peak if peak else worst


def layer_step(cfg: DecoConfig, T: int, device="cuda", dtype=torch.bfloat16):
    """(step, grads): forward + backward of one layer with a fixed upstream gradient; grads() returns the
    gradients of x and every weight of the last step."""
    x, w, _, dy = train_inputs(cfg, T, device, dtype)   # the benchmark's training case
    leaves = {"x": x, **w}

    def step():
        for t in leaves.values():
            t.grad = None
        ops.deco_ffn(x, **w, backend="triton").backward(dy)
    return step, lambda: {k: t.grad.detach().clone() for k, t in leaves.items()}


def measure(step, grads, reference, tiles: dict, timer) -> dict:
    """Step µs (``timer(step)``) and worst gradient error under ``tiles`` (all of TILES), or the error raised."""
    with mock.patch.dict(training.TILES, tiles):
        try:
            step()
            errs = [grad_error(g, reference[k]) for k, g in grads().items()] if reference else [(0.0, 0.0)]
            err, err_max = max(e[0] for e in errs), max(e[1] for e in errs)
            if err > GRAD_TOL or err_max > GRAD_MAX_TOL:
                return dict(error=f"gradients differ from the default tiles' by {err:.2e} (norm), {err_max:.2e} (max)")
            return dict(us=timer(step), grad_err=err, grad_max_err=err_max)
        except Exception as exc:  # noqa: BLE001  (a config that does not compile or fit is recorded, not fatal)
            return dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")


def sweep(step, grads, timer=device_busy_us, knobs=None) -> dict:
    """The coordinate sweep from the current TILES: {default, default_us, best, best_us, rows}. knobs: KNOBS,
    without the two scatters' when the down projections are GEMMs (ffn.down_gemm(): then they do not run)."""
    if knobs is None:
        knobs = {k: v for k, v in KNOBS.items() if not (ffn.down_gemm() and k.endswith("_scatter"))}
    default = {k: dict(v) for k, v in training.TILES.items()}
    base = measure(step, grads, None, default, timer)
    if "us" not in base:
        raise RuntimeError(f"the default tiles fail: {base['error']}")
    reference = grads()
    best, best_us, rows = {k: dict(v) for k, v in default.items()}, base["us"], []
    for key, groups in knobs.items():
        for group in groups:
            names = list(group)
            for values in itertools.product(*(group[n] for n in names)):
                tiles = {**best, key: {**best[key], **dict(zip(names, values))}}
                if tiles[key] == best[key]:
                    continue
                result = measure(step, grads, reference, tiles, timer)
                rows.append(dict(launch=key, tiles=tiles[key], **result))
                print(f"  {key} {tiles[key]}: " + (f"{result['us']:.1f} µs" if "us" in result else result["error"]))
                if result.get("us", float("inf")) < best_us:
                    best, best_us = tiles, result["us"]
    return dict(default=default, default_us=base["us"], best=best, best_us=best_us, rows=rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["1.2b"])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = []
    for preset in args.preset:
        step, grads = layer_step(DecoConfig.preset(preset), args.tokens)
        result = dict(preset=preset, T=args.tokens, **sweep(step, grads))
        print(f"{preset} T={args.tokens}: default {result['default_us']:.1f} µs, best {result['best_us']:.1f} µs "
              f"with {json.dumps(result['best'])}")
        out.append(result)
    if args.out:
        write_result(args.out, rows=out)


if __name__ == "__main__":
    main()
