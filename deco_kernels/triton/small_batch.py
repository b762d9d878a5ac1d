"""Decode and small batches (T <= SMALL_BATCH_MAX): two launches over the union of the batch's active experts.

Launch 1, `_union_up_kernel`, one program per (expert, block of BLOCK_R rows of its up-projection) plus the
shared expert's row blocks: each expert program computes its own router logits for all tokens (a d-long dot,
so no router launch is needed), exits at once when no token activates the expert, and otherwise writes the
raw up-projection h [T, BLOCK_R] of its rows in fp32. The shared programs write silu(x Wg^T) * (x Wu^T) and
the first one the global mean mu = x.wbar. Splitting each expert into row blocks keeps ~N/5 * DE/BLOCK_R
programs busy at T=1 instead of ~N/5 (see SPEC §5: parallelism).

Launch 2, `_union_down_kernel`, one program per (block of BLOCK_D output features, group of GROUP active
experts): each compacts the active experts from the gates in registers (cumsum, no host sync), applies
NormSiLU + the scaled gate to its group's h, multiplies by the matching [BLOCK_D, GROUP*DE] gather of w_down
(rows of 2*DE contiguous bytes in the canonical layout) and stores an fp32 partial. The last program of a
feature block to finish (an atomic counter that re-arms itself, so CUDA graphs replay it) sums the partials in
group order, adds the shared expert's down-projection and writes y: deterministic, and one round of loads
per program instead of a chain of per-expert round trips.

With max_active set, the gates come from the router kernel (a third launch) because the top-k needs every
logit of a token.
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, norm_silu_gate


@triton.jit
def _rowblock_matmul(x_ptr, w_ptr, row0, row_end, ts64, tmask, D, stride_xt, stride_w,
                     PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[ts, :] @ w[row0:row0+BLOCK_R, :]^T -> [BLOCK_T, BLOCK_R] fp32 (rows >= row_end read as 0)."""
    rs = row0 + tl.arange(0, BLOCK_R)
    rmask = rs < row_end
    rs64 = rs.to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rs64[:, None] * stride_w + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC)
    return acc


@triton.jit
def _union_up_kernel(x_ptr, wr_ptr, wup_ptr, wsg_ptr, wsu_ptr, wbar_ptr, bias_ptr, g_ptr, h_ptr, hs_ptr, mu_ptr,
                     T, N, D, DS, stride_xt, bias, threshold,
                     DE: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_BIAS_VEC: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_TR: tl.constexpr, BLOCK_KR: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    RB: tl.constexpr = DE // BLOCK_R
    NDE = N * DE
    if pid < N * RB:
        e = pid // RB
        row0 = e * DE + (pid % RB) * BLOCK_R
        if GATES_GIVEN:
            g = tl.load(g_ptr + ts64 * N + e, mask=tmask, other=0.0)
        else:
            # Router logits of expert e for every token, in as few round trips as possible: one, when
            # BLOCK_TR * BLOCK_KR covers [T, d] (decode), since loops without a dot are not pipelined.
            trs = tl.arange(0, BLOCK_TR)
            trmask = trs < T
            r = tl.zeros([BLOCK_TR, BLOCK_KR], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_KR):
                ks = k0 + tl.arange(0, BLOCK_KR)
                kmask = ks < D
                x = tl.load(x_ptr + trs.to(tl.int64)[:, None] * stride_xt + ks[None, :],
                            mask=trmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                w = tl.load(wr_ptr + e.to(tl.int64) * D + ks, mask=kmask, other=0.0).to(tl.float32)
                r += x * w[None, :]
            if HAS_BIAS_VEC:
                b = tl.load(bias_ptr + e)
            else:
                b = bias
            g = tl.where(trmask, gate_knobs(tl.sum(r, axis=1), b, threshold), 0.0)
            if pid % RB == 0:
                tl.store(g_ptr + trs.to(tl.int64) * N + e, g, mask=trmask)
        if tl.max(g, axis=0) > 0:
            h = _rowblock_matmul(x_ptr, wup_ptr, row0, NDE, ts64, tmask, D, stride_xt, D,
                                 PREC, BLOCK_T, BLOCK_R, BLOCK_K)
            cols = row0 + tl.arange(0, BLOCK_R)
            tl.store(h_ptr + ts64[:, None] * NDE + cols[None, :], h, mask=tmask[:, None])
    else:
        row0 = (pid - N * RB) * BLOCK_R
        gate = _rowblock_matmul(x_ptr, wsg_ptr, row0, DS, ts64, tmask, D, stride_xt, D,
                                PREC, BLOCK_T, BLOCK_R, BLOCK_K)
        up = _rowblock_matmul(x_ptr, wsu_ptr, row0, DS, ts64, tmask, D, stride_xt, D, PREC, BLOCK_T, BLOCK_R, BLOCK_K)
        cols = row0 + tl.arange(0, BLOCK_R)
        tl.store(hs_ptr + ts64[:, None] * DS + cols[None, :], gate * tl.sigmoid(gate) * up,
                 mask=tmask[:, None] & (cols < DS)[None, :])
        if not GATES_GIVEN:  # otherwise the router kernel wrote mu already
            if row0 == 0:
                mu = tl.zeros([BLOCK_T], dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    kmask = ks < D
                    x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :],
                                mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                    mu += tl.sum(x * tl.load(wbar_ptr + ks, mask=kmask, other=0.0)[None, :], axis=1)
                tl.store(mu_ptr + ts, mu, mask=tmask)


@triton.jit
def _union_down_kernel(h_ptr, hs_ptr, mu_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr, part_ptr, counter_ptr,
                       y_ptr, T, N, D, DS, stride_yt, eps,
                       DE: tl.constexpr, BLOCK_DS: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    NDE = N * DE
    ks = tl.arange(0, DE)

    # Compact the union of active experts in registers: slot s holds the s-th active expert.
    gates = tl.load(g_ptr + ts64[:, None] * N + ns[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
    active = (tl.max(gates, axis=0) > 0) & nmask
    pos = tl.cumsum(active.to(tl.int32), axis=0) - 1
    count = tl.sum(active.to(tl.int32), axis=0)
    groups = tl.maximum(tl.cdiv(count, GROUP), 1)  # group 0 runs even with no active expert: it writes y
    if grp < groups:
        # This program's GROUP slots, all loads issued together (no chain of per-expert round trips).
        slots = grp * GROUP + tl.arange(0, GROUP)
        svalid = slots < count
        ids = tl.sum(tl.where(active[None, :] & (pos[None, :] == slots[:, None]), ns[None, :], 0), axis=1)
        tg_mask = tmask[:, None] & svalid[None, :]
        gs = tl.load(g_ptr + ts64[:, None] * N + ids[None, :], mask=tg_mask, other=0.0) \
            * tl.load(scale_ptr + ids, mask=svalid, other=0.0).to(tl.float32)[None, :]
        h = tl.load(h_ptr + ts64[:, None, None] * NDE + (ids * DE)[None, :, None] + ks[None, None, :],
                    mask=tg_mask[:, :, None], other=0.0)
        mu = tl.load(mu_ptr + ts, mask=tmask, other=0.0)
        gamma = tl.load(gamma_ptr + ks).to(tl.float32)
        a = norm_silu_gate(tl.reshape(h, [BLOCK_T * GROUP, DE]),
                           tl.reshape(tl.broadcast_to(mu[:, None], [BLOCK_T, GROUP]), [BLOCK_T * GROUP]),
                           gamma, tl.reshape(gs, [BLOCK_T * GROUP]), eps, DE)
        wcols = tl.reshape((ids * DE)[:, None] + ks[None, :], [GROUP * DE])
        wvalid = tl.reshape(svalid[:, None] & (ks[None, :] < DE), [GROUP * DE])
        w = tl.load(wd_ptr + cols64[:, None] * NDE + wcols[None, :], mask=cmask[:, None] & wvalid[None, :],
                    other=0.0)
        part = tl.dot(tl.reshape(a, [BLOCK_T, GROUP * DE]).to(w.dtype), tl.trans(w), input_precision=PREC)
        out_off = ts64[:, None] * D + cols[None, :]
        out_mask = tmask[:, None] & cmask[None, :]
        tl.store(part_ptr + grp.to(tl.int64) * T * D + out_off, part, mask=out_mask)
        # The last group to finish this block of features sums the partials in group order (deterministic),
        # adds the shared expert and writes y; then it re-arms the counter for the next call.
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + pid_d, 1, sem="acq_rel")
        if done == groups - 1:
            ss = tl.arange(0, BLOCK_DS)
            smask = ss < DS
            hs = tl.load(hs_ptr + ts64[:, None] * DS + ss[None, :], mask=tmask[:, None] & smask[None, :],
                         other=0.0)
            ws = tl.load(wsd_ptr + cols64[:, None] * DS + ss[None, :], mask=cmask[:, None] & smask[None, :],
                         other=0.0)
            acc = tl.dot(hs.to(ws.dtype), tl.trans(ws), input_precision=PREC)
            for gi in range(0, groups):
                acc += tl.load(part_ptr + gi * T * D + out_off, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + ts64[:, None] * stride_yt + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_d, 0)
