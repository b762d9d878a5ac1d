"""Router kernel: fp32 logits, the elastic knobs (max_active included) and the global mean mu = x.wbar.

One program owns BLOCK_T tokens and ALL experts (N <= BLOCK_N), so the per-token top-max_active selection
happens in registers. For 16-bit x and router weights of the same dtype the logits come from tensor cores
with fp32 accumulation: the products of two bf16/fp16 numbers are exact in fp32, so this equals
fp32(x) @ fp32(w_router)^T up to the order of the sum.
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, router_dot


@triton.jit
def _router_kernel(x_ptr, wr_ptr, wbar_ptr, bias_ptr, g_ptr, gt_ptr, mu_ptr,
                   T, N, D, stride_xt, bias, threshold, max_active,
                   HAS_BIAS_VEC: tl.constexpr, WRITE_GT: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    ns64 = ns.to(tl.int64)

    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    mu = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(wr_ptr + ns64[:, None] * D + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += router_dot(x, w)
        wbar = tl.load(wbar_ptr + ks, mask=kmask, other=0.0)
        mu += tl.sum(x.to(tl.float32) * wbar[None, :], axis=1)

    if HAS_BIAS_VEC:
        b = tl.load(bias_ptr + ns, mask=nmask, other=0.0)[None, :]
    else:
        b = bias
    g = gate_knobs(acc, b, threshold)
    g = tl.where(nmask[None, :], g, 0.0)
    if max_active > 0:
        # Keep the max_active largest gates per token; among equal gates the lower expert index wins.
        work = tl.where(nmask[None, :], g, -1.0)
        keep = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int32)
        for _ in range(0, max_active):
            top = tl.max(work, axis=1)
            first = tl.min(tl.where(work == top[:, None], ns[None, :], BLOCK_N), axis=1)
            hit = ns[None, :] == first[:, None]
            keep = tl.where(hit, 1, keep)
            work = tl.where(hit, -2.0, work)
        g = tl.where(keep > 0, g, 0.0)

    out_mask = tmask[:, None] & nmask[None, :]
    tl.store(g_ptr + ts64[:, None] * N + ns[None, :], g, mask=out_mask)
    if WRITE_GT:
        tl.store(gt_ptr + ns64[None, :] * T + ts[:, None], g, mask=out_mask)
    tl.store(mu_ptr + ts, mu, mask=tmask)
