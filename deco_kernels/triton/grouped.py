"""Prefill (many tokens): (token, expert) pairs grouped by expert, no host synchronisation.

The activation buffer is [N, T, de], the dense size, because the number of pairs is known only on the device;
only the first count[e] rows of expert e are written and read, so time follows the active pairs.

1. `_group_kernel`, one program per expert: compacts the tokens whose gate for that expert is > 0 from the
   transposed gates gT [N, T] (written by the router) into tokens[e, :count[e]] in token order (and, for the
   training path, the last program writes the pair offsets: the exclusive prefix sum of the counts).
2. `_grouped_up_kernel`, one program per (expert, block of BLOCK_M of its tokens): gathers the tokens' rows of x,
   multiplies by the expert's [DE, d] slab of w_up on tensor cores, and applies NormSiLU (mu = x.wbar from the
   router) and the scaled gate in the epilogue; writes a [BLOCK_M, DE] tile of activations in x's dtype. The
   grid's first programs are the shared expert's: one per (block of DE of its hidden columns, block of BLOCK_M
   tokens), over every token, writing silu(gate) * up [T, ds] in x's dtype (the launcher's cuBLAS GEMM by
   ws_down then seeds the output). Before, that hidden activation took five torch launches (two GEMMs, silu,
   mul and their dependency gaps).
3. `_grouped_down_kernel`, one program per (expert, block of BLOCK_M of its tokens): multiplies the
   activation tile by the expert's block of w_down, block of BLOCK_D output features at a time, and adds the
   result into the fp32 output at the tokens' rows with atomics (each output element receives one add per
   active expert of its token: the order of those adds is not fixed, so results can differ between runs in
   the last bits of fp32; tests bound that).
   That is the path with a config's down "atomics" (or ffn.DOWN_GEMM = 0). By default (ffn.down_gemm(cfg):
   grouped_config's down "gemm") the up kernel writes the activations
   token-major into a zero-filled [T, N*de] (TOKEN_MAJOR) and ONE cuBLAS GEMM by w_down adds them all, the
   dense-masked product: T*N*de*d*2 FLOPs whatever the active ratio (96 GFLOP at 1.2b, T=4096, against ~19
   GFLOP of active products), yet faster than the atomics at ~20% active (H100: 1.2b T=4096 401.7 -> 306.4
   µs, see ffn.DOWN_GEMM), no atomics, and bit-for-bit repeatable.
Programs of an expert whose tokens end before their block exit at once.
"""
import triton
import triton.language as tl

from ._jit import norm_silu_gate, silu_mul


@triton.jit
def _group_kernel(gt_ptr, tok_ptr, count_ptr, off_ptr, counter_ptr, T, N, WRITE_OFFSETS: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program e: tokens[e, :count[e]] and count[e]. With WRITE_OFFSETS the last program to arrive (an arrival
    counter, left at zero again) also writes offsets [N+1], the exclusive prefix sum of the counts."""
    e = tl.program_id(0).to(tl.int64)
    base = 0
    for t0 in range(0, T, BLOCK):
        ts = t0 + tl.arange(0, BLOCK)
        active = (tl.load(gt_ptr + e * T + ts, mask=ts < T, other=0.0) > 0).to(tl.int32)
        pos = base + tl.cumsum(active, axis=0) - 1
        tl.store(tok_ptr + e * T + pos, ts, mask=active > 0)
        base += tl.sum(active, axis=0)
    tl.store(count_ptr + e, base)
    if WRITE_OFFSETS:
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == N - 1:
            ns = tl.arange(0, BLOCK_N)
            counts = tl.load(count_ptr + ns, mask=ns < N, other=0, cache_modifier=".cg")
            tl.store(off_ptr + 1 + ns, tl.cumsum(counts, axis=0), mask=ns < N)
            tl.store(off_ptr, 0)
            tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M: tl.constexpr):
    """Slots m0..m0+BLOCK_M of expert e's token list: (slots, valid mask, token ids as int64)."""
    ms = m0 + tl.arange(0, BLOCK_M)
    mmask = ms < count
    toks = tl.load(tok_ptr + e64 * T + ms, mask=mmask, other=0).to(tl.int64)
    return ms, mmask, toks


@triton.jit
def token_major_cells(toks, e64, N, DE: tl.constexpr):
    """Offsets of tokens ``toks``' cells of expert e in a token-major [T, N*DE] activation, [BLOCK_M, DE] int64:
    the dense-masked operand of the GEMM down projection (by w_down, or by w_up backward; ffn._token_major)."""
    return (toks * N + e64)[:, None] * DE + tl.arange(0, DE)[None, :]


@triton.jit
def _expert_matmul(b_ptr, stride_bt, toks, mmask, w_ptr, e64, stride_wi, stride_wk, K, row_end,
                   DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   MASK_ROWS: tl.constexpr):
    """b[toks, :K] @ W_e^T -> [BLOCK_M, DE] fp32, with W_e[i, k] at w_ptr + (e*DE + i)*stride_wi + k*stride_wk
    (w_up: strides (K, 1); w_down read as its transpose: strides (1, N*DE)); with MASK_ROWS, rows e*DE + i >=
    row_end read as 0 (the shared expert's last block of hidden columns)."""
    rows = e64 * DE + tl.arange(0, DE)
    acc = tl.zeros([BLOCK_M, DE], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        b = tl.load(b_ptr + toks[:, None] * stride_bt + ks[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        wmask = kmask[None, :]
        if MASK_ROWS:
            wmask = wmask & (rows < row_end)[:, None]
        w = tl.load(w_ptr + rows[:, None] * stride_wi + ks.to(tl.int64)[None, :] * stride_wk, mask=wmask, other=0.0)
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
def _shared_hidden_tile(x_ptr, stride_xt, m0, T, wsg_ptr, wsu_ptr, c, DS, K, hs_ptr,
                        DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """hs[m0:m0+BLOCK_M, c*DE:(c+1)*DE] = silu(x @ ws_gate^T) * (x @ ws_up^T) for those tokens and hidden
    columns (fp32 until the store in hs's dtype). Two K loops like a routed expert's, one after the other, so
    they reuse its shared-memory stages (one loop over both weights needs a third more, past the H200's
    232 KB at BLOCK_M=128, BLOCK_K=128, 4 stages)."""
    ms = m0 + tl.arange(0, BLOCK_M)
    mmask = ms < T
    toks = ms.to(tl.int64)
    c64 = c.to(tl.int64)
    gate = _expert_matmul(x_ptr, stride_xt, toks, mmask, wsg_ptr, c64, K, 1, K, DS, DE, PREC, BLOCK_M, BLOCK_K, True)
    up = _expert_matmul(x_ptr, stride_xt, toks, mmask, wsu_ptr, c64, K, 1, K, DS, DE, PREC, BLOCK_M, BLOCK_K, True)
    rows = c64 * DE + tl.arange(0, DE)
    tl.store(hs_ptr + toks[:, None] * DS + rows[None, :], silu_mul(gate, up).to(hs_ptr.dtype.element_ty),
             mask=mmask[:, None] & (rows < DS)[None, :])


@triton.jit
def _grouped_up_kernel(x_ptr, wup_ptr, wsg_ptr, wsu_ptr, tok_ptr, count_ptr, g_ptr, mu_ptr, scale_ptr, gamma_ptr,
                       a_ptr, hs_ptr, T, N, D, DS, stride_xt, eps,
                       DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       TOKEN_MAJOR: tl.constexpr):
    """Activations into a [N, T, DE] (expert e's i-th token at row e*T + i), or with TOKEN_MAJOR into a
    [T, N*DE] (token t's expert e at columns e*DE..; the cells of inactive pairs are left as they are).
    A 1-D grid: first the shared expert's cdiv(DS, DE) * cdiv(T, BLOCK_M) programs (twice a routed tile's work
    each), then the routed (expert, token block) programs, token block by token block, so the programs with
    work come before those of experts with fewer tokens, which exit at once. With the shared expert's programs
    last (a 2-D grid before), they ran after all routed work on a few SMs: H100, CUDA graphs
    (results/h100/probe_ab_up_shared_first.json), 1.2b T=512 78.8 -> 73.7 µs, T=2048 169.8 -> 157.6, T=4096
    289.4 -> 267.5; 0.1b 37.5 -> 37.2, 58.6 -> 58.0, 87.4 -> 84.8."""
    pid = tl.program_id(0)
    cols = tl.cdiv(DS, DE)
    n_shared = cols * tl.cdiv(T, BLOCK_M)
    if pid < n_shared:  # the shared expert's hidden columns (pid % cols)*DE .. over a block of tokens
        _shared_hidden_tile(x_ptr, stride_xt, (pid // cols) * BLOCK_M, T, wsg_ptr, wsu_ptr, pid % cols, DS, D, hs_ptr,
                            DE, PREC, BLOCK_M, BLOCK_K)
    else:
        e = (pid - n_shared) % N
        m0 = ((pid - n_shared) // N) * BLOCK_M
        count = tl.load(count_ptr + e)
        if m0 < count:
            e64 = e.to(tl.int64)
            ms, mmask, toks = _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M)
            h = _expert_matmul(x_ptr, stride_xt, toks, mmask, wup_ptr, e64, D, 1, D, 0, DE, PREC, BLOCK_M, BLOCK_K,
                               False)
            mu = tl.load(mu_ptr + toks, mask=mmask, other=0.0)
            gs = tl.load(g_ptr + toks * N + e, mask=mmask, other=0.0) * tl.load(scale_ptr + e).to(tl.float32)
            gamma = tl.load(gamma_ptr + tl.arange(0, DE)).to(tl.float32)
            a = norm_silu_gate(h, mu, gamma, gs, eps, DE)
            if TOKEN_MAJOR:
                cells = token_major_cells(toks, e64, N, DE)
            else:
                cells = (e64 * T + ms.to(tl.int64))[:, None] * DE + tl.arange(0, DE)[None, :]
            tl.store(a_ptr + cells, a.to(a_ptr.dtype.element_ty), mask=mmask[:, None])


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
