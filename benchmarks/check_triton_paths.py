"""Quick GPU check of every Triton forward path and tile option against the float64 reference, each case in its
own process (a kernel that faults leaves CUDA unusable for the rest of a process, and must not hide the other
cases), with a time limit per case.

    python benchmarks/check_triton_paths.py            # prints one line per case, exits 1 if any fails
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = [  # (T, d, N, de, ds, dtype, cfg overrides)
    (2, 40, 13, 32, 24, "float32", {}),
    (7, 40, 13, 32, 24, "float32", dict(use_dot=False, rows=4, up_warps=4, block_d=16, slots=8, down_warps=4)),
    (17, 40, 13, 32, 24, "float32", {}),
    (17, 41, 13, 32, 24, "float32", dict(rows=16, block_k=16)),
    (65, 40, 13, 32, 24, "float32", {}),
    (300, 41, 13, 64, 24, "float32", {}),
    (8, 1792, 102, 64, 128, "bfloat16", {}),
    (64, 1792, 102, 64, 128, "bfloat16", {}),
    (4096, 1792, 102, 64, 128, "bfloat16", {}),
]


def run_case(T, d, n, de, ds, dtype, overrides):
    import torch

    sys.path.insert(0, "tests")
    from conftest import make_layer, rel_err

    from deco_kernels import ops, reference
    from deco_kernels.triton import ffn

    torch.set_float32_matmul_precision("highest")
    os.environ["DECO_KERNELS_AUTOTUNE"] = "0"  # the defaults with the overrides, not a tuned cache
    path = "small_batch_config" if T <= ffn.SMALL_BATCH_MAX else "grouped_config"
    default = getattr(ffn, path)
    setattr(ffn, path, lambda *a: {**default(*a), **overrides})
    ffn._empty = lambda *shape, device, dtype: torch.full(shape, float("nan") if dtype.is_floating_point else -1,
                                                          device=device, dtype=dtype)
    x, w = make_layer(T, d, n, de, ds, device="cuda" if torch.cuda.is_available() else "cpu", dtype=getattr(torch, dtype), seed=T, active=0.25)
    with torch.no_grad():
        y, g = ops.deco_ffn(x, **w, backend="triton", return_gates=True)
        y2 = ops.deco_ffn(x, **w, backend="triton")
    y_ref, g_ref = reference.deco_ffn(x.double(), **{k: v.double() for k, v in w.items()}, return_gates=True)
    flips = (g.cpu() > 0) != (g_ref.cpu() > 0)
    # A flip is a rounding tie only when the reference gate sits within fp32 rounding of the cut.
    ties = flips & (g_ref.cpu().abs() <= 1e-5 * g_ref.cpu().abs().max())
    return dict(rel_err=rel_err(y.double(), y_ref), rerun_err=rel_err(y2.double(), y.double()),
                same_active=bool((flips == ties).all()), flips=int(flips.sum()))


def main():
    if len(sys.argv) > 1:
        print(json.dumps(run_case(*json.loads(sys.argv[1]))))
        return 0
    failed = 0
    for case in CASES:
        tol = 1e-5 if case[5] == "float32" else 1e-2
        try:
            proc = subprocess.run([sys.executable, __file__, json.dumps(case)], capture_output=True, text=True,
                                  timeout=120)
            out = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
            err = " | ".join(proc.stderr.strip().splitlines()[-3:]) if proc.returncode else ""
        except subprocess.TimeoutExpired:
            out, err = None, "timed out after 120 s"
        ok = out is not None and out["rel_err"] <= tol and out["same_active"]
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} T={case[0]} d={case[1]} N={case[2]} de={case[3]} {case[5]} "
              f"{case[6]}: {out if out else err}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
