"""A/B of module-level switches and tile configs on the layer forward. A variant sets attributes of
deco_kernels.triton.ffn (UPPER_CASE keys) and/or overrides keys of the config the launcher looks up (lower_case
keys, e.g. block_k: the tuned or default config of that path, with these keys replaced). The variants are timed
interleaved (rounds x variants, CUDA graphs, the same inputs) with the output's rel_err against the torch
reference, so a host's drift hits every variant alike; a variant that does not compile (e.g. a tile past the
shared memory) is reported and skipped.

    python benchmarks/probe_ab.py --presets 1.2b 0.1b --tokens 2048 4096 \
        --variant k64 ROUTER_LONG_BLOCK_K=64 --variant k128 ROUTER_LONG_BLOCK_K=128 --out results/h200/probe_ab.json
    python benchmarks/probe_ab.py --presets 1.2b --tokens 512 4096 \
        --variant tuned --variant k128 block_k=128 up_stages=3 --out probe_up_tiles.json

results/h200/probe_ab_shared_in_up.json compared a switch SHARED_IN_UP that commit b6ad7f4 had for the run;
results/h100/probe_grouped_up_swap.json a switch of the up kernel's product orientation with tile overrides
(branch grouped-up-swap, commit eabb444, whose benchmarks/probe_grouped_up.py ran it). The deterministic GEMM
down projection against the atomics:

    python benchmarks/probe_ab.py --presets 1.2b 0.1b --tokens 128 512 2048 4096 \
        --variant atomics DOWN_GEMM=0 --variant gemm DOWN_GEMM=1 --out results/h200/probe_ab_down_gemm.json
"""
from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack
from unittest import mock

import torch

from deco_kernels import ops
from deco_kernels.benchmark import GpuTimer, preset_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn

DEFAULTS = {"grouped": lambda T, dtype: ffn.grouped_config(T), "small_batch": ffn.small_batch_config}


def parse_variant(items: list[str]) -> tuple[str, dict, dict]:
    """NAME KEY=INT ... -> (name, ffn attributes, config overrides)."""
    name, *pairs = items
    spec = {k: int(v) for k, v in (p.split("=", 1) for p in pairs)}
    attrs = {k: v for k, v in spec.items() if k.isupper()}
    unknown = sorted(k for k in attrs if not hasattr(ffn, k))
    if unknown:
        raise SystemExit(f"--variant {name}: deco_kernels.triton.ffn has no attribute {unknown}")
    return name, attrs, {k: v for k, v in spec.items() if not k.isupper()}


def overriding(tiles: dict):
    """ffn.config_for replaced by one that returns the looked-up (or default) config with ``tiles`` on top."""
    lookup = ffn.config_for

    def config_for(kind, device, T, dtype, *geom):
        return {**(lookup(kind, device, T, dtype, *geom) or DEFAULTS[kind](T, dtype)), **tiles}
    return mock.patch.object(ffn, "config_for", config_for)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--variant", nargs="+", action="append", required=True,
                   help="NAME [ATTR=INT ...] [config_key=INT ...]: ffn attributes and config keys this variant sets")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    timer = GpuTimer(rep_ms=60, warmup_ms=10)
    rows = []
    for preset, _, T, x, w, _ in preset_inputs(args.presets, args.tokens):
        with torch.no_grad():
            y_ref = ops.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()}, backend="torch")
        times, errs, failed = {name: [] for name, *_ in variants}, {}, {}
        for _ in range(args.rounds):
            for name, attrs, tiles in variants:
                if name in failed:
                    continue
                with ExitStack() as stack, torch.no_grad():
                    if attrs:
                        stack.enter_context(mock.patch.multiple(ffn, **attrs))
                    if tiles:
                        stack.enter_context(overriding(tiles))
                    call = lambda: ops.deco_ffn(x, **w, backend="triton")  # noqa: E731
                    try:
                        errs[name] = rel_err(call().float(), y_ref)
                    except Exception as e:   # noqa: BLE001 - e.g. a tile past the shared memory: time the others
                        failed[name] = f"{type(e).__name__}: {e}"
                        continue
                    times[name].append(timer(call, graph=True))
        for name, attrs, tiles in variants:
            row = dict(preset=preset, T=T, variant=name, attrs=attrs, tiles=tiles)
            if name in failed:
                row["error"] = failed[name]
                print(f"{preset} T={T:5d} {name:>12s}: failed: {failed[name][:120]}", flush=True)
            else:
                row.update(us=statistics.median(times[name]), us_rounds=times[name], rel_err=errs[name])
                print(f"{preset} T={T:5d} {name:>12s}: {row['us']:8.1f} µs  {times[name]}  rel_err {errs[name]:.2e}",
                      flush=True)
            rows.append(row)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
