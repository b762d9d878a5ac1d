"""Prefill (many tokens): (token, expert) pairs grouped by expert, no host synchronisation.

The activation buffer is [N, T, de], the dense size, because the number of pairs is known only on the device;
only the first count[e] rows of expert e are written and read, so time follows the active pairs.

1. `_group_kernel`, one program per expert: compacts the tokens whose gate for that expert is > 0 from the
   transposed gates gT [N, T] (written by the router) into tokens[e, :count[e]] in token order.
2. `_grouped_up_kernel`, one program per (expert, block of BLOCK_M of its tokens): gathers the tokens' rows of x,
   multiplies by the expert's [DE, d] slab of w_up on tensor cores, and applies NormSiLU (mu = x.wbar from the
   router) and the scaled gate in the epilogue; writes a [BLOCK_M, DE] tile of activations in x's dtype.
3. `_grouped_down_kernel`, same grid: multiplies the activation tile by the expert's block of w_down, block of
   BLOCK_D output features at a time, and adds the result into the fp32 output at the tokens' rows with
   atomics (each output element receives one add per active expert of its token: the order of those adds is
   not fixed, so results can differ between runs in the last bits of fp32; tests bound that).
   Or (config `down="stationary"`) `_stationary_down_kernel`, one program per (tile of TILE_M tokens, block of
   output features): loops over the experts, adding each one's product for the tile's pairs into a register
   accumulator, and writes y once: no atomics, and results repeat bit for bit. It reads all of w_down once
   per token tile (from L2), where the atomic kernel reads it once; the tuner picks between them per bucket.
Programs of an expert whose tokens end before their block exit at once.
"""
import triton
import triton.language as tl

from ._jit import norm_silu_gate


@triton.jit
def _group_kernel(gt_ptr, tok_ptr, count_ptr, start_ptr, T, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """With TILE > 0 also the slot table of the stationary down kernel: start[e, j] = expert e's slots before
    token j * TILE for j = 0..cdiv(T, TILE) (the last entry is count[e]), so tile j's pairs of e are the slots
    start[e, j] .. start[e, j + 1] - 1 (slots are in token order)."""
    e = tl.program_id(0).to(tl.int64)
    base = 0
    for t0 in range(0, T, BLOCK):
        ts = t0 + tl.arange(0, BLOCK)
        active = (tl.load(gt_ptr + e * T + ts, mask=ts < T, other=0.0) > 0).to(tl.int32)
        before = tl.cumsum(active, axis=0) - active
        tl.store(tok_ptr + e * T + base + before, ts, mask=active > 0)
        if TILE > 0:
            tl.store(start_ptr + e * (tl.cdiv(T, TILE) + 1) + ts // TILE, base + before,
                     mask=(ts % TILE == 0) & (ts < T))
        base += tl.sum(active, axis=0)
    tl.store(count_ptr + e, base)
    if TILE > 0:
        tl.store(start_ptr + e * (tl.cdiv(T, TILE) + 1) + tl.cdiv(T, TILE), base)


@triton.jit
def _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M: tl.constexpr):
    """Slots m0..m0+BLOCK_M of expert e's token list: (slots, valid mask, token ids as int64)."""
    ms = m0 + tl.arange(0, BLOCK_M)
    mmask = ms < count
    toks = tl.load(tok_ptr + e64 * T + ms, mask=mmask, other=0).to(tl.int64)
    return ms, mmask, toks


@triton.jit
def _expert_matmul(b_ptr, stride_bt, toks, mmask, w_ptr, e64, stride_wi, stride_wk, K,
                   DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """b[toks, :K] @ W_e^T -> [BLOCK_M, DE] fp32, with W_e[i, k] at w_ptr + (e*DE + i)*stride_wi + k*stride_wk
    (w_up: strides (K, 1); w_down read as its transpose: strides (1, N*DE))."""
    rows = e64 * DE + tl.arange(0, DE)
    acc = tl.zeros([BLOCK_M, DE], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        b = tl.load(b_ptr + toks[:, None] * stride_bt + ks[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rows[:, None] * stride_wi + ks.to(tl.int64)[None, :] * stride_wk,
                    mask=kmask[None, :], other=0.0)
        acc += tl.dot(b, tl.trans(w), input_precision=PREC)
    return acc


@triton.jit
def _expert_scatter_add(a, toks, mmask, w_ptr, e64, stride_wc, stride_wi, out_ptr, C,
                        DE: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[toks, :C] += a [BLOCK_M, DE] @ W_e^T with fp32 atomics, W_e[c, i] at w_ptr + c*stride_wc +
    (e*DE + i)*stride_wi (w_down: (N*DE, 1); w_up read as its transpose: (1, C)), BLOCK_C columns a step."""
    w_cols = (e64 * DE + tl.arange(0, DE)) * stride_wi
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wc + w_cols[None, :], mask=cmask[:, None], other=0.0)
        tl.atomic_add(out_ptr + toks[:, None] * C + cols[None, :], tl.dot(a, tl.trans(w), input_precision=PREC),
                      mask=mmask[:, None] & cmask[None, :], sem="relaxed")


@triton.jit
def _grouped_up_kernel(x_ptr, wup_ptr, tok_ptr, count_ptr, g_ptr, mu_ptr, scale_ptr, gamma_ptr, a_ptr,
                       T, N, D, stride_xt, eps,
                       DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    count = tl.load(count_ptr + e)
    if m0 < count:
        e64 = e.to(tl.int64)
        ms, mmask, toks = _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M)
        h = _expert_matmul(x_ptr, stride_xt, toks, mmask, wup_ptr, e64, D, 1, D, DE, PREC, BLOCK_M, BLOCK_K)
        mu = tl.load(mu_ptr + toks, mask=mmask, other=0.0)
        gs = tl.load(g_ptr + toks * N + e, mask=mmask, other=0.0) * tl.load(scale_ptr + e).to(tl.float32)
        gamma = tl.load(gamma_ptr + tl.arange(0, DE)).to(tl.float32)
        a = norm_silu_gate(h, mu, gamma, gs, eps, DE)
        tl.store(a_ptr + (e64 * T + ms.to(tl.int64))[:, None] * DE + tl.arange(0, DE)[None, :],
                 a.to(a_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _grouped_down_kernel(a_ptr, wd_ptr, tok_ptr, count_ptr, y_ptr, T, N, D,
                         DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    count = tl.load(count_ptr + e)
    if m0 < count:
        e64 = e.to(tl.int64)
        ms, mmask, toks = _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M)
        a = tl.load(a_ptr + (e64 * T + ms.to(tl.int64))[:, None] * DE + tl.arange(0, DE)[None, :],
                    mask=mmask[:, None], other=0.0)
        _expert_scatter_add(a, toks, mmask, wd_ptr, e64, N * DE, 1, y_ptr, D, DE, PREC, BLOCK_D)


@triton.jit
def _stationary_chunk(acc, a_ptr, w_ptr, gt_ptr, e64, first, count, c0, rows, rmask, cols, cmask, T, stride_wc,
                      stride_wi, DE: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr):
    """acc [TILE_M, BLOCK_D] + the product of expert e's pairs c0 .. c0 + CHUNK - 1 of this tile (slots first + c0
    .., of count in the tile) with W_e, each product row added to the row of its token."""
    active = tl.load(gt_ptr + e64 * T + rows, mask=rmask, other=0.0) > 0
    # Slots are in token order: the i-th active row of the tile holds the tile's i-th pair of e.
    slot = tl.cumsum(active.to(tl.int32), axis=0) - 1 - c0
    take = active & (slot >= 0) & (slot < CHUNK)
    ps = c0 + tl.arange(0, CHUNK)
    a = tl.load(a_ptr + (e64 * T + first + ps.to(tl.int64))[:, None] * DE + tl.arange(0, DE)[None, :],
                mask=(ps < count)[:, None], other=0.0)
    w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_wc + ((e64 * DE + tl.arange(0, DE)) * stride_wi)[None, :],
                mask=cmask[:, None], other=0.0)
    prod = tl.dot(a, tl.trans(w), input_precision=PREC)
    rows_of_prod = tl.broadcast_to(tl.where(take, slot, 0)[:, None], acc.shape)
    return acc + tl.where(take[:, None], tl.gather(prod, rows_of_prod, axis=0), 0.0)


@triton.jit
def _stationary_down_kernel(a_ptr, w_ptr, gt_ptr, start_ptr, seed_ptr, y_ptr, T, N, C, stride_wc, stride_wi,
                            stride_yt, DE: tl.constexpr, PREC: tl.constexpr, TILE_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """y[tile, block] = seed[tile, block] + sum over experts e of a[e's pairs in the tile] @ W_e^T, one program per
    (tile of TILE_M tokens, block of BLOCK_D of the C output columns); W_e[c, i] at w_ptr + c*stride_wc +
    (e*DE + i)*stride_wi. Output-stationary: the sum runs in registers, expert by expert in a fixed order, and is
    written once, so there are no atomics and results repeat bit for bit. Each expert's product has CHUNK rows
    (its pairs in the tile, usually far fewer than TILE_M) and reaches the token rows through tl.gather; an
    expert with more than CHUNK pairs in the tile takes further chunks after the main loop.
    Bytes: every program reads every expert's [BLOCK_D, DE] block of W, so W is read cdiv(T, TILE_M) times
    (from L2); the gathers move TILE_M * BLOCK_D elements per expert, T * C * N in all."""
    tile = tl.program_id(0)
    rows = tile * TILE_M + tl.arange(0, TILE_M)
    rmask = rows < T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < C
    out = rows.to(tl.int64)[:, None] * C + cols[None, :]
    acc = tl.load(seed_ptr + out, mask=rmask[:, None] & cmask[None, :], other=0.0)
    per_expert = tl.cdiv(T, TILE_M) + 1
    most = 0
    for e in range(0, N):
        e64 = tl.cast(e, tl.int64)
        first = tl.load(start_ptr + e64 * per_expert + tile)
        count = tl.load(start_ptr + e64 * per_expert + tile + 1) - first
        most = tl.maximum(most, count)
        acc = _stationary_chunk(acc, a_ptr, w_ptr, gt_ptr, e64, first, count, 0, rows, rmask, cols, cmask, T,
                                stride_wc, stride_wi, DE, PREC, CHUNK)
    if most > CHUNK:
        for e in range(0, N):
            e64 = tl.cast(e, tl.int64)
            first = tl.load(start_ptr + e64 * per_expert + tile)
            count = tl.load(start_ptr + e64 * per_expert + tile + 1) - first
            for c0 in range(CHUNK, count, CHUNK):
                acc = _stationary_chunk(acc, a_ptr, w_ptr, gt_ptr, e64, first, count, c0, rows, rmask, cols,
                                        cmask, T, stride_wc, stride_wi, DE, PREC, CHUNK)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
