"""``deco-kernels`` command line. ``deco-kernels demo``: one DECO layer on backend "auto", checked against the
float64 reference and timed against its dense twin (SwiGLU of width d_ff) on the same device."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import backends
from .config import PRESETS, DecoConfig
from .modules import DecoMoE, SwiGLU
from .reference import ops as ref

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Relative error ||y - ref|| / ||ref|| allowed against the float64 reference, by the layer's dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deco-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run one DECO layer, check it against the reference, time it vs dense")
    demo.add_argument("--preset", default="0.1b", choices=sorted(PRESETS), help="layer width (default 0.1b)")
    demo.add_argument("--tokens", type=int, default=1, help="tokens per call (default 1: batch-1 decode)")
    demo.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    demo.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                      help="auto: bfloat16 on cuda, float32 on cpu")
    demo.add_argument("--backend", default="auto", help="auto, torch, triton or cupy (default auto)")
    demo.add_argument("--repeats", type=int, default=20, help="timed calls per layer; the median is printed")
    demo.add_argument("--seed", type=int, default=0)
    from . import benchmark  # `deco-kernels bench`
    benchmark.add_parser(sub)
    from .autotune import tune  # `deco-kernels tune`
    tune.add_parser(sub)
    return parser


def _median_us(fn, x, repeats: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: lazy init, kernel compilation, caches
        fn(x)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def demo(args) -> int:
    if args.tokens < 1:
        raise SystemExit("deco-kernels demo: --tokens must be >= 1")
    if args.repeats < 1:
        raise SystemExit("deco-kernels demo: --repeats must be >= 1")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                      else "cpu"))
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = DecoConfig.preset(args.preset)
    torch.manual_seed(args.seed)
    layer = DecoMoE(config).to(device, dtype).eval()
    layer.backend = args.backend
    dense = SwiGLU(config.d_model, config.d_ff).to(device, dtype).eval()
    x = torch.randn(args.tokens, config.d_model, device=device, dtype=dtype)

    name = backends.resolve(layer.backend, device)
    print(f"preset {args.preset}: d={config.d_model} N={config.num_experts} de={config.expert_dim} "
          f"ds={config.shared_dim} d_ff={config.d_ff}, {args.tokens} token(s), {dtype} on {device}")
    print(f"backend: {name} (requested {layer.backend!r})")
    with torch.inference_mode():
        y = layer(x)
        w64 = {k: w.double() for k, w in layer.weights().items()}
        expected = ref.deco_ffn(x.double(), **w64, activation=layer.activation)
        rel_err = ((y.double() - expected).norm() / expected.norm()).item()
        tol = TOLERANCE[dtype]
        print(f"relative error vs float64 reference: {rel_err:.3e} (tolerance {tol:.0e})")
        print(f"active ratio: {layer.active_ratio.item():.3f} (untrained router; training drives it to "
              f"{config.target_active_ratio})")
        if name == "triton" and backends.interpreting():
            print("time: skipped, Triton runs in its CPU interpreter (TRITON_INTERPRET=1)")
        else:
            t_deco = _median_us(layer, x, args.repeats, device)
            t_dense = _median_us(dense, x, args.repeats, device)
            print(f"time (median of {args.repeats}): DECO {t_deco:.1f} us, dense twin {t_dense:.1f} us, "
                  f"dense/DECO = {t_dense / t_deco:.2f}x")
    if not rel_err <= tol:
        print("FAILED: the layer does not match the reference")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo(args)
    if args.command == "bench":
        from . import benchmark
        return benchmark.main(args)
    if args.command == "tune":
        return args.func(args)
    return 2  # unreachable: argparse requires a known command


if __name__ == "__main__":
    raise SystemExit(main())
