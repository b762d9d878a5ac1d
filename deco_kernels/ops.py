"""The functional API and its one dispatch point.

Every op has one name across backends: ``deco_kernels.reference.<op>`` (torch), ``deco_kernels.triton.<op>``
and ``deco_kernels.cupy.<op>``. The functions here validate arguments once, pick the backend and call it.
"""
from __future__ import annotations

import importlib
import sys

import torch

from . import backends
from ._validate import check_gate_stats, check_knobs, check_layer
from .reference import ops as ref

_BACKEND_MODULES = {"torch": "deco_kernels.reference", "triton": "deco_kernels.triton",
                    "cupy": "deco_kernels.cupy"}


def _impl(backend: str, op: str):
    # sys.modules first: torch.compile traces a dict lookup, but breaks the graph at importlib.import_module.
    name = _BACKEND_MODULES[backend]
    fn = getattr(sys.modules.get(name) or importlib.import_module(name), op, None)
    if fn is None:
        raise NotImplementedError(f"{op}: backend {backend!r} does not implement it; use backend='torch' or "
                                  f"'triton'")
    return fn


def _dispatch(op: str, backend: str, x, tensors, activation: str):
    """The implementation of ``op`` on the backend that runs (resolved once, with autograd's needs), after the
    activation checks shared by the layer ops."""
    if activation not in ref.NORM_SILU_VARIANTS:
        raise ValueError(f"activation: expected one of {ref.NORM_SILU_VARIANTS}, got {activation!r}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors))
    name = backends.resolve(backend, x.device, needs_grad)
    if name != "torch" and activation != "norm_silu":
        raise ValueError(f"activation: backend {name!r} implements only 'norm_silu' (the ablations "
                         f"run on backend='torch'), got {activation!r}")
    return _impl(name, op)


def deco_ffn(x, w_router, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *,
             bias=0.0, threshold=0.0, max_active=None, backend="auto", return_gates=False,
             activation="norm_silu"):
    """One DECO FFN layer (SPEC §1) on ``x`` [..., d].

    Weights in the canonical nn.Linear layout: w_router [N, d], router_scale [N], w_up [N*de, d], gamma [de],
    w_down [d, N*de], ws_gate and ws_up [ds, d], ws_down [d, ds]. Elastic knobs (SPEC §4): ``bias`` (number or
    tensor [] / [N]) added to the router logits, ``threshold`` >= 0 below which gates are cut, ``max_active``
    the most experts per token. ``backend``: "auto", "torch", "triton" or "cupy".

    Returns y [..., d] with x's dtype, or (y, g) with ``return_gates=True``, g [..., N] the fp32 gates after the
    knobs and before router_scale (float64 for float64 inputs on the torch backend).
    """
    weights = dict(w_router=w_router, router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down,
                   ws_gate=ws_gate, ws_up=ws_up, ws_down=ws_down)
    shape = check_layer(x, weights)
    check_knobs(bias, threshold, max_active, shape.num_experts, x.device)
    impl = _dispatch("deco_ffn", backend, x, weights.values(), activation)
    return impl(x, **weights, bias=bias, threshold=threshold, max_active=max_active, return_gates=return_gates,
                activation=activation)


def deco_ffn_from_gates(x, g, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *, backend="auto",
                        activation="norm_silu"):
    """The DECO layer after its router: x [..., d] and gates g [..., N] (before router_scale; from any gate rule,
    e.g. reference.elastic_training_gates for EMoE-style training) -> y [..., d] in x's dtype. Differentiable in
    x, g and the weights on "torch" and "triton"; an expert is computed for a token only where g > 0 (where a
    gate rule outputs 0 its derivative is 0 too, so no gradient is lost)."""
    weights = dict(router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down, ws_gate=ws_gate, ws_up=ws_up,
                   ws_down=ws_down)
    shape = check_layer(x, weights)
    if not isinstance(g, torch.Tensor) or tuple(g.shape) != (*x.shape[:-1], shape.num_experts):
        raise ValueError(f"g: expected a tensor of shape {(*x.shape[:-1], shape.num_experts)} (x's leading dims, "
                         f"N={shape.num_experts} from router_scale), got "
                         f"{tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__}")
    if g.device != x.device or not g.is_floating_point():
        raise ValueError(f"g: expected floating-point gates on {x.device}, got {g.dtype} on {g.device}")
    impl = _dispatch("deco_ffn_from_gates", backend, x, (g, *weights.values()), activation)
    return impl(x, g, **weights, activation=activation)


def gate_stats(g, lam, num_layers, *, backend="auto"):
    """The sparsity regulariser's statistics of one DECO layer (SPEC §2) from its gates g [..., N] (before
    router_scale): (loss, active), loss = lam * mean_t H[t] / num_layers (0-d, differentiable in g) and active
    = the number of gates > 0 (0-d int64, detached). ``lam``: a number or a 0-d tensor on g's device (never
    read on the host). One Triton launch each way on "triton" (fp32 g); torch ops on "torch"."""
    check_gate_stats(g, lam, num_layers)
    needs_grad = torch.is_grad_enabled() and (g.requires_grad or (isinstance(lam, torch.Tensor) and lam.requires_grad))
    name = backends.resolve(backend, g.device, needs_grad)
    # CuPy has no kernel for it: it resolves to cupy only without autograd (cupy has no backward, so a cupy
    # layer cannot train), e.g. a train-mode forward under no_grad, where the few torch ops are honest enough.
    return _impl("torch" if name == "cupy" else name, "gate_stats")(g, lam, num_layers)


def route(x, w_router, router_scale, *, bias=0.0, threshold=0.0, max_active=None):
    """Router with the elastic knobs: returns (g, gs), the fp32 gates before and after router_scale, [T, N]."""
    if x.dim() != 2 or w_router.dim() != 2 or x.shape[1] != w_router.shape[1]:
        raise ValueError(f"x, w_router: expected [T, d] and [N, d], got {tuple(x.shape)} and "
                         f"{tuple(w_router.shape)}")
    if tuple(router_scale.shape) != (w_router.shape[0],):
        raise ValueError(f"router_scale: expected shape ({w_router.shape[0]},) (N from w_router), "
                         f"got {tuple(router_scale.shape)}")
    check_knobs(bias, threshold, max_active, w_router.shape[0], x.device)
    return ref.route(x, w_router, router_scale, bias=bias, threshold=threshold, max_active=max_active)


def norm_silu(u, gamma, mu=None, activation="norm_silu"):
    """NormSiLU of per-expert pre-activations u [..., N, de] given the global mean mu [..., 1, 1]."""
    if u.shape[-1] != gamma.shape[-1]:
        raise ValueError(f"gamma: expected shape [{u.shape[-1]}] (the expert width of u), got {tuple(gamma.shape)}")
    return ref.norm_silu(u, gamma, mu, activation)


def scaled_combine(act, gs, w_down, shared=None):
    """y = (act * gs[..., None]).view(T, N*de) @ w_down^T (+ shared): the routed output plus the shared one."""
    if act.dim() != 3 or gs.shape != act.shape[:2] or w_down.shape[1] != act.shape[1] * act.shape[2]:
        raise ValueError(f"act, gs, w_down: expected [T, N, de], [T, N] and [d, N*de], got {tuple(act.shape)}, "
                         f"{tuple(gs.shape)} and {tuple(w_down.shape)}")
    return ref.scaled_combine(act, gs, w_down, shared)


def _swiglu_hidden(x, w_gate, w_up):
    return torch.nn.functional.silu(torch.nn.functional.linear(x, w_gate)) * torch.nn.functional.linear(x, w_up)


def dense_swiglu(x, w_gate, w_up, w_down):
    """The dense SwiGLU layer (layer 0, the shared expert, the dense twin) through torch's matmuls in x's
    dtype: cuBLAS on the GPU."""
    return torch.nn.functional.linear(_swiglu_hidden(x, w_gate, w_up), w_down)


def dense_swiglu_fp32(x, w_gate, w_up, w_down):
    """dense_swiglu of rows x [T, d] with an fp32 output: the seed of the CuPy prefill's fp32 accumulator."""
    return linear_fp32(_swiglu_hidden(x, w_gate, w_up), w_down)


def addmm_fp32(acc, a, b):
    """acc [T, d] fp32 + a [T, k] @ b [k, d], fp32, as a new tensor. On CUDA with 16-bit a and b, one cuBLAS GEMM
    reads acc as its C operand and writes fp32 (no rounding to a's dtype in between)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return torch.addmm(acc, a.float(), b.float())


def linear_fp32(h, w):
    """h [T, k] @ w^T [k, d] with an fp32 output. On CUDA with 16-bit h, cuBLAS writes the fp32 sums directly
    (no rounding to h's dtype and no separate cast pass over [T, d])."""
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(h, w.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(h, w).float()
