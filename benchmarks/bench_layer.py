"""One DECO layer vs its dense twin on the present GPU, side by side in one run.

    python benchmarks/bench_layer.py --presets 0.1b 1.2b --tokens 1 8 64 512 4096 --out results.json

For each preset and token count: the dense twin (SwiGLU of width d_ff through torch, i.e. cuBLAS), the torch
reference path and every available kernel backend, in bf16, with ~20% of the routed experts active (the
router bias is calibrated on the batch, SPEC §4). T <= 8 runs under CUDA graphs for the dense twin and the
kernels. Times are medians of triton.testing.do_bench (which flushes L2 between repetitions). Floors: at
small T the bytes that must be read (active experts' weights + shared + router) over the measured copy
bandwidth; at large T the active FLOPs over the measured bf16 matmul rate. Writes JSON with the device,
versions and date, and prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform

import torch

from deco_kernels import DecoConfig, backends, ops, reference

GRAPH_MAX_T = 8


def device_ceilings():
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    from triton.testing import do_bench
    n = 1 << 28  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    flops = 2 * m**3 / (ms * 1e-3)
    del src, dst, a, b
    return bw, flops


def launch_floor_us(kernels: int = 2) -> float:
    """µs of a CUDA graph of `kernels` back-to-back empty Triton launches: the part of any layer's time that no
    kernel design removes (the fewest launches a DECO layer takes is two)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _empty_kernel(ptr):
        if tl.program_id(0) < 0:  # never true: the launch does nothing
            tl.store(ptr, 0)

    buf = torch.zeros(1, device="cuda")

    def run():
        for _ in range(kernels):
            _empty_kernel[(132,)](buf)
    return timed(run, True)


def make_layer(cfg: DecoConfig, T: int, seed: int, target: float = 0.2, dtype=torch.bfloat16):
    """Init-scale weights (SPEC §1) with x ~ N(0, 1); returns x, weights and the calibrated router bias."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    d, n, de, ds = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim

    def normal(*shape, std=0.01):
        return (torch.randn(*shape, generator=g, device="cuda") * std).to(dtype)

    w = dict(w_router=normal(n, d), router_scale=torch.full((n,), 0.1, device="cuda", dtype=dtype),
             w_up=normal(n * de, d), gamma=torch.ones(de, device="cuda", dtype=dtype), w_down=normal(d, n * de),
             ws_gate=normal(ds, d), ws_up=normal(ds, d), ws_down=normal(d, ds, std=0.01 / math.sqrt(2 * cfg.num_layers)))
    x = torch.randn(T, d, generator=g, device="cuda").to(dtype)
    # Calibrate a global router bias on a 256-token batch so ~target of the gates are > 0.
    calib = torch.randn(256, d, generator=g, device="cuda").to(dtype)
    r = reference.router_logits(calib, w["w_router"])
    bias = -torch.quantile(r.flatten().float(), 1 - target).item()
    dense = dict(w_gate=normal(cfg.d_ff, d), w_up=normal(cfg.d_ff, d), w_down=normal(d, cfg.d_ff))
    return x, w, bias, dense


def timed(fn, use_graph: bool) -> float:
    """Median µs of fn (under a CUDA graph when use_graph)."""
    from triton.testing import do_bench
    if use_graph:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    else:
        run = fn
    return do_bench(run, warmup=25, rep=200, return_mode="median") * 1e3


def bench_case(cfg, preset, T, bw, flops, kernel_backends, with_reference):
    x, w, bias, dense = make_layer(cfg, T, seed=T)
    d, n, de, ds = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim
    with torch.no_grad():
        y_ref, g = reference.deco_ffn(x, **w, bias=bias, return_gates=True)
    active = g > 0
    pairs = int(active.sum())
    union = int(active.any(0).sum())
    esize = x.element_size()
    # Floors: bytes of the experts that must be read (the union over the batch) + shared + router, and FLOPs.
    floor_bytes = (union * 2 * de * d + 3 * ds * d + n * d) * esize
    floor_flops = 2 * pairs * 2 * de * d + 2 * T * 3 * ds * d + 2 * T * n * d
    floor_us = max(floor_bytes / bw, floor_flops / flops) * 1e6
    dense_bytes = 3 * cfg.d_ff * d * esize
    dense_floor_us = max(dense_bytes / bw, 2 * T * 3 * cfg.d_ff * d / flops) * 1e6
    use_graph = T <= GRAPH_MAX_T
    row = dict(preset=preset, T=T, active_ratio=pairs / max(1, T * n), union_experts=union, num_experts=n,
               floor_us=floor_us, dense_floor_us=dense_floor_us, graph=use_graph, us={}, rel_err={})
    with torch.no_grad():
        row["us"]["dense_twin"] = timed(lambda: ops.dense_swiglu(x, **dense), use_graph)
        if with_reference:
            row["us"]["torch"] = timed(lambda: reference.deco_ffn(x, **w, bias=bias), False)
        for name in kernel_backends:
            y = ops.deco_ffn(x, **w, bias=bias, backend=name)
            row["rel_err"][name] = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
            row["us"][name] = timed(lambda: ops.deco_ffn(x, **w, bias=bias, backend=name), use_graph)
    for name, us in row["us"].items():
        row.setdefault("speedup_vs_dense", {})[name] = row["us"]["dense_twin"] / us
        row.setdefault("fraction_of_floor", {})[name] = (dense_floor_us if name == "dense_twin" else floor_us) / us
    return row


def environment():
    import triton
    props = torch.cuda.get_device_properties(0)
    env = dict(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
               torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
               python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat())
    try:
        import cupy
        env["cupy"] = cupy.__version__
    except ImportError:
        pass
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["0.1b", "1.2b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512, 4096])
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) torch reference path")
    p.add_argument("--out", default="bench_layer.json")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    kernel_backends = [b for b in ("triton", "cupy") if backends.available(b, torch.device("cuda"))]
    bw, flops = device_ceilings()
    floor1, floor2 = launch_floor_us(1), launch_floor_us(2)
    rows = []
    for preset in args.presets:
        cfg = DecoConfig.preset(preset)
        for T in args.tokens:
            rows.append(bench_case(cfg, preset, T, bw, flops, kernel_backends, not args.no_reference))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(environment=environment(), copy_bandwidth_Bps=bw, bf16_matmul_flops=flops,
                  one_empty_launch_us=floor1, two_empty_launches_us=floor2, dtype="bfloat16", rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    names = ["dense_twin", "torch", *kernel_backends]
    print(f"\n{result['environment']['gpu']}  copy {bw / 1e12:.2f} TB/s  bf16 mm {flops / 1e12:.0f} TFLOP/s  "
          f"empty launches (CUDA graph): one {floor1:.1f} us, two {floor2:.1f} us")
    print(f"{'preset':6} {'T':>5} {'act%':>5} " + " ".join(f"{n + ' us':>12}" for n in names)
          + "  " + " ".join(f"{k + ' x':>9}" for k in kernel_backends)
          + " " + " ".join(f"{k + ' floor':>11}" for k in kernel_backends))
    for r in rows:
        us = " ".join(f"{r['us'].get(n, float('nan')):12.1f}" for n in names)
        sp = " ".join(f"{r['speedup_vs_dense'][k]:9.2f}" for k in kernel_backends)
        fl = " ".join(f"{r['fraction_of_floor'][k]:11.2f}" for k in kernel_backends)
        print(f"{r['preset']:6} {r['T']:5d} {100 * r['active_ratio']:5.1f} {us}  {sp} {fl}")


if __name__ == "__main__":
    main()
