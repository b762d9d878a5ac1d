"""Router kernel: fp32 logits, the elastic knobs (max_active included) and the global mean mu = x.wbar.

A token block's gates are finished by one program that holds ALL experts' logits (N <= BLOCK_N), so the
per-token top-max_active selection happens in registers. Few tokens make few token blocks: then the K
dimension is split over SPLIT_K programs per block (at T=1 one program would read all of w_router alone). For 16-bit x and router weights of the same dtype the logits come from tensor cores
with fp32 accumulation: the products of two bf16/fp16 numbers are exact in fp32, so this equals
fp32(x) @ fp32(w_router)^T up to the order of the sum; with bf16 x and router weights mu = x.wbar comes from the
same product (MU_MMA below).
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, router_dot


@triton.jit
def _router_kernel(x_ptr, wr_ptr, wbar_ptr, wsplit_ptr, bias_ptr, g_ptr, gt_ptr, mu_ptr, part_ptr, counter_ptr,
                   T, N, D, stride_xt, k_chunk, bias, threshold, max_active,
                   HAS_BIAS_VEC: tl.constexpr, WRITE_GT: tl.constexpr, MU_MMA: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j) sums K-chunk j (k_chunk columns of d) of the logits and mu of token block i. With
    SPLIT_K > 1 each writes its partial sums to part [SPLIT_K, T, BLOCK_N + 1] (mu in the last column) and
    bumps token block i's arrival counter; the last to arrive adds the chunks in chunk order (the result does
    not depend on which program arrives last), re-zeroes the counter (CUDA graphs) and finishes the block.

    MU_MMA (bf16 x and router): mu rides in the tensor-core product as three more rows of the router tile,
    wsplit [3, d] = wbar split into bf16 parts (hi + mid + lo = wbar to fp32 precision; their products with
    bf16 x are exact in fp32), in logit columns N .. N+2 (BLOCK_N >= N + 3). Otherwise mu is a CUDA-core
    row sum per K step, which took about half of the launch (H200, 1.2b T=4096: 38.0 µs with it, 21.4 without,
    results/h200/probe_router_mu.json)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    ts = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    ns64 = ns.to(tl.int64)

    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    mu = tl.zeros([BLOCK_T], dtype=tl.float32)
    k_lo = pid_k * k_chunk
    for k0 in range(k_lo, k_lo + k_chunk, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        if MU_MMA:  # rows N .. N+2 of the tile come from wsplit: one load from two bases
            rows = tl.where(nmask, wr_ptr + ns64 * D, wsplit_ptr + (ns64 - N) * D)
            w = tl.load(rows[:, None] + ks[None, :], mask=(ns < N + 3)[:, None] & kmask[None, :], other=0.0)
            acc += router_dot(x, w)
        else:
            w = tl.load(wr_ptr + ns64[:, None] * D + ks[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0)
            acc += router_dot(x, w)
            wbar = tl.load(wbar_ptr + ks, mask=kmask, other=0.0)
            mu += tl.sum(x.to(tl.float32) * wbar[None, :], axis=1)

    if SPLIT_K == 1:
        if MU_MMA:
            mu = _mu_columns(acc, ns, N)
        _finish(acc, mu, ts, ts64, tmask, ns, ns64, nmask, bias_ptr, g_ptr, gt_ptr, mu_ptr, T, N, bias, threshold,
                max_active, HAS_BIAS_VEC, WRITE_GT, BLOCK_T, BLOCK_N)
    else:
        row = BLOCK_N + 1
        part = part_ptr + (pid_k * T + ts64) * row
        tl.store(part[:, None] + ns[None, :], acc, mask=tmask[:, None])
        tl.store(part + BLOCK_N, mu, mask=tmask)
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            mu = tl.zeros([BLOCK_T], dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):
                part = part_ptr + (j * T + ts64) * row
                acc += tl.load(part[:, None] + ns[None, :], mask=tmask[:, None], other=0.0, cache_modifier=".cg")
                mu += tl.load(part + BLOCK_N, mask=tmask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter_ptr + pid, 0)
            if MU_MMA:
                mu = _mu_columns(acc, ns, N)
            _finish(acc, mu, ts, ts64, tmask, ns, ns64, nmask, bias_ptr, g_ptr, gt_ptr, mu_ptr, T, N, bias,
                    threshold, max_active, HAS_BIAS_VEC, WRITE_GT, BLOCK_T, BLOCK_N)


@triton.jit
def _mu_columns(acc, ns, N):
    """mu [BLOCK_T] = the sum of logit columns N .. N+2 (x times wbar's three bf16 parts)."""
    return tl.sum(tl.where(((ns >= N) & (ns < N + 3))[None, :], acc, 0.0), axis=1)


@triton.jit
def _finish(acc, mu, ts, ts64, tmask, ns, ns64, nmask, bias_ptr, g_ptr, gt_ptr, mu_ptr, T, N, bias, threshold,
            max_active, HAS_BIAS_VEC: tl.constexpr, WRITE_GT: tl.constexpr, BLOCK_T: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """Gates of a token block from its logits acc [BLOCK_T, BLOCK_N]: knobs, the max_active cap, stores."""
    if HAS_BIAS_VEC:
        b = tl.load(bias_ptr + ns, mask=nmask, other=0.0)[None, :]
    else:
        b = bias
    g = gate_knobs(acc, b, threshold)
    g = tl.where(nmask[None, :], g, 0.0)
    if max_active > 0:
        # Keep the max_active largest gates per token, among equal gates the lower expert index first: as many
        # rounds of a row-wise max (keep the next) or min (drop the last) as the smaller of the two sides needs.
        excess = tl.sum((g > 0).to(tl.int32), axis=1) - max_active
        rounds = tl.max(excess, axis=0)
        if rounds > max_active:
            work = tl.where(nmask[None, :], g, -1.0)
            keep = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.int32)
            for _ in range(0, max_active):
                top = tl.max(work, axis=1)
                first = tl.min(tl.where(work == top[:, None], ns[None, :], BLOCK_N), axis=1)
                hit = ns[None, :] == first[:, None]
                keep = tl.where(hit, 1, keep)
                work = tl.where(hit, -2.0, work)
            g = tl.where(keep > 0, g, 0.0)
        elif rounds > 0:
            work = tl.where(g > 0, g, float("inf"))
            for i in range(0, rounds):
                low = tl.min(work, axis=1)
                last = tl.max(tl.where(work == low[:, None], ns[None, :], -1), axis=1)
                hit = (ns[None, :] == last[:, None]) & (i < excess)[:, None]
                g = tl.where(hit, 0.0, g)
                work = tl.where(hit, float("inf"), work)
    out_mask = tmask[:, None] & nmask[None, :]
    tl.store(g_ptr + ts64[:, None] * N + ns[None, :], g, mask=out_mask)
    if WRITE_GT:
        tl.store(gt_ptr + ns64[None, :] * T + ts[:, None], g, mask=out_mask)
    tl.store(mu_ptr + ts, mu, mask=tmask)
