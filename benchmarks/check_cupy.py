"""First look at the CuPy backend on a GPU: a quick correctness check of every path, then cupy vs triton vs the
dense twin at 1.2b, T=1 (CUDA graph) and T=4096 (eager). About a minute, most of it NVRTC compiles (cached on
disk by cupy afterwards).

    python benchmarks/check_cupy.py            # add --skip-bench or --skip-check to run one half

Every case is guarded: an exception is printed with its case and the run goes on. Exit status 1 if any check
failed or raised.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
try:
    from deco_kernels.testing import make_layer, rel_err
except ImportError:  # older checkouts: the tests' copy
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_layer, rel_err

from deco_kernels import ops, reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {BF16: 1e-2, FP16: 1e-2, FP32: 1e-5}
SMALL = (40, 13, 64, 24)            # d, N, de, ds: tails everywhere
PRESETS = {"0.1b": (768, 42, 64, 128, 1920), "1.2b": (1792, 102, 64, 128, 4480)}
failures: list[str] = []


def guarded(label):
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001 - one failure must not hide the rest
                failures.append(label)
                print(f"  {label}: EXCEPTION\n" + "".join("    " + line for line in
                                                          traceback.format_exc().splitlines(True)[-12:]))
        return run
    return wrap


def check_case(label, T, dtype, shape=SMALL, active=0.3, seed=0, ldmatrix=True, **knobs):
    @guarded(label)
    def body():
        d, n, de, ds = shape
        x, w = make_layer(T, d, n, de, ds, dtype=dtype, device="cuda", seed=seed, active=active)
        t0 = time.perf_counter()
        with torch.no_grad():
            if ldmatrix:
                y, g = ops.deco_ffn(x, **w, backend="cupy", return_gates=True, **knobs)
            else:
                from deco_kernels.cupy.ffn import deco_ffn as cupy_ffn
                y, g = cupy_ffn(x, **w, return_gates=True, ldmatrix=False, **knobs)
            torch.cuda.synchronize()
        first_call = time.perf_counter() - t0
        if T <= 512:  # float64 reference on the CPU
            w_ref = {k: v.double().cpu() for k, v in w.items()}
            k_ref = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in knobs.items()}
            y_ref, g_ref = reference.deco_ffn(x.double().cpu(), **w_ref, return_gates=True, **k_ref)
        else:     # fp32 reference on the GPU
            with torch.no_grad():
                y_ref, g_ref = reference.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()},
                                                  return_gates=True, **knobs)
        with torch.no_grad():
            _, g32 = reference.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()}, return_gates=True,
                                        **knobs)
        same_active = bool(torch.equal(g > 0, g32 > 0))
        err, gerr = rel_err(y, y_ref), rel_err(g, g_ref)
        finite = bool(torch.isfinite(y).all())
        ok = same_active and finite and err <= TOL[dtype]
        if not ok:
            failures.append(label)
        print(f"  {label:<44} rel_err y {err:.2e} (tol {TOL[dtype]:.0e})  gates {gerr:.1e}  "
              f"active set {'same' if same_active else 'DIFFERENT'}  first call {first_call:5.1f} s  "
              f"{'ok' if ok else 'FAIL'}")
    body()


def run_checks():
    print("correctness against the reference (d, N, de, ds = %s unless named)" % (SMALL,))
    for T in (1, 3, 8, 17, 300):
        check_case(f"bf16 T={T}", T, BF16, seed=T)
    for dtype, name in ((FP16, "fp16"), (FP32, "fp32")):
        for T in (1, 65):
            check_case(f"{name} T={T}", T, dtype, seed=T)
    check_case("bf16 T=3 max_active=3 bias vector", 3, BF16, seed=5, max_active=3,
               bias=torch.linspace(-0.5, 0.5, SMALL[1], device="cuda"))
    check_case("bf16 T=65 threshold=0.3 max_active=2", 65, BF16, seed=6, threshold=0.3, max_active=2)
    check_case("bf16 T=17 no active expert", 17, BF16, seed=7, active="none")
    check_case("bf16 T=300 all experts active", 300, BF16, seed=8, active="all")
    check_case("bf16 T=300 one expert takes every token", 300, BF16, seed=9, active="one")
    check_case("bf16 T=300 ldmatrix=False", 300, BF16, seed=10, ldmatrix=False)
    for T in (1, 4096):
        check_case(f"1.2b bf16 T={T}", T, BF16, shape=PRESETS["1.2b"][:4], active=0.2, seed=11)


def dense_twin(d, d_ff, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(*s, device="cuda", dtype=dtype, generator=g) / math.sqrt(s[1])
            for s in ((d_ff, d), (d_ff, d), (d, d_ff))]


def run_bench():
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    from deco_kernels import backends
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"\ntimings on {torch.cuda.get_device_name()} (bf16, ~20% of experts active, median µs; "
          f"T=1 under a CUDA graph)")
    rows = []
    for preset in ("1.2b", "0.1b"):
        d, n, de, ds, d_ff = PRESETS[preset]
        for T in (1, 4096):
            x, w = make_layer(T, d, n, de, ds, dtype=BF16, device="cuda", seed=1, active=0.2)
            wg, wu, wd = dense_twin(d, d_ff, BF16)
            fns = {"dense_twin": lambda: ops.dense_swiglu(x, wg, wu, wd)}
            for name in ("triton", "cupy"):
                if backends.available(name, x.device):
                    fns[name] = (lambda b: lambda: ops.deco_ffn(x, **w, backend=b))(name)
            row = {"preset": preset, "T": T}
            for name, fn in fns.items():
                @guarded(f"bench {preset} T={T} {name}")
                def timed():
                    with torch.no_grad():
                        fn()
                        torch.cuda.synchronize()
                        if T == 1:
                            return 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
                        return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = timed()
            rows.append(row)
    print("\n| preset | T | dense_twin µs | triton µs | cupy µs | cupy vs triton | cupy vs dense |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "-"  # noqa: E731
    for r in rows:
        c, t, dn = r.get("cupy"), r.get("triton"), r.get("dense_twin")
        vs_t = f"{t / c:.2f}x" if isinstance(c, float) and isinstance(t, float) else "-"
        vs_d = f"{dn / c:.2f}x" if isinstance(c, float) and isinstance(dn, float) else "-"
        print(f"| {r['preset']} | {r['T']} | {fmt(dn)} | {fmt(t)} | {fmt(c)} | {vs_t} | {vs_d} |")
    print("(cupy vs triton > 1: cupy faster; the target is >= 0.8x at T=1 and T=4096)")
    print(f"versions: torch {torch.__version__}, triton {triton.__version__}, cupy {_cupy_version()}")


def _cupy_version():
    try:
        import cupy
        return cupy.__version__
    except ImportError:
        return "absent"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("check_cupy.py: needs a CUDA GPU")
    t0 = time.perf_counter()
    if not args.skip_check:
        run_checks()
    if not args.skip_bench:
        guarded("bench")(run_bench)()
    print(f"\n{len(failures)} failure(s){': ' + ', '.join(failures) if failures else ''}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
