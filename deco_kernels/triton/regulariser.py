"""The sparsity regulariser's statistics of one DECO layer (SPEC §2) in one launch forward, one backward.

gate_stats(g, lam, num_layers) -> (loss, active): the entropy loss lam * mean_t H[t] / num_layers of the gates
g [..., N] and the number of gates > 0. In torch these are ~30 small launches per layer and training step (the
entropy's forward and autograd nodes, the active count), each costing host time; the training step is
host-bound, so here they are one kernel each way.

Forward: program p holds BLOCK_T whole rows (BLOCK_N >= N), computes H per row and stores its partial sums
of H and of the count of g > 0; the last program to arrive (an arrival counter, left at zero) adds the partials
in program order, so the result is bit-identical whichever program finishes last, and writes the loss and the
int64 count. lam is read on the device (a pointer), never on the host: reading it would sync.

Backward, per row with S = sum_e g, p = g / (S + eps), q_e = dH/dp_e = -(ln(p_e + eps) + p_e / (p_e + eps)):
dH/dg_e = (q_e - sum_j q_j p_j) / (S + eps), scaled by dloss * lam / (T * num_layers). A row with all gates
zero has p = 0 and a finite gradient -ln(eps) / eps, as the reference's autograd gives.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._validate import check_gate_stats
from ..reference import ops as ref
from . import ffn
from .launch import launch
from .training import _tracing

EPS = ref.ENTROPY_EPS
TILE = 4096        # elements of g per program (BLOCK_T rows of BLOCK_N): enough loads in flight per program
MAX_ROWS = 64      # rows per program at most (narrow N)
BLOCK_P = 256      # partials the last arriver adds per step


@triton.jit
def _row_entropy_terms(g_ptr, stride_t, stride_e, T, N, t0, eps, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows t0 .. t0+BLOCK_T-1 of g: (g, S + eps, p, mask) as fp32 tiles [BLOCK_T, BLOCK_N] (S + eps per row)."""
    rows = t0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < T)[:, None] & (cols < N)[None, :]
    g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_e,
                mask=mask, other=0.0)
    denom = tl.sum(g, axis=1) + eps
    p = g / denom[:, None]
    return g, denom, p, mask


@triton.jit
def _load_lam(lam_ptr, lam_value, LAM_PTR: tl.constexpr):
    if LAM_PTR:
        return tl.load(lam_ptr).to(tl.float32)
    return lam_value


@triton.jit
def _gate_stats_fwd_kernel(g_ptr, stride_t, stride_e, T, N, lam_ptr, lam_value, num_layers, eps,
                           part_ptr, counter_ptr, loss_ptr, active_ptr, LAM_PTR: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """part: fp32 [2, programs], each program's sum of H and its count of g > 0 (an integer <= BLOCK_T *
    BLOCK_N, exact in fp32: one buffer for both)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    g, denom, p, mask = _row_entropy_terms(g_ptr, stride_t, stride_e, T, N, pid * BLOCK_T, eps, BLOCK_T, BLOCK_N)
    # p = 0 (masked cells, inactive gates) adds 0 * ln(eps) = 0, as in the reference
    h = -tl.sum(p * tl.log(p + eps), axis=1)
    tl.store(part_ptr + pid, tl.sum(h, axis=0))
    tl.store(part_ptr + programs + pid, tl.sum(((g > 0) & mask).to(tl.int32), axis=None).to(tl.float32))
    tl.debug_barrier()
    if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == programs - 1:
        # Lane i adds partials i, i + BLOCK_P, ... in that order, then one tree sum: a fixed order.
        h_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        n_acc = tl.zeros([BLOCK_P], dtype=tl.int64)
        for p0 in range(0, programs, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            h_acc += tl.load(part_ptr + ps, mask=ps < programs, other=0.0, cache_modifier=".cg")
            n_acc += tl.load(part_ptr + programs + ps, mask=ps < programs, other=0.0,
                             cache_modifier=".cg").to(tl.int64)
        mean_h = tl.sum(h_acc, axis=0) / T
        tl.store(loss_ptr, _load_lam(lam_ptr, lam_value, LAM_PTR) * mean_h / num_layers)  # the reference's order
        tl.store(active_ptr, tl.sum(n_acc, axis=0))
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def _gate_stats_bwd_kernel(g_ptr, stride_t, stride_e, T, N, lam_ptr, lam_value, dloss_ptr, inv_count, eps,
                           dg_ptr, LAM_PTR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    t0 = tl.program_id(0) * BLOCK_T
    g, denom, p, mask = _row_entropy_terms(g_ptr, stride_t, stride_e, T, N, t0, eps, BLOCK_T, BLOCK_N)
    q = -(tl.log(p + eps) + p / (p + eps))
    qp = tl.sum(tl.where(mask, q * p, 0.0), axis=1)
    scale = tl.load(dloss_ptr).to(tl.float32) * _load_lam(lam_ptr, lam_value, LAM_PTR) * inv_count
    dg = (q - qp[:, None]) / denom[:, None] * scale
    rows = t0 + tl.arange(0, BLOCK_T)
    tl.store(dg_ptr + rows.to(tl.int64)[:, None] * N + tl.arange(0, BLOCK_N)[None, :], dg, mask=mask)


def _blocks(n: int) -> tuple[int, int]:
    block_n = ffn.pow2(n)
    return max(1, min(MAX_ROWS, TILE // block_n)), block_n


def _lam_args(lam, g2):
    """(pointer, value, LAM_PTR): a tensor lam is read by the kernel; the pointer slot then holds a dummy."""
    if isinstance(lam, torch.Tensor):
        return lam, 0.0, True
    return g2, float(lam), False


def _forward(g2, lam, num_layers):
    T, n = g2.shape
    dev = g2.device
    # Three allocations (an empty costs ~5 µs of host time on the H200 host: probe_launch.json).
    loss = ffn._empty((), device=dev, dtype=torch.float32)
    active = ffn._empty((), device=dev, dtype=torch.int64)
    if T == 0:  # the reference's empty mean: 0, and no launch
        return loss.zero_(), active.zero_()
    block_t, block_n = _blocks(n)
    programs = ffn.cdiv(T, block_t)
    part = ffn._empty(2, programs, device=dev, dtype=torch.float32)
    lam_ptr, lam_value, lam_is_ptr = _lam_args(lam, g2)
    launch(_gate_stats_fwd_kernel, (programs,), g2, g2.stride(0), g2.stride(1), T, n, lam_ptr, lam_value,
           num_layers, EPS, part, ffn._zeroed(dev, torch.int32, 1), loss, active, LAM_PTR=lam_is_ptr,
           BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_P=BLOCK_P)
    return loss, active


def _backward(dloss, g2, lam, num_layers):
    T, n = g2.shape
    dg = ffn._empty(T, n, device=g2.device, dtype=torch.float32)
    if T == 0:
        return dg
    block_t, block_n = _blocks(n)
    lam_ptr, lam_value, lam_is_ptr = _lam_args(lam, g2)
    launch(_gate_stats_bwd_kernel, (ffn.cdiv(T, block_t),), g2, g2.stride(0), g2.stride(1), T, n, lam_ptr,
           lam_value, dloss, 1.0 / (T * num_layers), EPS, dg, LAM_PTR=lam_is_ptr, BLOCK_T=block_t, BLOCK_N=block_n)
    return dg


class _GateStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g2, lam_tensor, lam, num_layers):
        # lam arrives twice: lam_tensor (a tensor or None) as an input autograd can see, lam as the kernel takes it
        loss, active = _forward(g2, lam, num_layers)
        ctx.mark_non_differentiable(active)
        ctx.save_for_backward(g2, lam_tensor)
        ctx.num_layers = num_layers
        ctx.lam = None if lam_tensor is not None else lam   # a tensor is saved above, not on ctx
        return loss, active

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss, _):
        g2, lam_tensor = ctx.saved_tensors
        dloss = dloss.float()
        dg = _backward(dloss, g2, ctx.lam if lam_tensor is None else lam_tensor, ctx.num_layers) \
            if ctx.needs_input_grad[0] else None
        dlam = None
        if ctx.needs_input_grad[1]:  # rare (λ is a buffer in DecoMoE): the forward again for mean_t H
            mean_h, _ = _forward(g2, 1.0, 1)
            dlam = (dloss * mean_h / ctx.num_layers).to(lam_tensor.dtype)
        return dg, dlam, None, None


def gate_stats(g: torch.Tensor, lam, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, active) of gates g [..., N] fp32 (any strides): loss = lam * mean_t H[t] / num_layers (0-d fp32,
    differentiable in g, and in lam when lam is a tensor that requires grad) and active = the number of gates
    > 0 (0-d int64). ``lam``: a number, or a 0-d floating tensor on g's device (read by the kernel: no host
    sync). Same contract as deco_kernels.reference.gate_stats, whose torch ops run under torch.compile
    (Inductor fuses them itself)."""
    check_gate_stats(g, lam, num_layers)
    if g.dtype != torch.float32:
        raise ValueError(f"g: the Triton gate_stats takes fp32 gates, got {g.dtype}"
                         + (" (use backend='torch' for float64)" if g.dtype == torch.float64 else " (pass g.float())"))
    lam_tensor = lam if isinstance(lam, torch.Tensor) else None
    if _tracing(g):
        return ref.gate_stats(g, lam, num_layers)
    # [T, N] as it comes: a reshape would add an autograd node (~20 µs of host time forward and backward)
    g2 = g if g.dim() == 2 else g.reshape(-1, g.shape[-1])
    return _GateStats.apply(g2, lam_tensor, lam, num_layers)
