"""Decode and small batches (T <= SMALL_BATCH_MAX): two launches over the union of the batch's active experts.

At these sizes the layer is bound by latency, not by bytes or FLOPs: each kernel is built so that a program
issues ALL of its weight loads in one round (one wide [rows, d] slab, no loop-carried chain of small loads)
and the whole path has exactly two dependent global round trips per kernel.

Launch 1, `_union_up_kernel`, one program per (expert, block of ROWS rows of its up-projection) plus the
shared expert's row blocks. An expert program computes its own router logits for all tokens (a d-long dot, so
no router launch is needed), exits at once when no token activates the expert, and otherwise loads its
[ROWS, d] slab of w_up and writes the raw up-projection h [T, ROWS] in fp32. Shared programs write
silu(x Wg^T) * (x Wu^T) and the first one also the global mean mu = x.wbar. Splitting each expert into
DE/ROWS row blocks keeps ~N/5 * DE/ROWS programs busy at T=1 instead of ~N/5 (SPEC §5: parallelism). The
NormSiLU needs all DE rows of an expert, so it runs in launch 2.

Launch 2, `_union_down_kernel`, one program per block of BLOCK_D output features. It owns those features for
every token and every active expert, so there is no cross-program reduction: it compacts the active experts
from the gates in registers (cumsum, no host sync), then per chunk of SLOTS experts gathers their h, applies
NormSiLU + the scaled gate, multiplies by the [BLOCK_D, SLOTS, DE] gather of w_down (rows of 2*DE
contiguous bytes in the canonical layout), adds the shared expert's down-projection and writes y.

Up to a few tokens (USE_DOT=False) the products are register FMAs over the whole slab, one token at a time;
from 16 padded tokens on, tensor cores (tl.dot) with a K loop. With max_active set, the gates come from the
router kernel (a third launch) because the top-k needs every logit of a token.
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, norm_silu_gate


@triton.jit
def _rows_times_x(x_ptr, w_ptr, row0, row_end, T, D, stride_xt,
                  USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """x[:T] @ w[row0:row0+ROWS, :]^T -> [BLOCK_T, ROWS] fp32 (rows >= row_end and tokens >= T read as 0).

    Without a dot, BLOCK_K covers d (one iteration): the slab is loaded once and reused for every token."""
    ts = tl.arange(0, BLOCK_T)
    ts64 = ts.to(tl.int64)
    rs = row0 + tl.arange(0, ROWS)
    rmask = rs < row_end
    rs64 = rs.to(tl.int64)
    acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        w = tl.load(w_ptr + rs64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :],
                        mask=(ts < T)[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        else:
            wf = w.to(tl.float32)
            for t in tl.static_range(BLOCK_T):
                xt = tl.load(x_ptr + t * stride_xt + ks, mask=kmask & (ks * 0 + t < T), other=0.0)
                ht = tl.sum(wf * xt.to(tl.float32)[None, :], axis=1)
                acc = tl.where(ts[:, None] == t, acc + ht[None, :], acc)
    return acc


@triton.jit
def _union_up_kernel(x_ptr, wr_ptr, wup_ptr, wsg_ptr, wsu_ptr, wbar_ptr, bias_ptr, g_ptr, h_ptr, hs_ptr, mu_ptr,
                     T, N, D, DS, stride_xt, bias, threshold,
                     DE: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_BIAS_VEC: tl.constexpr,
                     USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_KR: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    RB: tl.constexpr = DE // ROWS
    NDE = N * DE
    if pid < N * RB:
        e = pid // RB
        row0 = e * DE + (pid % RB) * ROWS
        if GATES_GIVEN:
            g = tl.load(g_ptr + ts64 * N + e, mask=tmask, other=0.0)
        else:
            # Router logits of expert e for every token: one round of loads when BLOCK_KR covers d.
            r = tl.zeros([BLOCK_T, BLOCK_KR], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_KR):
                ks = k0 + tl.arange(0, BLOCK_KR)
                kmask = ks < D
                x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                            other=0.0).to(tl.float32)
                w = tl.load(wr_ptr + e.to(tl.int64) * D + ks, mask=kmask, other=0.0).to(tl.float32)
                r += x * w[None, :]
            if HAS_BIAS_VEC:
                b = tl.load(bias_ptr + e)
            else:
                b = bias
            g = tl.where(tmask, gate_knobs(tl.sum(r, axis=1), b, threshold), 0.0)
            if pid % RB == 0:
                tl.store(g_ptr + ts64 * N + e, g, mask=tmask)
        if tl.max(g, axis=0) > 0:
            h = _rows_times_x(x_ptr, wup_ptr, row0, NDE, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
            cols = row0 + tl.arange(0, ROWS)
            tl.store(h_ptr + ts64[:, None] * NDE + cols[None, :], h, mask=tmask[:, None])
    else:
        row0 = (pid - N * RB) * ROWS
        gate = _rows_times_x(x_ptr, wsg_ptr, row0, DS, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
        up = _rows_times_x(x_ptr, wsu_ptr, row0, DS, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
        cols = row0 + tl.arange(0, ROWS)
        tl.store(hs_ptr + ts64[:, None] * DS + cols[None, :], gate * tl.sigmoid(gate) * up,
                 mask=tmask[:, None] & (cols < DS)[None, :])
        if not GATES_GIVEN:  # otherwise the router kernel wrote mu already
            if row0 == 0:
                mu = tl.zeros([BLOCK_T], dtype=tl.float32)
                for k0 in range(0, D, BLOCK_KR):
                    ks = k0 + tl.arange(0, BLOCK_KR)
                    kmask = ks < D
                    x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :],
                                mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
                    mu += tl.sum(x * tl.load(wbar_ptr + ks, mask=kmask, other=0.0)[None, :], axis=1)
                tl.store(mu_ptr + ts, mu, mask=tmask)


@triton.jit
def _union_down_kernel(h_ptr, hs_ptr, mu_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr, y_ptr,
                       T, N, D, DS, stride_yt, eps,
                       DE: tl.constexpr, USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SLOTS: tl.constexpr, BLOCK_DS: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    NDE = N * DE
    ks = tl.arange(0, DE)

    # The shared expert first: its loads do not depend on the gates, so they overlap the compaction's.
    ss = tl.arange(0, BLOCK_DS)
    smask = ss < DS
    hs = tl.load(hs_ptr + ts64[:, None] * DS + ss[None, :], mask=tmask[:, None] & smask[None, :], other=0.0)
    ws = tl.load(wsd_ptr + cols64[:, None] * DS + ss[None, :], mask=cmask[:, None] & smask[None, :], other=0.0)
    if USE_DOT:
        acc = tl.dot(hs.to(ws.dtype), tl.trans(ws), input_precision=PREC)
    else:
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for t in tl.static_range(BLOCK_T):
            hst = tl.sum(tl.where(ts[:, None] == t, hs, 0.0), axis=0)
            acc = tl.where(ts[:, None] == t, acc + tl.sum(ws.to(tl.float32) * hst[None, :], axis=1)[None, :], acc)

    # Compact the union of active experts in registers: slot s holds the s-th active expert.
    gates = tl.load(g_ptr + ts64[:, None] * N + ns[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
    active = (tl.max(gates, axis=0) > 0) & nmask
    pos = tl.cumsum(active.to(tl.int32), axis=0) - 1
    count = tl.sum(active.to(tl.int32), axis=0)
    gamma = tl.load(gamma_ptr + ks).to(tl.float32)
    for c0 in range(0, count, SLOTS):
        slots = c0 + tl.arange(0, SLOTS)
        svalid = slots < count
        ids = tl.sum(tl.where(active[None, :] & (pos[None, :] == slots[:, None]), ns[None, :], 0), axis=1)
        ids64 = ids.to(tl.int64)
        scale = tl.load(scale_ptr + ids, mask=svalid, other=0.0).to(tl.float32)
        w = tl.load(wd_ptr + cols64[:, None, None] * NDE + (ids64 * DE)[None, :, None] + ks[None, None, :],
                    mask=cmask[:, None, None] & svalid[None, :, None], other=0.0)
        if USE_DOT:
            tg_mask = tmask[:, None] & svalid[None, :]
            gs = tl.load(g_ptr + ts64[:, None] * N + ids[None, :], mask=tg_mask, other=0.0) * scale[None, :]
            h = tl.load(h_ptr + ts64[:, None, None] * NDE + (ids64 * DE)[None, :, None] + ks[None, None, :],
                        mask=tg_mask[:, :, None], other=0.0)
            mu = tl.load(mu_ptr + ts, mask=tmask, other=0.0)
            a = norm_silu_gate(tl.reshape(h, [BLOCK_T * SLOTS, DE]),
                               tl.reshape(tl.broadcast_to(mu[:, None], [BLOCK_T, SLOTS]), [BLOCK_T * SLOTS]),
                               gamma, tl.reshape(gs, [BLOCK_T * SLOTS]), eps, DE)
            acc += tl.dot(tl.reshape(a, [BLOCK_T, SLOTS * DE]).to(w.dtype),
                          tl.trans(tl.reshape(w, [BLOCK_D, SLOTS * DE])), input_precision=PREC)
        else:
            wf = w.to(tl.float32)
            for t in tl.static_range(BLOCK_T):
                live = svalid & (slots * 0 + t < T)
                gs_t = tl.load(g_ptr + t * N + ids, mask=live, other=0.0) * scale
                h_t = tl.load(h_ptr + t * NDE + (ids64 * DE)[:, None] + ks[None, :], mask=live[:, None], other=0.0)
                mu_t = tl.load(mu_ptr + t + slots * 0, mask=live, other=0.0)
                a_t = norm_silu_gate(h_t, mu_t, gamma, gs_t, eps, DE)
                y_t = tl.sum(tl.sum(wf * a_t[None, :, :], axis=2), axis=1)
                acc = tl.where(ts[:, None] == t, acc + y_t[None, :], acc)
    tl.store(y_ptr + ts64[:, None] * stride_yt + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])
