"""The prefill layer under a CUDA graph with the up kernel's tiles varied: every variant of a (preset, T) timed
interleaved over rounds, the tuned config's other keys kept, so only the up kernel differs. Output: µs per
variant and the rel_err against the torch reference; a variant that does not compile is reported and skipped.

    python benchmarks/probe_grouped_up.py --presets 1.2b 0.1b --tokens 512 4096 \
        --variant tuned --variant k128 block_k=128 up_stages=3 --out probe_grouped_up.json

results/h100/probe_grouped_up_swap.json was measured with a "swap" key (the product as W_e @ x^T, branch
grouped-up-swap, commit named in benchmarks/NOTES.md): no gain, not merged.
"""
from __future__ import annotations

import argparse
import statistics
from unittest import mock

import torch

from deco_kernels import ops
from deco_kernels.benchmark import GpuTimer, preset_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn

TILE_KEYS = {"block_m", "block_k", "up_warps", "up_stages"}


def parse_variant(items: list[str]) -> tuple[str, dict]:
    name, *pairs = items
    spec = {k: int(v) for k, v in (p.split("=", 1) for p in pairs)}
    unknown = set(spec) - TILE_KEYS
    if unknown:
        raise SystemExit(f"--variant {name}: unknown keys {sorted(unknown)}; expected some of {sorted(TILE_KEYS)}")
    return name, spec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--variant", nargs="+", action="append", required=True,
                   help="NAME [block_m=..] [block_k=..] [up_warps=..] [up_stages=..]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    timer = GpuTimer(rep_ms=60, warmup_ms=10)
    lookup = ffn.config_for
    rows = []
    for preset, _, T, x, w, _ in preset_inputs(args.presets, args.tokens):
        with torch.no_grad():
            y_ref = ops.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()}, backend="torch")
        d, n, de, ds = x.shape[1], w["w_router"].shape[0], w["gamma"].shape[0], w["ws_gate"].shape[0]
        base = lookup("grouped", x.device, T, x.dtype, d, n, de, ds) or ffn.grouped_config(T)
        times, errs, failed = {name: [] for name, _ in variants}, {}, {}
        for _ in range(args.rounds):
            for name, spec in variants:
                if name in failed:
                    continue
                cfg = {**base, **spec}
                with mock.patch.object(ffn, "config_for", lambda *a, cfg=cfg, **k: cfg), torch.no_grad():
                    call = lambda: ops.deco_ffn(x, **w, backend="triton")  # noqa: E731
                    try:
                        errs[name] = rel_err(call().float(), y_ref)
                    except Exception as e:   # a tile past the shared memory: say so, time the others
                        failed[name] = f"{type(e).__name__}: {e}"
                        continue
                    times[name].append(timer(call, graph=True))
        for name, spec in variants:
            row = dict(preset=preset, T=T, variant=name, spec=spec, base=base)
            if name in failed:
                row["error"] = failed[name]
                print(f"{preset} T={T:5d} {name:>12s}: failed: {failed[name][:120]}", flush=True)
            else:
                row.update(us=statistics.median(times[name]), us_rounds=times[name], rel_err=errs[name])
                print(f"{preset} T={T:5d} {name:>12s}: {row['us']:8.1f} µs  rel_err {errs[name]:.2e}", flush=True)
            rows.append(row)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
