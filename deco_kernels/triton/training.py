"""Sparse training on Triton: the DECO layer forward that keeps what backward needs, and the backward kernels.

Compute and memory follow the active (token, expert) pairs, never the dense T x N*de product.

Pair layout. The router (`ffn._router`, knobs included) and `grouped._group_kernel` give each expert e its
tokens in token order, tokens[e, :count[e]] of a [N, T] table; the exclusive prefix sum of the counts, offsets
[N+1], places expert e's pairs at rows p = offsets[e] .. offsets[e+1]-1 of flat, expert-major pair buffers
(the activations a and dh, and h).

Sizing the pair buffers (`pair_rows`). Eager calls read P = offsets[N] back: ONE host synchronisation per
training forward, buffers of exactly P rows. While the stream is being captured into a CUDA graph, under
torch.compile (the custom op), or always with SYNC_FREE, the sizes come from shapes alone: T x min(N,
max_active) rows for the transient activations, and h saved for the first STATIC_H_SHARE x T x N pairs only;
the pair backward recomputes h = x[t] W_e^T for the pairs past them (none while the active ratio stays below
the share). Then a whole training step captures into one CUDA graph. Decode and inference (no autograd) never
come here and are capturable anyway.

Saved for backward: x (a view or the contiguous copy the shared expert saves too), the weights (by
reference), the gates g [T, N] and mu [T] (fp32), offsets [N+1], tokens [N, T] (int32), h [h_rows, de]
(fp32 pre-activation x.W_e, the only per-pair state) and wbar [d] (the fp32 mean of w_up, computed once per
step): O(T*N + P*de) (O(T*N*(1 + STATIC_H_SHARE*de)) in the static sizing), nothing of size T*N*de.

Kernels (grids over (expert, block of BLOCK_M of its pairs) exit at once past the expert's count):
  forward   `_expert_mean_kernel`  wbar and its bf16 split for the router's tensor-core mu (means.py)
            `_router_kernel`       g, mu (ffn._router)
            `_group_kernel`        each expert's tokens; its last program writes offsets (exclusive cumsum)
            `_train_up_kernel`     h = x[t] W_e^T, NormSiLU + scaled gate -> a (x's dtype, transient); more
                                   rows of programs seed acc (fp32) with the shared expert's output
            `_pair_scatter_kernel` acc[t] += a W_down_e^T (fp32 atomics); torch rounds acc into y
  backward  `_pair_bwd_kernel`     da = dy[t] W_down_e; h (recomputed past the saved rows); a; dh through
                                   NormSiLU; at cell (t, e) of two [T, N] buffers the logit gradient
                                   <da, silu(n)> scale_e and -sum(dh) (mu's share); dgamma and drouter_scale
                                   finished by the last programs to arrive (fixed-order sums of per-program
                                   partials)
            `_token_bwd_kernel`    the one dense [T, N] pass: dr (0 where g <= 0, which covers relu,
                                   threshold and max_active cuts; + dg), dmu = the row sums of the shares,
                                   and dx (fp32) seeded with dmu wbar + dr W_router
            torch (cuBLAS)         [dW_router | dwbar] = [dr | dmu]^T x, one GEMM
            `_pair_scatter_kernel` dx[t] += dh W_up_e (fp32 atomics); torch rounds dx into x's dtype
            `_pair_wgrad_kernel`   dW_up_e = dh^T x[t] + dwbar / (N*de) (the mu = x.wbar path) and
                                   dW_down_e = (a^T dy[t])^T, one program per (expert, column block) looping
                                   over the expert's pairs: deterministic, every expert written
Atomics: only y (forward) and dx (backward), one add per active expert of a token, as in the inference
prefill; the order of those adds can change the last bits of fp32 between runs (a gpu test bounds it).
That is the path with ffn.DOWN_GEMM = 0. By default (ffn.down_gemm(): DOWN_GEMM None or 1, and always under
torch.use_deterministic_algorithms(True)) there are no atomics: the up kernel writes a token-major into a
zero-filled [T, N*de] and y = shared + a W_down^T is one cuBLAS GEMM (rounded once, into x's dtype); the pair
backward also writes dh token-major and dx's expert part is one GEMM by W_up into the fp32 dx. Dense-masked:
T*N*de*d*2 FLOPs each, whatever the active ratio, and two transient [T, N*de] buffers; faster at ~20% active on
the H100 (1.2b step from a CUDA graph 1070 -> 935 µs, ffn.DOWN_GEMM). Everything else was already reduced in a
fixed order, so a step is bit-for-bit repeatable.
The shared expert runs through torch's GEMMs (its gate nonlinearity fused on Triton in eager calls,
swiglu.py) and its own autograd; its output seeds y's fp32 accumulator inside the op, so y is rounded once.

Glue. Outside the Triton kernels and the shared expert's GEMMs, an eager training step of a layer launches
only the two casts of the fp32 accumulators y and dx to x's dtype (x's two gradients, the routed op's and the
shared expert's, meet in the shared expert's addmm, swiglu.py). wbar and its split (new every step) took six
torch launches before means.py, and the router's weight gradients two GEMMs before grad_t (_router_grads).
Rounding y and dx in the scatters instead (each token's last expert, per-token arrival counters) was measured
slower on the H200: the 1.2b step's scatters 385 -> 451 µs against ~25 µs of casts (benchmarks/NOTES.md,
2026-12-04). No zero fills: every buffer cell a kernel reads was written by an earlier kernel; the arrival
counters (the group kernel's, one per expert and one global in the pair backward) come from ffn._zeroed and are
left at zero, as the router's are.

torch.library custom ops `deco_kernels::deco_ffn_fwd` / `deco_kernels::deco_ffn_bwd` with fake implementations
(static sizes: shapes follow from the inputs) and register_autograd, so torch.compile traces a layer's forward
and backward as two opaque ops without a graph break. Eager calls skip the custom-op dispatch through an
autograd.Function around the same forward, context and backward (`_EagerDecoFfn`). The gates g the op returns
are differentiable: the entropy regulariser's gradient enters the router backward as dg.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..ops import addmm_fp32, dense_swiglu
from ..reference.ops import NORM_EPS
from . import ffn, means, swiglu
from ._jit import fixed_order_sum, norm_silu_gate
from .grouped import _expert_matmul, _expert_scatter_add, _tile_tokens, token_major_cells
from .launch import launch

# Each launch's tiles: BLOCK_M pairs of one expert per program, BLOCK_K the reduction step over d of the gather
# matmuls, BLOCK_C output columns per step of the scatter and weight-gradient kernels. The defaults are the best
# of benchmarks/sweep_train_tiles.py on the H200 at 1.2b, T=4096 (results/h200/sweep_train_tiles.json: the
# step's GPU-busy time 1086 -> 1019 µs; at 0.1b every candidate was within 2%).
TILES = {
    "up": dict(BLOCK_M=128, BLOCK_K=64, num_warps=8),         # _train_up_kernel
    "y_scatter": dict(BLOCK_M=64, BLOCK_C=64, num_warps=8),   # _pair_scatter_kernel, forward (w_down)
    "bwd": dict(BLOCK_M=64, BLOCK_K=128, num_warps=8),        # _pair_bwd_kernel
    "dx_scatter": dict(BLOCK_M=64, BLOCK_C=64, num_warps=8),  # _pair_scatter_kernel, backward (w_up^T)
    "wgrad": dict(BLOCK_M=64, BLOCK_C=128, num_warps=4),      # _pair_wgrad_kernel, dW_up and dW_down
    "token": dict(BLOCK_M=16, BLOCK_C=128, num_warps=4),      # _token_bwd_kernel (BLOCK_M tokens; untuned)
}

# The static sizing (see the module docstring): SYNC_FREE takes it in every eager call too (no host
# synchronisation, more memory); STATIC_H_SHARE is the share of the T x N (token, expert) slots whose h the
# forward saves, the rest recomputed in the backward: above the active ratio training holds (0.2 by default)
# nothing is recomputed. Both are read at call time.
SYNC_FREE = False
STATIC_H_SHARE = 0.25


def _pair_grid(n: int, T: int, tiles: dict) -> tuple[int, int]:
    """(expert, block of BLOCK_M of its pairs): an expert has at most T pairs."""
    return n, ffn.cdiv(T, tiles["BLOCK_M"])


# ---------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _expert_span(off_ptr, e):
    """(first pair, number of pairs) of expert e in the flat pair buffers."""
    off = tl.load(off_ptr + e)
    return off, tl.load(off_ptr + e + 1) - off


@triton.jit
def _pair_slots(tok_ptr, e64, off, m0, count, T, BLOCK_M: tl.constexpr):
    """Slots m0..m0+BLOCK_M of expert e's pairs: (valid mask, token ids int64 from tokens [N, T], pair ids int64:
    rows of the flat pair buffers)."""
    ms, mmask, toks = _tile_tokens(tok_ptr, e64, m0, count, T, BLOCK_M)
    return mmask, toks, off.to(tl.int64) + ms


@triton.jit
def _pair_gates(g_ptr, mu_ptr, scale_ptr, gamma_ptr, toks, mmask, e, N, DE: tl.constexpr):
    """Per pair: the gate g[t, e], the scaled gate gs and the token's mu; and gamma [DE], all fp32."""
    g = tl.load(g_ptr + toks * N + e, mask=mmask, other=0.0)
    gs = g * tl.load(scale_ptr + e).to(tl.float32)
    mu = tl.load(mu_ptr + toks, mask=mmask, other=0.0)
    gamma = tl.load(gamma_ptr + tl.arange(0, DE)).to(tl.float32)
    return g, gs, mu, gamma


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _train_up_kernel(x_ptr, wup_ptr, tok_ptr, off_ptr, g_ptr, mu_ptr, scale_ptr, gamma_ptr,
                     h_ptr, h_rows, a_ptr, shared_ptr, stride_st, stride_sc, acc_ptr,
                     T, N, D, stride_xt, eps, DE: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TOKEN_MAJOR: tl.constexpr):
    """Programs (e < N, block): expert e's pairs (h kept for the pairs below h_rows; a into the pair rows, or
    with TOKEN_MAJOR into a [T, N*DE]). Programs (N + j, block), launched for the atomics only: y's fp32
    accumulator acc [T, D] seeded with the shared expert's output at tokens block*BLOCK_M.. and columns
    j*BLOCK_K.. (the scatter, a later launch, adds into it)."""
    e = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if e >= N:
        ts = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        tmask = ts < T
        cs = ((e - N) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask = tmask[:, None] & (cs < D)[None, :]
        v = tl.load(shared_ptr + ts[:, None] * stride_st + cs[None, :] * stride_sc, mask=mask, other=0.0)
        tl.store(acc_ptr + ts[:, None] * D + cs[None, :], v.to(tl.float32), mask=mask)
    else:
        off, count = _expert_span(off_ptr, e)
        if m0 < count:
            e64 = e.to(tl.int64)
            mmask, toks, pairs = _pair_slots(tok_ptr, e64, off, m0, count, T, BLOCK_M)
            h = _expert_matmul(x_ptr, stride_xt, toks, mmask, wup_ptr, e64, D, 1, D, 0, DE, PREC, BLOCK_M, BLOCK_K,
                               False)
            cells = pairs[:, None] * DE + tl.arange(0, DE)[None, :]
            tl.store(h_ptr + cells, h, mask=(mmask & (pairs < h_rows))[:, None])
            _, gs, mu, gamma = _pair_gates(g_ptr, mu_ptr, scale_ptr, gamma_ptr, toks, mmask, e, N, DE)
            a = norm_silu_gate(h, mu, gamma, gs, eps, DE)
            if TOKEN_MAJOR:
                cells = token_major_cells(toks, e64, N, DE)
            tl.store(a_ptr + cells, a.to(a_ptr.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _pair_scatter_kernel(a_ptr, w_ptr, stride_wc, stride_wi, tok_ptr, off_ptr, out_ptr, T, C,
                         DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t_p, :C] += A[p, :] @ W_e^T over expert e's pairs p, W_e[c, i] at w_ptr + c*stride_wc +
    (e*DE + i)*stride_wi (w_down: (N*DE, 1); w_up read as its transpose: (1, C)). fp32 atomics into out."""
    e = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    off, count = _expert_span(off_ptr, e)
    if m0 < count:
        e64 = e.to(tl.int64)
        mmask, toks, pairs = _pair_slots(tok_ptr, e64, off, m0, count, T, BLOCK_M)
        a = tl.load(a_ptr + pairs[:, None] * DE + tl.arange(0, DE)[None, :], mask=mmask[:, None], other=0.0)
        _expert_scatter_add(a, toks, mmask, w_ptr, e64, stride_wc, stride_wi, out_ptr, C, DE, PREC, BLOCK_C)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _pair_bwd_kernel(dy_ptr, wd_ptr, x_ptr, wup_ptr, h_ptr, h_rows, tok_ptr, off_ptr, g_ptr, mu_ptr, scale_ptr,
                     gamma_ptr, a_ptr, dh_ptr, dh_tm_ptr, dr_ptr, dmu_ptr, dgamma_part_ptr, dscale_part_ptr,
                     dgamma_exp_ptr, dgamma_out_ptr, dscale_out_ptr, counter_ptr, T, N, D, stride_dyt, stride_xt, eps,
                     DE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_R: tl.constexpr, DH_TOKEN_MAJOR: tl.constexpr):
    """Per pair (t, e): h (saved below pair h_rows, else recomputed as x[t] W_e^T), a (from h, for dW_down),
    dh (through NormSiLU; with DH_TOKEN_MAJOR also into a token-major [T, N*DE] for dx's GEMM), and at cell
    (t, e) of two [T, N] fp32 buffers (one writer per cell; the other cells are left unwritten:
    _token_bwd_kernel reads only the active ones) the routed part of the logit gradient <da, silu(n)> * scale[e]
    and mu's share -sum(dh).

    dgamma and drouter_scale are finished here, deterministically: each program with pairs (and block 0 of an
    expert without any) stores its partial sums and arrives at its expert's counter; the expert's last program
    sums them in block order into drouter_scale[e] and a per-expert dgamma row, then arrives at counter[N]; the
    last expert sums the rows in expert order into dgamma. Counters are left at zero (CUDA graphs)."""
    e = tl.program_id(0)
    blk = tl.program_id(1)
    m0 = blk * BLOCK_M
    part = e.to(tl.int64) * tl.num_programs(1) + blk
    cols = tl.arange(0, DE)
    off, count = _expert_span(off_ptr, e)
    if m0 < count:
        e64 = e.to(tl.int64)
        mmask, toks, pairs = _pair_slots(tok_ptr, e64, off, m0, count, T, BLOCK_M)
        da = _expert_matmul(dy_ptr, stride_dyt, toks, mmask, wd_ptr, e64, 1, N * DE, D, 0,
                            DE, PREC, BLOCK_M, BLOCK_K, False)
        cells = pairs[:, None] * DE + cols[None, :]
        saved = mmask & (pairs < h_rows)
        h = tl.load(h_ptr + cells, mask=saved[:, None], other=0.0)
        if off + tl.minimum(count, m0 + BLOCK_M) > h_rows:   # some pair of the tile is past the saved h
            h = tl.where(saved[:, None], h, _expert_matmul(x_ptr, stride_xt, toks, mmask, wup_ptr, e64, D, 1, D, 0,
                                                           DE, PREC, BLOCK_M, BLOCK_K, False))
        g, gs, mu, gamma = _pair_gates(g_ptr, mu_ptr, scale_ptr, gamma_ptr, toks, mmask, e, N, DE)
        # The forward of norm_silu_gate, keeping its intermediates.
        u = h - mu[:, None]
        inv_rms = 1.0 / tl.sqrt(tl.sum(u * u, axis=1) / DE + eps)
        uhat = u * inv_rms[:, None]
        n = uhat * gamma[None, :]
        sig = tl.sigmoid(n)
        s = n * sig
        tl.store(a_ptr + cells, (s * gs[:, None]).to(a_ptr.dtype.element_ty), mask=mmask[:, None])
        dgs = tl.sum(da * s, axis=1)
        tl.store(dr_ptr + toks * N + e, dgs * tl.load(scale_ptr + e).to(tl.float32), mask=mmask)
        dn = da * gs[:, None] * sig * (1.0 + n * (1.0 - sig))          # silu'(n) = sig * (1 + n (1 - sig))
        duhat = dn * gamma[None, :]
        # RMS norm backward: du = (duhat - uhat * mean(duhat * uhat)) / rms
        du = inv_rms[:, None] * (duhat - uhat * (tl.sum(duhat * uhat, axis=1) / DE)[:, None])
        tl.store(dh_ptr + cells, du.to(dh_ptr.dtype.element_ty), mask=mmask[:, None])
        if DH_TOKEN_MAJOR:
            tl.store(dh_tm_ptr + token_major_cells(toks, e64, N, DE), du.to(dh_tm_ptr.dtype.element_ty),
                     mask=mmask[:, None])
        tl.store(dmu_ptr + toks * N + e, -tl.sum(du, axis=1), mask=mmask)
        tl.store(dgamma_part_ptr + part * DE + cols, tl.sum(dn * uhat, axis=0))
        tl.store(dscale_part_ptr + part, tl.sum(dgs * g, axis=0))
    elif blk == 0:
        tl.store(dgamma_part_ptr + part * DE + cols, tl.zeros([DE], dtype=tl.float32))
        tl.store(dscale_part_ptr + part, 0.0)
    if (m0 < count) | (blk == 0):
        tl.debug_barrier()
        arrivals = tl.maximum((count + BLOCK_M - 1) // BLOCK_M, 1)
        if tl.atomic_add(counter_ptr + e, 1, sem="acq_rel") == arrivals - 1:
            first = part - blk
            every = cols < DE
            tl.store(dgamma_exp_ptr + e.to(tl.int64) * DE + cols,
                     fixed_order_sum(dgamma_part_ptr, first, arrivals, DE, cols, every, BLOCK_R))
            rs = tl.arange(0, BLOCK_R)
            dscale = tl.zeros([BLOCK_R], dtype=tl.float32)
            for r0 in range(0, arrivals, BLOCK_R):
                dscale += tl.load(dscale_part_ptr + first + r0 + rs, mask=r0 + rs < arrivals, other=0.0,
                                  cache_modifier=".cg")
            tl.store(dscale_out_ptr + e, tl.sum(dscale, axis=0).to(dscale_out_ptr.dtype.element_ty))
            tl.atomic_xchg(counter_ptr + e, 0)
            tl.debug_barrier()
            if tl.atomic_add(counter_ptr + N, 1, sem="acq_rel") == N - 1:
                dgamma = fixed_order_sum(dgamma_exp_ptr, 0, N, DE, cols, every, BLOCK_R)
                tl.store(dgamma_out_ptr + cols, dgamma.to(dgamma_out_ptr.dtype.element_ty))
                tl.atomic_xchg(counter_ptr + N, 0)


@triton.jit
def _token_bwd_kernel(g_ptr, dr_pair_ptr, dmu_pair_ptr, dg_ptr, wr_ptr, wbar_ptr, grad_t_ptr, dx_ptr,
                      T, N, D, HAS_DG: tl.constexpr, HAS_ROUTER: tl.constexpr, LOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The dense [T, N] pass of the backward, BLOCK_M tokens per program, reading the pair kernel's cells only
    where the gate is on (g > 0: exactly the cells that have a pair):
      dr [T, N]  the logit gradient: the pair kernel's share (+ dg) where g > 0, 0 elsewhere (relu, threshold
                 and max_active cuts pass no gradient); without a router dL/dg: the share where g > 0, + dg
      dmu [T]    mu's gradient, the fixed-order sum of the token's shares
      dx [T, D]  fp32, seeded with dmu wbar + dr W_router (the scatter adds the experts' dh W_up into it)
    dr and dmu are stored transposed into one buffer grad_t [N+1, T] (rows 0..N-1 dr^T, row N dmu; its dtype),
    the left operand of the one GEMM that gives both router weight gradients (_router_grads). LOW (bf16 x and
    router): dr W_router from dr rounded to bf16 on tensor cores (fp32 accumulation), the precision of the
    dW_router GEMM that reads the same dr; else fp32 with exact products."""
    ts = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tmask = ts < T
    ts64 = ts.to(tl.int64)
    ns = tl.arange(0, BLOCK_N)
    nmask = ns < N
    cells = ts64[:, None] * N + ns[None, :]
    inside = tmask[:, None] & nmask[None, :]
    active = tl.load(g_ptr + cells, mask=inside, other=0.0) > 0
    dr = tl.load(dr_pair_ptr + cells, mask=active, other=0.0)
    if HAS_DG:
        if HAS_ROUTER:
            dr += tl.load(dg_ptr + cells, mask=active, other=0.0)
        else:
            dr += tl.load(dg_ptr + cells, mask=inside, other=0.0)
    dmu = tl.sum(tl.load(dmu_pair_ptr + cells, mask=active, other=0.0), axis=1)
    tl.store(grad_t_ptr + ns.to(tl.int64)[None, :] * T + ts64[:, None], dr.to(grad_t_ptr.dtype.element_ty),
             mask=inside)
    tl.store(grad_t_ptr + N * tl.cast(T, tl.int64) + ts64, dmu.to(grad_t_ptr.dtype.element_ty), mask=tmask)
    for c0 in range(0, D, BLOCK_C):
        cs = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = cs < D
        dx = dmu[:, None] * tl.load(wbar_ptr + cs, mask=cmask, other=0.0)[None, :]
        if HAS_ROUTER:
            w = tl.load(wr_ptr + ns.to(tl.int64)[:, None] * D + cs[None, :], mask=nmask[:, None] & cmask[None, :],
                        other=0.0)
            if LOW:
                dx = tl.dot(dr.to(w.dtype), w, dx)
            else:
                dx = tl.dot(dr, w.to(tl.float32), dx, input_precision="ieee")
        tl.store(dx_ptr + ts64[:, None] * D + cs[None, :], dx, mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _pair_wgrad_kernel(a_ptr, b_ptr, stride_bt, tok_ptr, off_ptr, vec_ptr, vec_scale, out_ptr,
                       stride_oi, stride_oc, T, C,
                       HAS_VEC: tl.constexpr, DE: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out_e[i, c] = sum over expert e's pairs p of A[p, i] * B[t_p, c] (+ vec[c] * vec_scale), stored at
    out_ptr + (e*DE + i)*stride_oi + c*stride_oc for every expert (zero, or the vec term, without pairs)."""
    e = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ks = tl.arange(0, DE)
    off, count = _expert_span(off_ptr, e)
    e64 = e.to(tl.int64)
    acc = tl.zeros([DE, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        mmask, toks, pairs = _pair_slots(tok_ptr, e64, off, m0, count, T, BLOCK_M)
        a = tl.load(a_ptr + pairs[:, None] * DE + ks[None, :], mask=mmask[:, None], other=0.0)
        b = tl.load(b_ptr + toks[:, None] * stride_bt + cols[None, :], mask=mmask[:, None] & cmask[None, :],
                    other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision=PREC)
    if HAS_VEC:
        acc += tl.load(vec_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] * vec_scale
    rows = e64 * DE + ks
    tl.store(out_ptr + rows[:, None] * stride_oi + cols.to(tl.int64)[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------
def static_pair_rows(T: int, n: int, max_active: int) -> tuple[int, int]:
    """(rows of the flat pair buffers, rows of them whose h is saved for backward) by shapes alone: every token
    may take min(N, max_active) experts (max_active 0: no cap; the router keeps at most max_active gates per
    token, ties broken by expert index), and h is saved for the first STATIC_H_SHARE x T x N pairs (the
    backward recomputes the rest)."""
    rows = T * min(n, max_active or n)
    return rows, min(rows, math.ceil(STATIC_H_SHARE * T * n))


def pair_rows(T: int, n: int, max_active: int, static: bool, offsets: Tensor) -> tuple[int, int]:
    """static_pair_rows, or without ``static`` the pairs P the router made, read from the device (the one host
    synchronisation), for both."""
    if static:
        return static_pair_rows(T, n, max_active)
    P = int(offsets[-1])
    return P, P


def _sync_free(x: Tensor) -> bool:
    """Whether an eager forward must size its pair buffers without a host synchronisation: always with
    SYNC_FREE, else only while the current CUDA stream is being captured into a graph (where a synchronisation
    is an error)."""
    return SYNC_FREE or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _forward(x, w_router, router_scale, w_up, gamma, w_down, shared, bias, bias_value, threshold, max_active,
             gates=None, static=False):
    """Returns y [T, d] (x's dtype, shared expert included), g [T, N], mu [T], offsets [N+1], tokens [N, T]
    (expert e's pairs p = offsets[e] + m are its tokens tokens[e, m]), h [h_rows, de] (see pair_rows) and wbar
    [d] (fp32, the backward reuses it). With ``gates`` [T, N] (then w_router is None and the knobs are unused)
    g is a copy of them. ``static``: no host synchronisation (pair_rows)."""
    T, d = x.shape
    n, de = router_scale.shape[0], gamma.shape[0]
    dev, f32 = x.device, torch.float32
    g = ffn._empty(T, n, device=dev, dtype=f32)
    mu = ffn._empty(T, device=dev, dtype=f32)
    offsets = ffn._empty(n + 1, device=dev, dtype=torch.int32)   # written by _group_kernel's last program
    # Never cached (weights may be refilled in place, as FSDP does): one launch per step, the split included.
    mean = means.expert_mean(w_up)
    if T == 0:
        offsets.zero_()
        tokens = ffn._empty(n, 0, device=dev, dtype=torch.int32)
    elif gates is None:
        tokens, _ = ffn._group_by_expert(x, w_router, mean, bias_value, bias, threshold, max_active, g, mu,
                                         offsets=offsets)
    else:
        g.copy_(gates)
        torch.mv(x.float(), mean.wbar, out=mu)
        tokens, _ = ffn._group_gates(g.t().contiguous(), offsets)
    rows, h_rows = pair_rows(T, n, max_active if gates is None else 0, static, offsets)
    h = ffn._empty(h_rows, de, device=dev, dtype=f32)
    up, prec = TILES["up"], ffn._precision(x.dtype)
    args = (x, w_up, tokens, offsets, g, mu, router_scale, gamma, h, h_rows)
    if ffn.down_gemm():
        # The activations token-major (zero where a gate is off) and y = shared + a W_down^T in one GEMM.
        a = ffn._token_major(T, n, de, x)
        if T > 0:
            launch(_train_up_kernel, _pair_grid(n, T, up), *args, a, shared, 0, 0, shared, T, n, d, x.stride(0),
                   NORM_EPS, DE=de, PREC=prec, TOKEN_MAJOR=True, **up)
        return torch.addmm(shared, a, w_down.t()), g, mu, offsets, tokens, h, mean.wbar
    acc = ffn._empty(T, d, device=dev, dtype=f32)    # seeded with the shared expert's output by _train_up_kernel
    if T > 0:
        a = ffn._empty(rows, de, device=dev, dtype=x.dtype)
        # cdiv(d, BLOCK_K) more rows of programs (expert index >= n) seed acc with the shared expert's output.
        launch(_train_up_kernel, _pair_grid(n + ffn.cdiv(d, up["BLOCK_K"]), T, up), *args, a, shared,
               shared.stride(0), shared.stride(1), acc, T, n, d, x.stride(0), NORM_EPS, DE=de, PREC=prec,
               TOKEN_MAJOR=False, **up)
        if rows > 0:
            scatter = TILES["y_scatter"]
            launch(_pair_scatter_kernel, _pair_grid(n, T, scatter), a, w_down, n * de, 1, tokens, offsets, acc,
                   T, d, DE=de, PREC=prec, **scatter)
    return acc.to(x.dtype), g, mu, offsets, tokens, h, mean.wbar


def _router_grads(x, grad_t, w_router):
    """(dwbar = x^T dmu, dW_router = dr^T x in w_router's dtype, empty without a router) as ONE cuBLAS GEMM,
    grad_t @ x [N+1, d], over grad_t = [dr | dmu]^T [N+1, T] from _token_bwd_kernel. grad_t is bf16 with bf16 x
    and router weights (tensor cores, fp32 accumulation; dwbar comes out bf16 and the dW_up kernel reads it
    so), else fp32 with x read as fp32 (fp16's range would not hold dmu and dwbar, sums over the token's pairs
    and over T, under loss scaling). H200, T=4096 (results/h200/probe_router_wgrad.json): 11.9 µs at 0.1b and
    14.3 at 1.2b, against 24.4 and 29.9 for the two GEMMs before (dr^T x and the GEMV x^T dmu) and 18.5-76 µs
    for a Triton kernel with a fixed-order split over T (tried at 18 tiles, commit 55c94ec)."""
    n = grad_t.shape[0] - 1
    out = grad_t @ (x if grad_t.dtype == x.dtype else x.float())
    if w_router is None:
        return out[n], x.new_empty(0)
    return out[n], out[:n].to(w_router.dtype)


def _backward(dy, dg, x, w_router, router_scale, w_up, gamma, w_down, g, mu, offsets, tokens, h, wbar, rows):
    """Gradients (dx, dw_router, drouter_scale, dw_up, dgamma, dw_down, dgates) of the routed part and the
    router; dy [T, d] contiguous in x's dtype, dg [T, N] fp32 contiguous or None, ``rows`` the forward's pair
    rows (pair_rows). Without w_router (the gates were given) dw_router is empty and dgates [T, N] is the
    gradient of the given gates (else empty)."""
    T, d = x.shape
    n, de = router_scale.shape[0], gamma.shape[0]
    has_router = w_router is not None
    none = x.new_empty(0)
    if T == 0:
        return (torch.zeros_like(x), torch.zeros_like(w_router) if has_router else none,
                *(torch.zeros_like(t) for t in (router_scale, w_up, gamma, w_down)),
                none if has_router else torch.zeros_like(g))
    dev, f32, prec = x.device, torch.float32, ffn._precision(x.dtype)
    bwd = TILES["bwd"]
    grid = _pair_grid(n, T, bwd)
    a = ffn._empty(rows, de, device=dev, dtype=x.dtype)
    dh = ffn._empty(rows, de, device=dev, dtype=x.dtype)
    # The pair kernel writes the active cells of these two [T, N] buffers; nothing reads the others.
    dr_pair = ffn._empty(T, n, device=dev, dtype=f32)
    dmu_pair = ffn._empty(T, n, device=dev, dtype=f32)
    dgamma_part = ffn._empty(n * grid[1], de, device=dev, dtype=f32)
    dscale_part = ffn._empty(n * grid[1], device=dev, dtype=f32)
    dgamma_exp = ffn._empty(n, de, device=dev, dtype=f32)
    dgamma = ffn._empty(de, device=dev, dtype=gamma.dtype)
    dscale = ffn._empty(n, device=dev, dtype=router_scale.dtype)
    gemm = ffn.down_gemm()   # dx's expert part as one GEMM over token-major dh (zero where a gate is off)
    dh_tm = ffn._token_major(T, n, de, x) if gemm else dh
    launch(_pair_bwd_kernel, grid, dy, w_down, x, w_up, h, h.shape[0], tokens, offsets, g, mu, router_scale, gamma,
           a, dh, dh_tm, dr_pair, dmu_pair, dgamma_part, dscale_part, dgamma_exp, dgamma, dscale,
           ffn._zeroed(dev, torch.int32, n + 1), T, n, d, dy.stride(0), x.stride(0), NORM_EPS, DE=de, PREC=prec,
           BLOCK_R=32, DH_TOKEN_MAJOR=gemm, **bwd)

    # The router GEMM reads dr and dmu in bf16 when x and the router are bf16 (see _router_grads).
    low = has_router and x.dtype == torch.bfloat16 and w_router.dtype == x.dtype
    grad_t = ffn._empty(n + 1, T, device=dev, dtype=x.dtype if low else f32)   # [dr | dmu]^T
    dx = ffn._empty(T, d, device=dev, dtype=f32)   # fp32, seeded here; the scatter or the GEMM adds the experts
    tok = TILES["token"]
    launch(
        _token_bwd_kernel, (ffn.cdiv(T, tok["BLOCK_M"]),), g, dr_pair, dmu_pair, g if dg is None else dg,
        w_router if has_router else g, wbar, grad_t, dx, T, n, d, HAS_DG=dg is not None, HAS_ROUTER=has_router,
        LOW=low, BLOCK_N=max(16, ffn.pow2(n)), **tok)
    dwbar, dw_router = _router_grads(x, grad_t, w_router)
    # Without a router the caller's autograd owns the gates: dL/dg is dr.
    dgates = none if has_router else grad_t[:n].t()
    if gemm:
        dx = addmm_fp32(dx, dh_tm, w_up)
    else:
        scatter = TILES["dx_scatter"]
        launch(_pair_scatter_kernel, _pair_grid(n, T, scatter), dh, w_up, 1, d, tokens, offsets, dx, T, d,
               DE=de, PREC=prec, **scatter)

    wgrad = dict(DE=de, PREC=prec, **TILES["wgrad"])
    wgrid = (n, ffn.cdiv(d, wgrad["BLOCK_C"]))   # (expert, column block), looping over the expert's pairs
    dw_up = ffn._empty(n * de, d, device=dev, dtype=w_up.dtype)
    launch(_pair_wgrad_kernel, wgrid, dh, x, x.stride(0), tokens, offsets, dwbar, 1.0 / (n * de),
           dw_up, d, 1, T, d, HAS_VEC=True, **wgrad)
    dw_down = ffn._empty(d, n * de, device=dev, dtype=w_down.dtype)
    launch(_pair_wgrad_kernel, wgrid, a, dy, dy.stride(0), tokens, offsets, dwbar, 0.0,
           dw_down, 1, n * de, T, d, HAS_VEC=False, **wgrad)
    return dx.to(x.dtype), dw_router, dscale, dw_up, dgamma, dw_down, dgates


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops and autograd
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("deco_kernels::deco_ffn_fwd", mutates_args=())
def deco_ffn_fwd(x: Tensor, w_router: Optional[Tensor], router_scale: Tensor, w_up: Tensor, gamma: Tensor,
                 w_down: Tensor, shared: Tensor, bias: Optional[Tensor], bias_value: float, threshold: float,
                 max_active: int, gates: Optional[Tensor]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The routed experts plus ``shared`` (the shared expert's output [T, d]) on x [T, d] (unit column
    stride), routed by w_router and the knobs (max_active 0 means none), or by ``gates`` [T, N] fp32 when
    w_router is None. Returns (y, g, mu, offsets, tokens, h, wbar), see _forward. Sized by shapes alone
    (static pair_rows): a traced graph holds no data-dependent size and no host synchronisation."""
    return _forward(x, w_router, router_scale, w_up, gamma, w_down, shared, bias, bias_value, threshold,
                    max_active, gates, static=True)


@deco_ffn_fwd.register_fake
def _(x, w_router, router_scale, w_up, gamma, w_down, shared, bias, bias_value, threshold, max_active, gates):
    T, d = x.shape
    n, de = router_scale.shape[0], gamma.shape[0]
    _, h_rows = static_pair_rows(T, n, max_active if gates is None else 0)
    f32 = torch.float32
    return (x.new_empty(T, d), x.new_empty(T, n, dtype=f32), x.new_empty(T, dtype=f32),
            x.new_empty(n + 1, dtype=torch.int32), x.new_empty(n, T, dtype=torch.int32),
            x.new_empty(h_rows, de, dtype=f32), x.new_empty(d, dtype=f32))


@torch.library.custom_op("deco_kernels::deco_ffn_bwd", mutates_args=())
def deco_ffn_bwd(dy: Tensor, dg: Optional[Tensor], x: Tensor, w_router: Optional[Tensor], router_scale: Tensor,
                 w_up: Tensor, gamma: Tensor, w_down: Tensor, g: Tensor, mu: Tensor, offsets: Tensor,
                 tokens: Tensor, h: Tensor, wbar: Tensor, rows: int
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_router, drouter_scale, dw_up, dgamma, dw_down, dgates) from what deco_ffn_fwd saved."""
    return _backward(dy, dg, x, w_router, router_scale, w_up, gamma, w_down, g, mu, offsets, tokens, h, wbar,
                     rows)


@deco_ffn_bwd.register_fake
def _(dy, dg, x, w_router, router_scale, w_up, gamma, w_down, g, mu, offsets, tokens, h, wbar, rows):
    none = x.new_empty(0)
    T, n = g.shape   # dgates is a transposed view of the router-gradient GEMM's left operand [N+1, T]
    return (torch.empty_like(x), none if w_router is None else torch.empty_like(w_router),
            *(torch.empty_like(t) for t in (router_scale, w_up, gamma, w_down)),
            g.new_empty_strided((T, n), (1, T)) if w_router is None else none)


def _setup_context(ctx, inputs, output, static=True):
    x, w_router, router_scale, w_up, gamma, w_down = inputs[:6]
    max_active, gates = inputs[10:12]
    _, g, mu, offsets, tokens, h, wbar = output
    ctx.mark_non_differentiable(mu, offsets, tokens, h, wbar)
    ctx.gates_given = w_router is None
    # The pair buffers' rows: the synchronised sizing saves h for every pair, so it has as many rows.
    ctx.rows = (static_pair_rows(x.shape[0], router_scale.shape[0], max_active if gates is None else 0)[0]
                if static else h.shape[0])
    ctx.save_for_backward(x, w_router, router_scale, w_up, gamma, w_down, g, mu, offsets, tokens, h, wbar)


def _grads(ctx, dy, dg, backward):
    """The gradients of deco_ffn_fwd's inputs from those of (y, g), through ``backward`` (deco_ffn_bwd, or
    _backward itself in eager mode)."""
    x = ctx.saved_tensors[0]
    dy = torch.zeros_like(x) if dy is None else dy.contiguous()      # y unused: only the gates in the loss
    dg = None if dg is None else dg.contiguous()
    dx, dw_router, *grads, dgates = backward(dy, dg, *ctx.saved_tensors, ctx.rows)
    routed = (dx, None, *grads) if ctx.gates_given else (dx, dw_router, *grads)
    # The shared expert's output enters y unchanged: its gradient is dy (torch's autograd takes it from there).
    return (*routed, dy, None, None, None, None, dgates if ctx.gates_given else None)


deco_ffn_fwd.register_autograd(lambda ctx, dy, dg, *_: _grads(ctx, dy, dg, deco_ffn_bwd),
                               setup_context=_setup_context)


class _EagerDecoFfn(torch.autograd.Function):
    """deco_ffn_fwd's autograd without the custom-op machinery, for eager calls: the same _forward,
    _setup_context and _backward, minus the dispatcher round trips of two custom ops (about a fifth of a
    layer's host time in a training step, which the host sets: benchmarks/NOTES.md). torch.compile traces
    the custom op instead (deco_ffn_train picks). ``static``: size without a host synchronisation."""

    @staticmethod
    def forward(ctx, static, *inputs):  # ctx in forward: a separate setup_context costs an inspect.signature
        output = _forward(*inputs, static=static)
        _setup_context(ctx, inputs, output, static)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no [T, N] zeros for dg
        return output

    @staticmethod
    def backward(ctx, dy, dg, *_):
        # Under create_graph the custom op runs instead: the kernels have no derivative of their own, and its
        # outputs make a second backward raise rather than silently treat the first derivative as constant.
        return None, *_grads(ctx, dy, dg, deco_ffn_bwd if torch.is_grad_enabled() else _backward)


# ---------------------------------------------------------------------------------------------------------
# Entry point (ffn.deco_ffn routes calls that need autograd here)
# ---------------------------------------------------------------------------------------------------------
def _tracing(x) -> bool:
    """Whether a tracer runs the call (torch.compile's dynamo, or make_fx / AOTAutograd and any other dispatch
    mode, fake tensors included): then the custom op must run, the only one with a fake implementation."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or isinstance(x, torch._subclasses.FakeTensor))


def deco_ffn_train(x, w: dict, bias, threshold, max_active, gates=None):
    """Differentiable DECO layer on Triton, called by ffn.deco_ffn with x [T, d] (unit column stride), the
    contiguous canonical weights ``w`` by name and the knobs (max_active already None when >= N), or by
    deco_ffn_from_gates with ``gates`` [T, N] (w without w_router; the knobs unused). Returns (y [T, d],
    g [T, N] fp32), g differentiable (for the entropy regulariser). The knobs themselves get no gradient (a
    tensor bias is treated as a constant)."""
    tracing = _tracing(x)
    if tracing:
        shared = dense_swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    else:  # x passes through the shared expert's Function: the two gradients of x meet in its GEMMs
        shared, x = swiglu.shared_expert(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    n = w["router_scale"].shape[0]
    bias_value, bias_vec = ffn._bias_args(bias, n, x.device)
    if gates is not None:
        gates = gates.float().contiguous()
    inputs = (x, w.get("w_router"), w["router_scale"], w["w_up"], w["gamma"], w["w_down"], shared, bias_vec,
              bias_value, float(threshold), int(max_active or 0), gates)
    y, g, *_ = deco_ffn_fwd(*inputs) if tracing else _EagerDecoFfn.apply(_sync_free(x), *inputs)
    return y, g


def deco_ffn_from_gates(x, g, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, activation="norm_silu"):
    """The layer after its router on Triton; same contract as deco_kernels.ops.deco_ffn_from_gates (arguments
    arrive validated). Sparse in the pairs where g > 0, differentiable in x, g and the weights."""
    w = dict(router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down, ws_gate=ws_gate, ws_up=ws_up,
             ws_down=ws_down)
    ffn.check_expert_width(gamma.shape[0])
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = ffn.unit_stride_rows(x)
    y, _ = deco_ffn_train(x2, {k: v.contiguous() for k, v in w.items()}, 0.0, 0.0, None,
                          gates=g.reshape(-1, g.shape[-1]))
    return y.reshape(*lead, d)
