"""Decode and small batches (T <= SMALL_BATCH_MAX): two launches over the union of the batch's active experts.

Both launches are bound by latency, not bytes or FLOPs, so each program issues its weight loads in as few
rounds as it can. With max_active set, the gates come from the router kernel (a third launch) because the
top-k needs every logit of a token at once.

`_up_kernel`, one program per (expert, block of ROWS rows of its up-projection) plus the shared expert's row
blocks (whose gate and up columns go to hs raw; the down kernels apply silu). An expert program computes its
own router logits and mu = x.wbar (a d-long dot: no router launch) and writes the raw up-projection
h [T, ROWS] in fp32 when some token activates the expert. Splitting experts into DE/ROWS row blocks keeps
~N/5 * DE/ROWS programs busy at T=1 instead of ~N/5 (SPEC §5). The NormSiLU needs all DE rows of an expert,
so it runs in the down kernels. Decode (a few tokens) multiplies in registers: the logit first, one round of
loads, then the whole [ROWS, d] slab in one more round only for an active expert. Larger batches use tensor
cores in a pipelined K loop (USE_DOT) that carries the logit and mu along (no serial prologue; every slab is
read, most experts are active for some token anyway).

`_decode_down_kernel` (a few tokens, register FMAs), one program per block of BLOCK_D output features, which
it owns for every active expert, so there is no cross-program reduction: it compacts the active experts
from the gates in registers (cumsum, no host sync), applies NormSiLU + the scaled gate to their h,
multiplies by the [BLOCK_D, SLOTS, DE] gather of w_down (rows of 2*DE contiguous bytes in the canonical
layout), adds the shared expert and writes y.

`_union_down_kernel` (tensor cores), one program per (block of BLOCK_D output features, expert; an expert no
token activates skips the work, no compaction needed): NormSiLU of its expert's h, then [T, DE] @ the
expert's [BLOCK_D, DE] block of w_down^T, added into an fp32 accumulator with atomics; the last program of a
feature block to arrive (an arrival counter) adds the shared expert, writes y and re-zeroes the accumulator
and the counter (so CUDA graphs replay it). Many small independent programs instead of a long loop each: at
these sizes the loop's round trips set the time. The order of the atomic adds varies, so results can
differ between runs in the last bits of fp32.
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, norm_silu_gate, router_dot


@triton.jit
def _rows_times_x(x_ptr, w_ptr, row0, row_end, T, D, stride_xt,
                  USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """x[:T] @ w[row0:row0+ROWS, :]^T -> [BLOCK_T, ROWS] fp32 (rows >= row_end and tokens >= T read as 0).

    Without a dot, BLOCK_K covers d (one iteration): the slab is loaded once and reused for every token."""
    h, _, _ = _rows_and_router(x_ptr, w_ptr, x_ptr, x_ptr, 0, row0, row_end, T, D, stride_xt, False, USE_DOT, PREC,
                               BLOCK_T, ROWS, BLOCK_K)
    return h


@triton.jit
def _rows_and_router(x_ptr, w_ptr, wr_ptr, wbar_ptr, e64, row0, row_end, T, D, stride_xt, ROUTER: tl.constexpr,
                     USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(h, r, mu): h = x[:T] @ w[row0:row0+ROWS, :]^T [BLOCK_T, ROWS] fp32 and, with ROUTER (tensor cores only),
    expert e's router logits r [BLOCK_T] and mu = x.wbar [BLOCK_T] from the same tiles of x in the same K loop
    (r and mu are zeros without ROUTER)."""
    ts = tl.arange(0, BLOCK_T)
    ts64 = ts.to(tl.int64)
    rs = row0 + tl.arange(0, ROWS)
    rmask = rs < row_end
    rs64 = rs.to(tl.int64)
    r16 = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
    racc = tl.zeros([BLOCK_T, 16], dtype=tl.float32)
    mu = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        w = tl.load(w_ptr + rs64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :],
                        mask=(ts < T)[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
            if ROUTER:  # a [16, BLOCK_K] router tile whose row 0 is w_router[e]
                wr = tl.load(wr_ptr + e64 * D + r16[:, None] * 0 + ks[None, :],
                             mask=(r16 == 0)[:, None] & kmask[None, :], other=0.0)
                racc += router_dot(x, wr)
                mu += tl.sum(x.to(tl.float32) * tl.load(wbar_ptr + ks, mask=kmask, other=0.0)[None, :], axis=1)
        else:
            wf = w.to(tl.float32)
            for t in tl.static_range(BLOCK_T):
                xt = tl.load(x_ptr + t * tl.cast(stride_xt, tl.int64) + ks, mask=kmask & (ks * 0 + t < T), other=0.0)
                ht = tl.sum(wf * xt.to(tl.float32)[None, :], axis=1)
                acc = tl.where(ts[:, None] == t, acc + ht[None, :], acc)
    return acc, tl.sum(racc, axis=1), mu


@triton.jit
def _shared_rows(x_ptr, wsg_ptr, wsu_ptr, hs_ptr, row0, T, D, DS, stride_xt,
                 USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The shared expert's gate and up pre-activations, hs[:, row0:row0+ROWS] and hs[:, DS+row0:DS+row0+ROWS]
    (fp32; the down kernels apply silu)."""
    ts = tl.arange(0, BLOCK_T)
    gate = _rows_times_x(x_ptr, wsg_ptr, row0, DS, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
    up = _rows_times_x(x_ptr, wsu_ptr, row0, DS, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
    cols = row0 + tl.arange(0, ROWS)
    out = hs_ptr + ts.to(tl.int64)[:, None] * (2 * DS) + cols[None, :]
    mask = (ts < T)[:, None] & (cols < DS)[None, :]
    tl.store(out, gate, mask=mask)
    tl.store(out + DS, up, mask=mask)


@triton.jit
def _gate_of(r, e, bias_ptr, bias, threshold, tmask, HAS_BIAS_VEC: tl.constexpr):
    """Gates of expert e from its router logits r [BLOCK_T] (knobs applied; 0 for padded tokens)."""
    if HAS_BIAS_VEC:
        b = tl.load(bias_ptr + e)
    else:
        b = bias
    return tl.where(tmask, gate_knobs(r, b, threshold), 0.0)


@triton.jit
def _shared_down_inputs(hs_ptr, wsd_ptr, ts64, tmask, cols64, cmask, DS, BLOCK_DS: tl.constexpr):
    """The shared expert's hidden activations silu(gate) * up [BLOCK_T, BLOCK_DS] (fp32) and the
    [BLOCK_D, BLOCK_DS] block of ws_down for the program's output features. They do not depend on the gates,
    so the down kernels issue these loads first, overlapping the compaction's."""
    ss = tl.arange(0, BLOCK_DS)
    smask = ss < DS
    mask = tmask[:, None] & smask[None, :]
    ptrs = hs_ptr + ts64[:, None] * (2 * DS) + ss[None, :]
    gate = tl.load(ptrs, mask=mask, other=0.0)
    up = tl.load(ptrs + DS, mask=mask, other=0.0)
    ws = tl.load(wsd_ptr + cols64[:, None] * DS + ss[None, :], mask=cmask[:, None] & smask[None, :], other=0.0)
    return gate * tl.sigmoid(gate) * up, ws


@triton.jit
def _active_experts(g_ptr, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """(active [BLOCK_N], position among the active [BLOCK_N], count): the union over the T tokens."""
    ts = tl.arange(0, BLOCK_T)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    gates = tl.load(g_ptr + ts.to(tl.int64)[:, None] * N + ns[None, :], mask=(ts < T)[:, None] & nmask[None, :],
                    other=0.0)
    active = (tl.max(gates, axis=0) > 0) & nmask
    return active, tl.cumsum(active.to(tl.int32), axis=0) - 1, tl.sum(active.to(tl.int32), axis=0)


@triton.jit
def _slot_ids(active, pos, slots, BLOCK_N: tl.constexpr):
    """Expert id held by each slot (0 for slots past the count; callers mask them)."""
    ns = tl.arange(0, BLOCK_N)
    return tl.sum(tl.where(active[None, :] & (pos[None, :] == slots[:, None]), ns[None, :], 0), axis=1)


@triton.jit
def _router_logit_and_mu(x_ptr, wr_ptr, wbar_ptr, e64, T, D, stride_xt, BLOCK_T: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """(r, mu) [BLOCK_T]: the fp32 router logits of expert e and the global mean mu = x.wbar, multiplied in
    registers; BLOCK_K covers d, so the loop is one round of loads."""
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    acc = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    mu = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += x * tl.load(wr_ptr + e64 * D + ks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        mu += tl.sum(x * tl.load(wbar_ptr + ks, mask=kmask, other=0.0)[None, :], axis=1)
    return tl.sum(acc, axis=1), mu


@triton.jit
def _write_gates_and_mu(g_ptr, mu_ptr, g, mu, e, N, pid, RB: tl.constexpr, BLOCK_T: tl.constexpr, T):
    """The first row block of each expert writes its gates, program 0 writes mu (every program computed both)."""
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    if pid % RB == 0:
        tl.store(g_ptr + ts.to(tl.int64) * N + e, g, mask=tmask)
    if pid == 0:
        tl.store(mu_ptr + ts, mu, mask=tmask)


@triton.jit
def _up_kernel(x_ptr, wr_ptr, wup_ptr, wsg_ptr, wsu_ptr, wbar_ptr, bias_ptr, g_ptr, h_ptr, hs_ptr, mu_ptr,
               T, N, D, DS, stride_xt, bias, threshold,
               DE: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_BIAS_VEC: tl.constexpr, USE_DOT: tl.constexpr,
               PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_KR: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    RB: tl.constexpr = DE // ROWS
    NDE = N * DE
    if pid < N * RB:
        e = pid // RB
        row0 = e * DE + (pid % RB) * ROWS
        cols = row0 + tl.arange(0, ROWS)
        h_out = h_ptr + ts64[:, None] * NDE + cols[None, :]
        if GATES_GIVEN:  # the router kernel wrote the gates and mu
            g = tl.load(g_ptr + ts64 * N + e, mask=tmask, other=0.0)
            if tl.max(g, axis=0) > 0:
                h = _rows_times_x(x_ptr, wup_ptr, row0, NDE, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
                tl.store(h_out, h, mask=tmask[:, None])
        elif USE_DOT:
            # Several tokens: most experts are active for some token, so the logits and mu ride along in the
            # up-projection's pipelined K loop instead of a dependent loop of their own before it.
            h, r, mu = _rows_and_router(x_ptr, wup_ptr, wr_ptr, wbar_ptr, e.to(tl.int64), row0, NDE, T, D,
                                        stride_xt, True, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
            g = _gate_of(r, e, bias_ptr, bias, threshold, tmask, HAS_BIAS_VEC)
            _write_gates_and_mu(g_ptr, mu_ptr, g, mu, e, N, pid, RB, BLOCK_T, T)
            if tl.max(g, axis=0) > 0:
                tl.store(h_out, h, mask=tmask[:, None])
        else:
            # Decode: the logit first (one round of loads), so inactive experts read none of their slab.
            r, mu = _router_logit_and_mu(x_ptr, wr_ptr, wbar_ptr, e.to(tl.int64), T, D, stride_xt, BLOCK_T,
                                         BLOCK_KR)
            g = _gate_of(r, e, bias_ptr, bias, threshold, tmask, HAS_BIAS_VEC)
            _write_gates_and_mu(g_ptr, mu_ptr, g, mu, e, N, pid, RB, BLOCK_T, T)
            if tl.max(g, axis=0) > 0:
                h = _rows_times_x(x_ptr, wup_ptr, row0, NDE, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
                tl.store(h_out, h, mask=tmask[:, None])
    else:
        _shared_rows(x_ptr, wsg_ptr, wsu_ptr, hs_ptr, (pid - N * RB) * ROWS, T, D, DS, stride_xt, USE_DOT, PREC,
                     BLOCK_T, ROWS, BLOCK_K)


@triton.jit
def _decode_down_kernel(h_ptr, hs_ptr, mu_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr, y_ptr,
                        T, N, D, DS, stride_yt, eps,
                        DE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        SLOTS: tl.constexpr, BLOCK_DS: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    NDE = tl.cast(N, tl.int64) * DE
    ks = tl.arange(0, DE)

    hs, ws = _shared_down_inputs(hs_ptr, wsd_ptr, ts64, tmask, cols64, cmask, DS, BLOCK_DS)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t in tl.static_range(BLOCK_T):
        hs_t = tl.sum(tl.where(ts[:, None] == t, hs, 0.0), axis=0)
        acc = tl.where(ts[:, None] == t, acc + tl.sum(ws.to(tl.float32) * hs_t[None, :], axis=1)[None, :], acc)

    active, pos, count = _active_experts(g_ptr, T, N, BLOCK_T, BLOCK_N)
    gamma = tl.load(gamma_ptr + ks).to(tl.float32)
    for c0 in range(0, count, SLOTS):
        slots = c0 + tl.arange(0, SLOTS)
        svalid = slots < count
        ids = _slot_ids(active, pos, slots, BLOCK_N)
        ids64 = ids.to(tl.int64)
        scale = tl.load(scale_ptr + ids, mask=svalid, other=0.0).to(tl.float32)
        w = tl.load(wd_ptr + cols64[:, None, None] * NDE + (ids64 * DE)[None, :, None] + ks[None, None, :],
                    mask=cmask[:, None, None] & svalid[None, :, None], other=0.0).to(tl.float32)
        for t in tl.static_range(BLOCK_T):
            live = svalid & (slots * 0 + t < T)
            gs_t = tl.load(g_ptr + t * N + ids, mask=live, other=0.0) * scale
            h_t = tl.load(h_ptr + t * NDE + (ids64 * DE)[:, None] + ks[None, :], mask=live[:, None], other=0.0)
            mu_t = tl.load(mu_ptr + t + slots * 0, mask=live, other=0.0)
            a_t = norm_silu_gate(h_t, mu_t, gamma, gs_t, eps, DE)
            y_t = tl.sum(tl.sum(w * a_t[None, :, :], axis=2), axis=1)
            acc = tl.where(ts[:, None] == t, acc + y_t[None, :], acc)
    tl.store(y_ptr + ts64[:, None] * stride_yt + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _union_down_kernel(h_ptr, hs_ptr, mu_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr, acc_ptr, counter_ptr,
                       y_ptr, T, N, D, DS, stride_yt, eps,
                       DE: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DS: tl.constexpr):
    pid_d = tl.program_id(0)
    e = tl.program_id(1)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    out_mask = tmask[:, None] & cmask[None, :]
    acc_off = ts64[:, None] * D + cols[None, :]
    e64 = e.to(tl.int64)
    g = tl.load(g_ptr + ts64 * N + e64, mask=tmask, other=0.0)
    if tl.max(g, axis=0) > 0:
        ks = e64 * DE + tl.arange(0, DE)
        w = tl.load(wd_ptr + cols64[:, None] * (N * DE) + ks[None, :], mask=cmask[:, None], other=0.0)
        h = tl.load(h_ptr + ts64[:, None] * (N * DE) + ks[None, :], mask=tmask[:, None], other=0.0)
        gs = g * tl.load(scale_ptr + e64).to(tl.float32)
        a = norm_silu_gate(h, tl.load(mu_ptr + ts, mask=tmask, other=0.0),
                           tl.load(gamma_ptr + tl.arange(0, DE)).to(tl.float32), gs, eps, DE).to(w.dtype)
        tl.atomic_add(acc_ptr + acc_off, tl.dot(a, tl.trans(w), input_precision=PREC), mask=out_mask, sem="relaxed")
    # Every expert's program arrives, active or not; the last of a block of features to arrive adds the shared
    # expert, writes y and leaves the accumulator and its counter at zero for the next call (CUDA graphs).
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + pid_d, 1, sem="acq_rel") == N - 1:
        hs, ws = _shared_down_inputs(hs_ptr, wsd_ptr, ts64, tmask, cols64, cmask, DS, BLOCK_DS)
        out = tl.dot(hs.to(ws.dtype), tl.trans(ws), input_precision=PREC)
        out += tl.load(acc_ptr + acc_off, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + ts64[:, None] * stride_yt + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=out_mask)
        tl.store(acc_ptr + acc_off, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), mask=out_mask)
        tl.atomic_xchg(counter_ptr + pid_d, 0)
