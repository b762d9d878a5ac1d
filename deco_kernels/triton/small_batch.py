"""Decode and small batches (T <= SMALL_BATCH_MAX): two launches over the union of the batch's active experts.

Both launches are bound by latency, not bytes or FLOPs (SPEC §5): the layer's weights are a few tens of MB,
so the time goes to how many programs keep loads in flight and how many dependent round trips each one runs.
With max_active set, the gates come from the router kernel (a third launch) because the top-k needs every
logit of a token at once.

Decode (T <= ffn.FMA_MAX_T, register FMAs, USE_DOT off):

`_up_kernel`, one program per (expert, block of ROWS rows of its up-projection) plus the shared expert's row
blocks. An expert program computes its router logits and mu = x.wbar first (one round of loads, no router
launch), writes its gates (the first expert program also mu), and only for an expert some token activates
loads the whole [ROWS, d] slab in one more round and writes h [T, ROWS] in fp32. Row blocks keep
~N/5 * DE/ROWS programs busy at T=1 instead of ~N/5.

`_decode_down_kernel`, one program per block of BLOCK_D output features, which it owns for every active
expert, so there is no cross-program reduction: it compacts the active experts from the gates in registers
(cumsum, no host sync), applies NormSiLU + the scaled gate to their h, multiplies by the [BLOCK_D, SLOTS, DE]
gather of w_down, adds the shared expert and writes y. On sm_90+ it is launched with programmatic dependent
launch (ffn.pdl_launch): it starts while the up kernel runs, loads its block of ws_down and gamma, and waits
(griddepcontrol.wait) before reading what the up kernel writes, so its launch hides behind the up kernel. H200,
CUDA graphs (results/h200/probe_decode_paths_pdl.json): 1.2b T=1 20.8 -> 20.4 µs, T=2 30.9 -> 30.3; 0.1b T=1
12.5 -> 11.8, T=2 17.9 -> 16.9. The same for the union down kernel below was no gain at 64 tokens and a loss at
8 (0.1b 18.3 -> 20.9 µs), so it launches plainly.

Small batches (3-64 tokens, tensor cores, USE_DOT): split-K up, expert-group down.

Measured on the H100 at 1.2b, T=8, the previous design (one up program per whole expert; one down program per
(feature block, expert)) was slower than the dense twin (55 vs 40 µs): the up kernel ran 104 programs
(0.39 waves, 6% occupancy, DRAM at 25%), the down kernel 714 short programs at 255 registers, each a chain of
dependent round trips ending in its own fp32 atomics onto the shared accumulator (at T=64 those atomics, 102
experts deep, were most of its 56 µs). Now:

`_up_kernel`, one program per (expert, row block, K-chunk of k_chunk columns, a multiple of BLOCK_K), plus
(shared expert row block, K-chunk) programs, scheduled first because they stream twice the bytes, and one mu
program per K-chunk. Each runs a pipelined tensor-core K loop over its chunk only and stores fp32 PARTIAL sums
indexed by the chunk s: the raw up-projection hp [SPLIT_K, T, N*DE], the expert's router logit
rp [SPLIT_K, T, N] (same tiles of x, one extra [16, BLOCK_K] operand), the shared expert's gate and up columns
hsp [SPLIT_K, T, 2*DS], and mu = x.wbar mup [SPLIT_K, T] (CUDA-core FMAs, in its own programs so the expert
programs stay lean). No gates, branches or atomics: SPLIT_K times more programs, each SPLIT_K times shorter,
deterministic. Every expert's slab is read (the gates are not known yet; at T >= 8 most experts are active
for some token anyway). With max_active (GATES_GIVEN) the router kernel already wrote g and mu: an expert
program loads its gates first and skips an expert no token activates.

`_union_down_kernel`, one program per (block of BLOCK_D output features, j): j = 0 is the shared expert
(launched first: it streams the most bytes), j >= 1 a group of GROUP routed experts. An expert-group program sums its
group's partial logits and mu over the chunks and applies the knobs -> gates [BLOCK_T, GROUP] (the programs
of feature block 0 write them to g, the layer's returned gates; with GATES_GIVEN it reads g and mu). Then a
plain loop over the group, which Triton software-pipelines because the w_down address depends only on the
loop index (an expert no token activates is masked off: its loads are not issued): sum the expert's SPLIT_K
partial h tiles, NormSiLU + scaled gate, tl.dot with its [BLOCK_D, DE] block of w_down into a register
accumulator [BLOCK_T, BLOCK_D]. The shared-expert program likewise sums its partial gate and up columns and
multiplies silu(gate) * up by its block of ws_down, BLOCK_S hidden columns per step. After the loop ONE fp32
atomic add of the accumulator into a shared scratch accumulator (GROUP times fewer than one per expert);
the last program of a feature block to arrive (an arrival counter) writes y and re-zeroes the accumulator
and the counter (so CUDA graphs replay it). Only the order of those fp32 atomic adds across programs varies
from run to run: results can differ between runs in the last bits of fp32.
"""
import triton
import triton.language as tl

from ._jit import gate_knobs, norm_silu_gate, router_dot, silu_mul


@triton.jit
def _rows_times_x(x_ptr, w_ptr, row0, row_end, k_lo, k_hi, T, D, stride_xt,
                  USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """x[:T, k_lo:k_hi] @ w[row0:row0+ROWS, k_lo:k_hi]^T -> [BLOCK_T, ROWS] fp32 (rows >= row_end and tokens
    >= T read as 0; w has D columns).

    Without a dot, BLOCK_K covers the columns (one iteration): the slab is loaded once and reused for every
    token."""
    h, _ = _rows_and_router(x_ptr, w_ptr, x_ptr, 0, row0, row_end, k_lo, k_hi, T, D, stride_xt, False, USE_DOT,
                            PREC, BLOCK_T, ROWS, BLOCK_K)
    return h


@triton.jit
def _rows_and_router(x_ptr, w_ptr, wr_ptr, e64, row0, row_end, k_lo, k_hi, T, D, stride_xt, ROUTER: tl.constexpr,
                     USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """(h, r) over the columns k_lo:k_hi: h = x[:T] @ w[row0:row0+ROWS]^T [BLOCK_T, ROWS] fp32 and, with ROUTER
    (tensor cores only), expert e's router logits r [BLOCK_T] from the same tiles of x in the same K loop
    (zeros without ROUTER)."""
    ts = tl.arange(0, BLOCK_T)
    ts64 = ts.to(tl.int64)
    rs = row0 + tl.arange(0, ROWS)
    rmask = rs < row_end
    rs64 = rs.to(tl.int64)
    r16 = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
    racc = tl.zeros([BLOCK_T, 16], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_hi
        w = tl.load(w_ptr + rs64[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            x = tl.load(x_ptr + ts64[:, None] * stride_xt + ks[None, :],
                        mask=(ts < T)[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PREC)
            if ROUTER:  # a [16, BLOCK_K] router tile whose row 0 is w_router[e]
                wr = tl.load(wr_ptr + e64 * D + r16[:, None] * 0 + ks[None, :],
                             mask=(r16 == 0)[:, None] & kmask[None, :], other=0.0)
                racc += router_dot(x, wr)
        else:
            wf = w.to(tl.float32)
            for t in tl.static_range(BLOCK_T):
                xt = tl.load(x_ptr + t * tl.cast(stride_xt, tl.int64) + ks, mask=kmask & (ks * 0 + t < T), other=0.0)
                ht = tl.sum(wf * xt.to(tl.float32)[None, :], axis=1)
                acc = tl.where(ts[:, None] == t, acc + ht[None, :], acc)
    return acc, tl.sum(racc, axis=1)


@triton.jit
def _x_dot_wbar(x_ptr, wbar_ptr, k_lo, k_hi, T, stride_xt, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """mu over the columns k_lo:k_hi: x[:T] . wbar [BLOCK_T] fp32 (CUDA-core FMAs; wbar is fp32)."""
    ts = tl.arange(0, BLOCK_T)
    mu = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < k_hi
        x = tl.load(x_ptr + ts.to(tl.int64)[:, None] * stride_xt + ks[None, :],
                    mask=(ts < T)[:, None] & kmask[None, :], other=0.0)
        mu += tl.sum(x.to(tl.float32) * tl.load(wbar_ptr + ks, mask=kmask, other=0.0)[None, :], axis=1)
    return mu


@triton.jit
def _shared_rows(x_ptr, wsg_ptr, wsu_ptr, hs_ptr, row0, k_lo, k_hi, T, D, DS, stride_xt,
                 USE_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The shared expert's gate and up pre-activations over the columns k_lo:k_hi, hs[:, row0:row0+ROWS] and
    hs[:, DS+row0:DS+row0+ROWS] (fp32; the down kernels apply silu)."""
    ts = tl.arange(0, BLOCK_T)
    gate = _rows_times_x(x_ptr, wsg_ptr, row0, DS, k_lo, k_hi, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS,
                         BLOCK_K)
    up = _rows_times_x(x_ptr, wsu_ptr, row0, DS, k_lo, k_hi, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
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
def _shared_down_weights(wsd_ptr, cols64, cmask, DS, BLOCK_DS: tl.constexpr):
    """The [BLOCK_D, BLOCK_DS] block of ws_down for the program's output features: loaded first, before the
    decode down kernel waits for the up kernel (PDL) and before the compaction's loads."""
    ss = tl.arange(0, BLOCK_DS)
    return tl.load(wsd_ptr + cols64[:, None] * DS + ss[None, :], mask=cmask[:, None] & (ss < DS)[None, :],
                   other=0.0)


@triton.jit
def _shared_hidden(hs_ptr, ts64, tmask, DS, BLOCK_DS: tl.constexpr):
    """The shared expert's hidden activations silu(gate) * up [BLOCK_T, BLOCK_DS] (fp32) from the up kernel's
    gate and up columns. They do not depend on the gates, so they are issued before the compaction's loads."""
    ss = tl.arange(0, BLOCK_DS)
    mask = tmask[:, None] & (ss < DS)[None, :]
    ptrs = hs_ptr + ts64[:, None] * (2 * DS) + ss[None, :]
    gate = tl.load(ptrs, mask=mask, other=0.0)
    up = tl.load(ptrs + DS, mask=mask, other=0.0)
    return silu_mul(gate, up)


@triton.jit
def _shared_expert_out(hs_ptr, wsd_ptr, ts64, tmask, cols64, cmask, T, DS, SPLIT_K: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """The shared expert's output silu(gate) * up @ ws_down^T [BLOCK_T, BLOCK_D] (fp32) for the program's
    features, its gate and up columns summed over the SPLIT_K partial buffers hs [SPLIT_K, T, 2*DS]. A loop
    over BLOCK_S hidden columns at a time (pipelined like the experts' loop): all 2 * SPLIT_K partial tiles of
    the whole width at once would not fit in registers."""
    out = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, DS, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        smask = ss < DS
        mask = tmask[:, None] & smask[None, :]
        gate = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
        up = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            ptrs = hs_ptr + (s * tl.cast(T, tl.int64) + ts64)[:, None] * (2 * DS) + ss[None, :]
            gate += tl.load(ptrs, mask=mask, other=0.0)
            up += tl.load(ptrs + DS, mask=mask, other=0.0)
        ws = tl.load(wsd_ptr + cols64[:, None] * DS + ss[None, :], mask=cmask[:, None] & smask[None, :], other=0.0)
        out += tl.dot(silu_mul(gate, up).to(ws.dtype), tl.trans(ws), input_precision=PREC)
    return out


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
def _presum_h(h_ptr, count_ptr, ts64, tmask, cols, T, NDE, SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr,
              ROWS: tl.constexpr):
    """Arrive at an expert row block's counter after storing this chunk's partial h; the last of its SPLIT_K
    programs sums the partials in chunk order (the result does not depend on who arrives last) into chunk 0's
    tile and re-zeroes the counter (CUDA graphs replay it)."""
    tl.debug_barrier()   # every thread's partial is stored before the arrival releases it
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1:
        tot = tl.zeros([BLOCK_T, ROWS], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            tot += tl.load(h_ptr + (s * tl.cast(T, tl.int64) + ts64)[:, None] * NDE + cols[None, :],
                           mask=tmask[:, None], other=0.0, cache_modifier=".cg")
        tl.store(h_ptr + ts64[:, None] * NDE + cols[None, :], tot, mask=tmask[:, None])
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _up_kernel(x_ptr, wr_ptr, wup_ptr, wsg_ptr, wsu_ptr, wbar_ptr, bias_ptr, g_ptr, h_ptr, hs_ptr, r_ptr, mu_ptr,
               count_ptr, T, N, D, DS, stride_xt, k_chunk, bias, threshold,
               DE: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_BIAS_VEC: tl.constexpr, USE_DOT: tl.constexpr,
               SPLIT_K: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_KR: tl.constexpr, PDL: tl.constexpr, PRESUM: tl.constexpr):
    """Programs, in launch order: the shared expert's (row block, K-chunk) programs, then (tensor cores without
    GATES_GIVEN) one mu program per K-chunk, then the (expert, row block, K-chunk) programs. Chunk s covers the
    columns s*k_chunk .. (s+1)*k_chunk of d; every output is a partial sum indexed by s (h [SPLIT_K, T, N*DE],
    hs [SPLIT_K, T, 2*DS], r [SPLIT_K, T, N], mu [SPLIT_K, T]). Decode (USE_DOT off) has SPLIT_K = 1 and,
    without GATES_GIVEN, writes the gates g and mu [T] itself. With PDL (decode) every program lets the decode
    down kernel launch at once (it waits for this grid before reading anything this one writes). With PRESUM
    (SPLIT_K > 1) the last of an expert row block's SPLIT_K programs to arrive (count_ptr, one int32 per row
    block, left at zero) sums its partial h tiles in chunk order into chunk 0's, so the down kernel reads one."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    RB: tl.constexpr = DE // ROWS
    NDE = N * DE
    s = pid % SPLIT_K
    k_lo = s * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, D)
    part64 = s.to(tl.int64) * T + ts64          # this chunk's rows of the partial buffers
    n_shared = tl.cdiv(DS, ROWS) * SPLIT_K
    n_mu = SPLIT_K if USE_DOT and not GATES_GIVEN else 0
    if pid < n_shared:  # first: these stream twice the bytes of an expert program
        _shared_rows(x_ptr, wsg_ptr, wsu_ptr, hs_ptr + s.to(tl.int64) * T * (2 * DS), (pid // SPLIT_K) * ROWS,
                     k_lo, k_hi, T, D, DS, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
    elif pid < n_shared + n_mu:
        tl.store(mu_ptr + part64, _x_dot_wbar(x_ptr, wbar_ptr, k_lo, k_hi, T, stride_xt, BLOCK_T, BLOCK_K),
                 mask=tmask)
    else:
        q = (pid - n_shared - n_mu) // SPLIT_K  # (expert, row block) index
        e = q // RB
        row0 = e * DE + (q % RB) * ROWS
        cols = row0 + tl.arange(0, ROWS)
        h_out = h_ptr + part64[:, None] * NDE + cols[None, :]
        if GATES_GIVEN:  # the router kernel wrote the gates and mu
            g = tl.load(g_ptr + ts64 * N + e, mask=tmask, other=0.0)
            if tl.max(g, axis=0) > 0:
                h = _rows_times_x(x_ptr, wup_ptr, row0, NDE, k_lo, k_hi, T, D, stride_xt, USE_DOT, PREC, BLOCK_T,
                                  ROWS, BLOCK_K)
                tl.store(h_out, h, mask=tmask[:, None])
                if PRESUM:
                    _presum_h(h_ptr, count_ptr + q, ts64, tmask, cols, T, NDE, SPLIT_K, BLOCK_T, ROWS)
        elif USE_DOT:
            # The gates need the whole K sum: partial logits ride along in the pipelined K loop, the down
            # kernel sums them. Every slab is read.
            h, r = _rows_and_router(x_ptr, wup_ptr, wr_ptr, e.to(tl.int64), row0, NDE, k_lo, k_hi, T, D,
                                    stride_xt, True, USE_DOT, PREC, BLOCK_T, ROWS, BLOCK_K)
            tl.store(h_out, h, mask=tmask[:, None])
            if q % RB == 0:
                tl.store(r_ptr + part64 * N + e, r, mask=tmask)
            if PRESUM:
                _presum_h(h_ptr, count_ptr + q, ts64, tmask, cols, T, NDE, SPLIT_K, BLOCK_T, ROWS)
        else:
            # Decode: the logit first (one round of loads), so inactive experts read none of their slab.
            r, mu = _router_logit_and_mu(x_ptr, wr_ptr, wbar_ptr, e.to(tl.int64), T, D, stride_xt, BLOCK_T,
                                         BLOCK_KR)
            g = _gate_of(r, e, bias_ptr, bias, threshold, tmask, HAS_BIAS_VEC)
            if q % RB == 0:
                tl.store(g_ptr + ts64 * N + e, g, mask=tmask)
            if q == 0:
                tl.store(mu_ptr + ts, mu, mask=tmask)
            if tl.max(g, axis=0) > 0:
                h = _rows_times_x(x_ptr, wup_ptr, row0, NDE, 0, D, T, D, stride_xt, USE_DOT, PREC, BLOCK_T, ROWS,
                                  BLOCK_K)
                tl.store(h_out, h, mask=tmask[:, None])


@triton.jit
def _decode_down_kernel(h_ptr, hs_ptr, mu_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr, y_ptr,
                        T, N, D, DS, stride_yt, eps,
                        DE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        SLOTS: tl.constexpr, BLOCK_DS: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    NDE = tl.cast(N, tl.int64) * DE
    ks = tl.arange(0, DE)

    ws = _shared_down_weights(wsd_ptr, cols64, cmask, DS, BLOCK_DS)
    gamma = tl.load(gamma_ptr + ks).to(tl.float32)
    if PDL:  # the weights above overlap the up kernel's tail; what follows reads its outputs
        tl.extra.cuda.gdc_wait()
    hs = _shared_hidden(hs_ptr, ts64, tmask, DS, BLOCK_DS)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for t in tl.static_range(BLOCK_T):
        hs_t = tl.sum(tl.where(ts[:, None] == t, hs, 0.0), axis=0)
        acc = tl.where(ts[:, None] == t, acc + tl.sum(ws.to(tl.float32) * hs_t[None, :], axis=1)[None, :], acc)

    active, pos, count = _active_experts(g_ptr, T, N, BLOCK_T, BLOCK_N)
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
def _group_gates(r_ptr, mu_ptr, bias_ptr, g_ptr, e0, pid_d, T, N, bias, threshold, GATES_GIVEN: tl.constexpr,
                 HAS_BIAS_VEC: tl.constexpr, SPLIT_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """(gates [BLOCK_T, BLOCK_G], mu [BLOCK_T]) of experts e0 .. e0+GROUP-1 (0 past N and for padded tokens):
    the up kernel's partial logits r [SPLIT_K, T, N] and mu [SPLIT_K, T] summed and the knobs applied (the
    programs of feature block 0 write the gates to g), or with GATES_GIVEN g and mu [T] as the router kernel
    wrote them."""
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    gi = tl.arange(0, BLOCK_G)
    es = e0 + gi
    emask = (gi < GROUP) & (es < N)
    gmask = tmask[:, None] & emask[None, :]
    if GATES_GIVEN:
        gates = tl.load(g_ptr + ts64[:, None] * N + es[None, :], mask=gmask, other=0.0)
        mu = tl.load(mu_ptr + ts, mask=tmask, other=0.0)
    else:
        r = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.float32)
        mu = tl.zeros([BLOCK_T], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            part64 = s * tl.cast(T, tl.int64) + ts64
            r += tl.load(r_ptr + part64[:, None] * N + es[None, :], mask=gmask, other=0.0)
            mu += tl.load(mu_ptr + part64, mask=tmask, other=0.0)
        if HAS_BIAS_VEC:
            b = tl.load(bias_ptr + es, mask=emask, other=0.0)[None, :]
        else:
            b = bias
        gates = tl.where(gmask, gate_knobs(r, b, threshold), 0.0)
        if pid_d == 0:
            tl.store(g_ptr + ts64[:, None] * N + es[None, :], gates, mask=gmask)
    return gates, mu


@triton.jit
def _union_down_kernel(h_ptr, hs_ptr, r_ptr, mu_ptr, bias_ptr, g_ptr, scale_ptr, gamma_ptr, wd_ptr, wsd_ptr,
                       acc_ptr, counter_ptr, y_ptr, T, N, D, DS, stride_yt, bias, threshold, eps,
                       DE: tl.constexpr, GATES_GIVEN: tl.constexpr, HAS_BIAS_VEC: tl.constexpr,
                       SPLIT_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, H_SPLIT: tl.constexpr):
    """Program (feature block, j): j = 0 the shared expert, j >= 1 the routed experts (j-1)*GROUP .. j*GROUP-1.
    h [SPLIT_K, T, N*DE] and hs [SPLIT_K, T, 2*DS] are the up kernel's partial sums; without GATES_GIVEN
    r [SPLIT_K, T, N] and mu [SPLIT_K, T] its partial logits and mu, with it mu [T] and g come from the router
    kernel (r unused)."""
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    cols64 = cols.to(tl.int64)
    if pid_g == 0:
        # The shared expert as one more group, launched first: it streams the most bytes of any program.
        acc = _shared_expert_out(hs_ptr, wsd_ptr, ts64, tmask, cols64, cmask, T, DS, SPLIT_K, PREC, BLOCK_T,
                                 BLOCK_D, BLOCK_S)
        tl.atomic_add(acc_ptr + ts64[:, None] * D + cols[None, :], acc, mask=tmask[:, None] & cmask[None, :],
                      sem="relaxed")
    else:
        e0 = (pid_g - 1) * GROUP
        gates, mu = _group_gates(r_ptr, mu_ptr, bias_ptr, g_ptr, e0, pid_d, T, N, bias, threshold, GATES_GIVEN,
                                 HAS_BIAS_VEC, SPLIT_K, GROUP, BLOCK_G, BLOCK_T)
        gi = tl.arange(0, BLOCK_G)
        scale = tl.load(scale_ptr + e0 + gi, mask=(gi < GROUP) & (e0 + gi < N), other=0.0).to(tl.float32)
        gs = gates * scale[None, :]
        active = (tl.max(gates, axis=0) > 0).to(tl.int32)      # [BLOCK_G]: some token activates the expert
        gamma = tl.load(gamma_ptr + tl.arange(0, DE)).to(tl.float32)
        NDE = tl.cast(N, tl.int64) * DE
        # A plain loop: the w_down address depends only on i, so Triton pipelines its loads; an expert no token
        # activates is masked off (its loads are not issued, its activations are zero).
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for i in range(GROUP):
            dk = tl.arange(0, DE)
            live = dk * 0 + tl.sum(tl.where(gi == i, active, 0), axis=0) > 0   # [DE], all equal
            ks = (e0 + i).to(tl.int64) * DE + dk
            w = tl.load(wd_ptr + cols64[:, None] * NDE + ks[None, :], mask=cmask[:, None] & live[None, :],
                        other=0.0)
            hmask = tmask[:, None] & live[None, :]
            h = tl.zeros([BLOCK_T, DE], dtype=tl.float32)
            for s in tl.static_range(H_SPLIT):    # 1 where the up kernel summed the partials (PRESUM)
                h += tl.load(h_ptr + (s * tl.cast(T, tl.int64) + ts64)[:, None] * NDE + ks[None, :], mask=hmask,
                             other=0.0)
            gs_i = tl.sum(tl.where(gi[None, :] == i, gs, 0.0), axis=1)
            a = norm_silu_gate(h, mu, gamma, gs_i, eps, DE)
            acc += tl.dot(a.to(w.dtype), tl.trans(w), input_precision=PREC)
        # The [BLOCK_T, BLOCK_D] offsets and mask are formed after the loop: held across it they cost ~30
        # registers a thread.
        if tl.max(active, axis=0) > 0:
            tl.atomic_add(acc_ptr + ts64[:, None] * D + cols[None, :], acc, mask=tmask[:, None] & cmask[None, :],
                          sem="relaxed")
    # Every program arrives, active or not; the last of a block of features to arrive writes y and leaves the
    # accumulator and its counter at zero for the next call (CUDA graphs).
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr + pid_d, 1, sem="acq_rel") == tl.num_programs(1) - 1:
        out_mask = tmask[:, None] & cmask[None, :]
        acc_off = ts64[:, None] * D + cols[None, :]
        out = tl.load(acc_ptr + acc_off, mask=out_mask, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + ts64[:, None] * stride_yt + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=out_mask)
        tl.store(acc_ptr + acc_off, tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32), mask=out_mask)
        tl.atomic_xchg(counter_ptr + pid_d, 0)
