"""The shared expert of the training path, eager calls: SwiGLU with its gate nonlinearity fused on Triton.

torch's autograd of ``ops.dense_swiglu`` launches two GEMMs, silu and mul in the forward, and mul, mul,
silu_backward, four GEMMs and an add for x's two gradients in the backward. Here, with W_gu = [W_gate; W_up]
(concatenated once per forward, [2*ds, d]):
- forward: ONE GEMM ab = x W_gu^T [T, 2*ds] and ONE elementwise kernel h = silu(a) * b (fp32 math, rounded once
  to x's dtype), then the down GEMM (torch's autograd);
- backward: ONE tiled kernel writing (da, db) transposed into dt = [da^T; db^T] [2*ds, T], then ONE GEMM for
  both weight gradients, [dW_gate; dW_up] = dt x, with a row-major left operand (GEMMs over transposed views run
  as cuBLAS split-K kernels plus a reduce: for the router's weight gradients, a GEMM of the same kind, 17.3 µs
  against 11.5 for the stored transpose, H200 0.1b T=4096, results/h200/probe_router_wgrad_after.json), and ONE
  GEMM for x's gradient, addmm(dx_routed, dt^T, W_gu): x reaches the routed op through this Function
  (shared_expert returns it as a view), so x's gradient from there arrives here and joins the shared expert's
  inside the GEMM, no add kernel. It saves x, the weights (by reference), W_gu and ab (no silu(a) copy).

torch.compile traces ``ops.dense_swiglu`` instead (training.deco_ffn_train picks): inductor fuses the
elementwise ops itself. Under create_graph the backward recomputes through torch's differentiable ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import ffn
from ._jit import silu_mul
from .launch import launch

BLOCK = 1024                # elements per program of the forward kernel
BLOCK_T, BLOCK_S = 64, 64   # tile (tokens, hidden columns) of the backward kernel


@triton.jit
def _swiglu_fwd_kernel(ab_ptr, h_ptr, numel, S, BLOCK: tl.constexpr):
    """h [T, S] = silu(a) * b from ab [T, 2*S] = [a | b] (contiguous)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    cells = (offs // S) * (2 * S) + offs % S
    a = tl.load(ab_ptr + cells, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + cells + S, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs, silu_mul(a, b).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(ab_ptr, dh_ptr, dt_ptr, T, S, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """From ab [T, 2*S] = [a | b] and dh [T, S] (contiguous): da = dh b silu'(a), silu'(a) = sig (1 + a (1 - sig))
    (torch's silu_backward), and db = dh silu(a), stored transposed: dt [2*S, T] = [da^T; db^T]."""
    ts = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    ss = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    mask = (ts < T)[:, None] & (ss < S)[None, :]
    cells = ts[:, None] * (2 * S) + ss[None, :]
    a = tl.load(ab_ptr + cells, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ab_ptr + cells + S, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + ts[:, None] * S + ss[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    out = dt_ptr + ss[None, :] * T + ts[:, None]
    tl.store(out, (dh * b * sig * (1.0 + a * (1.0 - sig))).to(dt_ptr.dtype.element_ty), mask=mask)
    tl.store(out + S * T, (dh * a * sig).to(dt_ptr.dtype.element_ty), mask=mask)


class _SwiGLUHidden(torch.autograd.Function):
    """(h, x') for rows x [T, d]: h = silu(x W_gate^T) * (x W_up^T), and x' = x (a view) for the routed op, so
    that x's gradient from the routed op arrives here and the GEMMs of x's gradient add into it."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up):
        w_gu = torch.cat((w_gate, w_up))   # [2*S, d]: one GEMM for both projections, and one for x's gradient
        ab = F.linear(x, w_gu)             # [T, 2*S] = [a | b]
        T, S = ab.shape[0], w_gate.shape[0]
        h = ffn._empty(T, S, device=ab.device, dtype=ab.dtype)
        if h.numel():
            launch(_swiglu_fwd_kernel, (ffn.cdiv(h.numel(), BLOCK),), ab, h, h.numel(), S, BLOCK=BLOCK)
        ctx.save_for_backward(x, w_gate, w_up, w_gu, ab)
        ctx.set_materialize_grads(False)
        return h, x.view_as(x)

    @staticmethod
    def backward(ctx, dh, dx_routed):
        x, w_gate, w_up, w_gu, ab = ctx.saved_tensors
        need_x, need_gate, need_up = ctx.needs_input_grad
        if dh is None:
            return dx_routed, None, None
        if torch.is_grad_enabled():  # create_graph: torch's differentiable formula, recomputed from the inputs
            inputs = (x, w_gate, w_up)
            h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
            got = iter(torch.autograd.grad(h, wanted, dh, create_graph=True))
            grads = [next(got) if need else None for need in ctx.needs_input_grad]
            if need_x and dx_routed is not None:
                grads[0] = grads[0] + dx_routed
            return tuple(grads)
        dh = dh.contiguous()
        T, S = ab.shape[0], w_gate.shape[0]
        dt = ffn._empty(2 * S, T, device=ab.device, dtype=ab.dtype)    # [da^T; db^T]
        if dt.numel():
            launch(_swiglu_bwd_kernel, (ffn.cdiv(T, BLOCK_T), ffn.cdiv(S, BLOCK_S)), ab, dh, dt, T, S,
                   BLOCK_T=BLOCK_T, BLOCK_S=BLOCK_S)
        dx = None
        if need_x:  # [da | db] [W_gate; W_up], added into the routed op's gradient by the GEMM (addmm)
            dx = dt.t() @ w_gu if dx_routed is None else torch.addmm(dx_routed, dt.t(), w_gu)
        dw = dt @ x if need_gate or need_up else None    # [dW_gate; dW_up], one GEMM
        return dx, dw[:S] if need_gate else None, dw[S:] if need_up else None


def shared_expert(x, w_gate, w_up, w_down):
    """ops.dense_swiglu of rows x [T, d] (unit column stride) with the fused gate nonlinearity, eager only.
    Returns (y_shared, x'): x' is x (a view) to be passed to the routed op instead of x, so that x's gradient
    from there joins the shared expert's inside its GEMMs."""
    h, x_routed = _SwiGLUHidden.apply(x, w_gate, w_up)
    return F.linear(h, w_down), x_routed
