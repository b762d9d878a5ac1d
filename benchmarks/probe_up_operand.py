"""Where the prefill up kernel's time goes: the kernel itself against scratch kernels on the same grid and the
same grouping that keep parts of its work. Routed programs only (the shared expert's programs are left out
of every variant but one, the real kernel's included: its grid is given 0 shared columns by ds = 0).

Variants, each timed alone under a CUDA graph, interleaved over rounds:
- kernel: grouped._grouped_up_kernel on the tuned (or default) config, token-major output;
- kernel_with_shared: the same with the shared expert's programs (the layer's launch);
- shared_gemm_cublas: the shared expert's gate and up columns as one cuBLAS GEMM, x @ [ws_gate; ws_up]^T
  (no silu): what the shared programs would cost outside the kernel, launch aside;
- dot: the same product (grouped._expert_matmul), the accumulator summed and stored (no NormSiLU, no
  [BLOCK_M, de] store);
- dot_contiguous: as dot with the token rows m0.. of x instead of the expert's gathered tokens (what a
  dense GEMM's operand looks like to the loads).
kernel - dot is the epilogue's share, dot - dot_contiguous the gather's. (Commit 3f29b9a's version also summed
the loaded tiles on CUDA cores instead of multiplying them: slower than the kernel itself, 147 against 76 µs at
1.2b T=4096 on the H100, so no floor; dropped.)

    python benchmarks/probe_up_operand.py --presets 1.2b 0.1b --tokens 512 4096 --out probe_up_operand.json
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from deco_kernels import reference as ref
from deco_kernels.autotune import config_for
from deco_kernels.benchmark import GpuTimer, preset_inputs, write_result
from deco_kernels.reference.ops import NORM_EPS
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn, means
from deco_kernels.triton.grouped import _expert_matmul, _grouped_up_kernel, _tile_tokens


@triton.jit
def _up_product_kernel(x_ptr, wup_ptr, tok_ptr, count_ptr, out_ptr, T, N, D, stride_xt, CONTIGUOUS: tl.constexpr,
                       DE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The up kernel's routed programs without the epilogue: the same product (grouped._expert_matmul), summed
    to one fp32 per program; with CONTIGUOUS over the token rows m0.. instead of the expert's tokens."""
    pid = tl.program_id(0)
    e = pid % N
    m0 = (pid // N) * BLOCK_M
    count = tl.load(count_ptr + e)
    if m0 < count:
        e64 = e.to(tl.int64)
        ms, mmask, toks = _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M)
        if CONTIGUOUS:
            toks = ms.to(tl.int64)
        acc = _expert_matmul(x_ptr, stride_xt, toks, mmask, wup_ptr, e64, D, 1, D, 0, DE, "tf32", BLOCK_M, BLOCK_K,
                             False)
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    timer = GpuTimer(rep_ms=100)
    rows = []
    for preset, cfg, T, x, w, _ in preset_inputs(args.presets, args.tokens):
        d, n, de = cfg.d_model, cfg.num_experts, cfg.expert_dim
        tile = config_for("grouped", x.device, T, x.dtype, d, n, de, cfg.shared_dim) or ffn.grouped_config(T)
        mean = means.cached_expert_mean(w["w_up"])
        g = torch.empty(T, n, device=x.device, dtype=torch.float32)
        mu = torch.empty(T, device=x.device, dtype=torch.float32)
        tokens, counts = ffn._group_by_expert(x, w["w_router"], mean, 0.0, None, 0.0, None, g, mu,
                                              tile["router_block_t"])
        bm, bk = tile["block_m"], tile["block_k"]
        grid = (n * ffn.cdiv(T, bm),)
        meta = dict(num_warps=tile["up_warps"], num_stages=tile["up_stages"])
        act = torch.zeros(T, n * de, device=x.device, dtype=x.dtype)
        out = torch.empty(grid[0], device=x.device, dtype=torch.float32)
        ds = cfg.shared_dim
        hs = torch.empty(T, ds, device=x.device, dtype=x.dtype)
        ws_gu = torch.cat([w["ws_gate"], w["ws_up"]])

        def up_kernel(shared_cols):
            grid_s = ((n + ffn.cdiv(shared_cols, de)) * ffn.cdiv(T, bm),)
            return lambda: _grouped_up_kernel[grid_s](
                x, w["w_up"], w["ws_gate"], w["ws_up"], tokens, counts, g, mu, w["router_scale"], w["gamma"], act,
                hs, T, n, d, shared_cols, x.stride(0), NORM_EPS, DE=de, PREC="tf32", BLOCK_M=bm, BLOCK_K=bk,
                TOKEN_MAJOR=True, **meta)

        def product(contiguous):
            return lambda: _up_product_kernel[grid](x, w["w_up"], tokens, counts, out, T, n, d, x.stride(0),
                                                    CONTIGUOUS=contiguous, DE=de, BLOCK_M=bm, BLOCK_K=bk, **meta)
        # Checked before timed: the layer's launch against torch on the kernel's own gates and mu (act is
        # token-major, zero where a gate is off: so is the reference).
        up_kernel(ds)()
        wf = {k: v.float() for k, v in w.items()}
        u = (x.float() @ wf["w_up"].t()).view(T, n, de)
        act_ref = ref.norm_silu(u, wf["gamma"], mu[:, None, None]) * (g * wf["router_scale"])[:, :, None]
        hs_ref = torch.nn.functional.silu(x.float() @ wf["ws_gate"].t()) * (x.float() @ wf["ws_up"].t())
        errors = dict(act=rel_err(act.float(), act_ref.view(T, n * de)), hs=rel_err(hs.float(), hs_ref))
        fns = {"kernel": up_kernel(0), "dot": product(False), "dot_contiguous": product(True),
               "kernel_with_shared": up_kernel(ds), "shared_gemm_cublas": lambda: torch.matmul(x, ws_gu.t())}
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(timer(fn, True))
        pairs = int(counts.sum())
        row = dict(preset=preset, T=T, pairs=pairs, config=tile, rel_err=errors,
                   us={k: sorted(v)[len(v) // 2] for k, v in times.items()}, us_rounds=times,
                   gathered_bytes=pairs * d * x.element_size(),
                   weight_bytes=int(sum(ffn.cdiv(int(c), bm) for c in counts.tolist())) * de * d * x.element_size(),
                   flops=2 * pairs * de * d)
        row["tflops"] = {k: row["flops"] / (u * 1e-6) / 1e12 for k, u in row["us"].items()}
        row["operand_tb_per_s"] = {k: (row["gathered_bytes"] + row["weight_bytes"]) / (u * 1e-6) / 1e12
                                   for k, u in row["us"].items()}
        rows.append(row)
        print(f"{preset} T={T:5d} pairs {pairs}: " + ", ".join(f"{k} {u:.1f} µs" for k, u in row["us"].items())
              + f"; operand bytes {(row['gathered_bytes'] + row['weight_bytes']) / 1e6:.0f} MB; rel_err {errors}")
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
