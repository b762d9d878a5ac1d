"""Decode (T <= 2) with the up / down kernels' registers capped (cfg keys up_maxnreg / down_maxnreg, launch
option maxnreg): Nsight Compute showed the 1.2b T=1 up kernel at 102 registers a thread, two resident programs
of 8 warps per SM, so its 416 programs run in 1.58 waves (results/h200/ncu_decode_1.2b_T1.txt). A cap that
lets every program be resident at once may shorten the critical path, or spill. CUDA-graph µs of the whole
layer, the tuned config (the shipped cache, else the defaults) with and without each cap, checked against the
uncapped output.

    python benchmarks/probe_decode_registers.py --presets 1.2b 0.1b --tokens 1 2 --out probe_decode_registers.json
"""
import argparse

from sweep_tiles import TIMER, layer_runner

from deco_kernels import DecoConfig
from deco_kernels.autotune import config_for
from deco_kernels.benchmark import layer_inputs, write_result
from deco_kernels.triton import ffn

CAPS = [dict(), dict(up_maxnreg=64), dict(up_maxnreg=80), dict(up_maxnreg=48), dict(down_maxnreg=128),
        dict(up_maxnreg=64, down_maxnreg=128)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="*", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="*", type=int, default=[1, 2])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        for T in args.tokens:
            x, w, _ = layer_inputs(cfg, T, "cuda")
            n = cfg.num_experts
            base = (config_for("small_batch", x.device, T, x.dtype, cfg.d_model, n, cfg.expert_dim, cfg.shared_dim)
                    or ffn.small_batch_config(T, x.dtype))
            run = layer_runner(x, w, 0.0, T, n)
            expected = run(base).clone()
            for cap in CAPS:
                c = {**base, **cap}
                try:
                    err = ((run(c).float() - expected.float()).norm() / expected.float().norm()).item()
                    us = TIMER(lambda c=c: run(c), True)
                except Exception as exc:  # noqa: BLE001  (recorded; the other caps still run)
                    rows.append(dict(preset=preset, T=T, cap=cap, error=repr(exc)[:200]))
                    continue
                rows.append(dict(preset=preset, T=T, cap=cap, config=c, us=us, rel_diff=err))
                print(f"{preset} T={T} {cap or 'no cap'}: {us:.2f} µs (rel diff {err:.1e})", flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
