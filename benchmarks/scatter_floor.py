"""The floor under the scatter step: the prefill's down projection (y[t] += a[t, e] W_down_e for every active
(token, expert) pair) and the training path's two pair-scatter passes (y forward, dx backward) add one
d-vector per pair into its token's fp32 row with atomics. This script times that reduction alone, with no
matmul and no weights (`_scatter_ones_kernel`: the real kernels' grid, token lists and red.global.add, adding
ones), next to the alternatives' own floors, all under CUDA graphs in one run:

- ``atomics_c<BLOCK_C>``: the reduction alone, per column block width;
- ``down_kernel``: the Triton prefill's down projection as the layer runs it (matmul + reduction);
- ``dense_masked_gemm``: the atomics-free alternative, every expert's activations in a [T, N*de] matrix
  (zeros where inactive) times W_down^T on cuBLAS: 5x the FLOPs at 20% active;
- ``pair_major_copy``: a copy of a [P, d] bf16 buffer, the bytes that writing each pair's output once and reading
  it back for a per-token sum would move (the other atomics-free alternative, before its gather).

    python benchmarks/scatter_floor.py --presets 1.2b 0.1b --tokens 4096 --out scatter_floor.json
    TRITON_INTERPRET=1 python benchmarks/scatter_floor.py --check      # CPU: the kernel adds what it should
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from deco_kernels import DecoConfig, ops
from deco_kernels.testing import make_layer
from deco_kernels.triton import ffn


@triton.jit
def _scatter_ones_kernel(tok_ptr, count_ptr, out_ptr, T, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, :C] += 1 for every token t of expert e's list tokens[e, :count[e]], with the grid (expert, block
    of BLOCK_M of its tokens) and the atomics of the scatter kernels."""
    e = tl.program_id(0).to(tl.int64)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.load(count_ptr + e)
    if tl.program_id(1) * BLOCK_M < count:
        mmask = ms < count
        toks = tl.load(tok_ptr + e * T + ms, mask=mmask, other=0).to(tl.int64)
        ones = tl.full([BLOCK_M, BLOCK_C], 1.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tl.atomic_add(out_ptr + toks[:, None] * C + cols[None, :], ones,
                          mask=mmask[:, None] & (cols < C)[None, :], sem="relaxed")


def scatter_ones(tokens, counts, out, block_m: int = 64, block_c: int = 64, num_warps: int = 8):
    """Launch _scatter_ones_kernel: tokens [N, T] int32, counts [N] int32, out [T, C] fp32 (added into)."""
    n, T = tokens.shape
    if T == 0:
        return out
    grid = (n, ffn.cdiv(T, block_m))
    _scatter_ones_kernel[grid](tokens, counts, out, T, out.shape[1], BLOCK_M=block_m, BLOCK_C=block_c,
                               num_warps=num_warps)
    return out


def routing(cfg: DecoConfig, T: int, device, active: float = 0.2):
    """Layer inputs at ~``active`` and their expert token lists: (x, w, tokens [N, T], counts [N], gates)."""
    x, w = make_layer(T, cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim, dtype=torch.bfloat16,
                      device=device, seed=1, active=active)
    _, g = ops.deco_ffn(x, **w, backend="torch", return_gates=True)
    tokens, counts = ffn._group_gates(g.float().t().contiguous())
    return x, w, tokens, counts, g


def rows_for(preset: str, T: int, timer, block_cs=(64, 128, 256)) -> list[dict]:
    from probe_small_batch import kernel_us

    cfg = DecoConfig.preset(preset)
    x, w, tokens, counts, g = routing(cfg, T, "cuda")
    P = int(counts.sum())
    d, nde = cfg.d_model, cfg.num_experts * cfg.expert_dim
    base = dict(preset=preset, T=T, pairs=P, d=d, reduction_bytes=4 * P * d)
    out = torch.zeros(T, d, device="cuda")
    rows = [dict(base, variant=f"atomics_c{c}", us=timer(lambda c=c: scatter_ones(tokens, counts, out, block_c=c),
                                                          True)) for c in block_cs]
    layer = kernel_us(lambda: ops.deco_ffn(x, **w, backend="triton"))
    down = {k: v for k, v in layer.items() if "down" in k}
    rows.append(dict(base, variant="down_kernel", us=sum(down.values()), kernels=down))
    act = torch.zeros(T, nde, device="cuda", dtype=torch.bfloat16)
    act.view(T, cfg.num_experts, cfg.expert_dim)[g > 0] = 1.0
    rows.append(dict(base, variant="dense_masked_gemm", flops=2 * T * nde * d,
                     us=timer(lambda: act @ w["w_down"].t(), True)))
    buf = torch.empty(P, d, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(buf)
    rows.append(dict(base, variant="pair_major_copy", bytes=2 * buf.numel() * buf.element_size(),
                     us=timer(lambda: dst.copy_(buf), True)))
    return rows


def check(device: str = "cpu") -> None:
    """out gains, in each row, the number of experts active for that token (tiny shapes; on the CPU under
    TRITON_INTERPRET=1)."""
    cfg = DecoConfig.preset("tiny")
    for T, c in ((0, 16), (1, 16), (37, 16), (70, 32)):
        _, _, tokens, counts, g = routing(cfg, T, device, active=0.4)
        out = torch.full((T, 40), 0.5, device=device)
        scatter_ones(tokens, counts, out, block_m=16, block_c=c, num_warps=4)
        expected = 0.5 + (g > 0).sum(1, keepdim=True).float().expand(T, 40)
        assert torch.equal(out, expected), (T, c)
    print("scatter_ones: ok")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[4096])
    p.add_argument("--out", default=None)
    p.add_argument("--check", action="store_true", help="check the kernel on the CPU (TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.check:
        return check()
    from deco_kernels.benchmark import GpuTimer, environment

    timer = GpuTimer(rep_ms=100)
    rows = []
    for preset in args.presets:
        for T in args.tokens:
            rows += rows_for(preset, T, timer)
            for r in rows[-6:]:
                rate = f", {r['reduction_bytes'] / (r['us'] * 1e-6) / 1e12:.2f} TB/s of fp32 adds" \
                    if r["variant"].startswith("atomics") else ""
                print(f"{preset} T={T} P={r['pairs']} {r['variant']}: {r['us']:.1f} µs{rate}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(environment=environment(), timing=timer.describe(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
