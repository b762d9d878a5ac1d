"""Shared helpers of the tests and the benchmarks: one weight factory and one error measure, so the two never
drift (tests/conftest.py re-exports them; benchmarks/ and ``deco-kernels bench`` import them from here).

- ``make_layer(T, d, N, de, ds, ...)``: x and the 8 canonical weights of one DECO layer at trained-like scales,
  with a controllable active fraction ("none", "all", "one" expert for every token, or a probability).
- ``make_dense_twin(d, d_ff, ...)``: the weights of the dense SwiGLU twin of width d_ff at the same scales.
- ``rel_err(out, ref)``: ||ref - out|| / ||ref||, the error measure of every comparison; ``REL_TOL`` the
  budgets of a whole layer against the float64 reference, by dtype; ``GPU_REL_TOL`` the issues' bounds at
  preset sizes on the GPU.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import torch

from .reference.ops import WEIGHT_NAMES

# Relative-error budgets of a whole DECO layer against the float64 reference, by the dtype of x. bf16 and fp16
# are dominated by rounding the output (and the activations) to 8 / 11 mantissa bits.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# The issues' acceptance bounds of a layer's output on the GPU against the reference, at preset sizes (the gpu
# tests' bounds; fp32 with TF32 off): what `deco-kernels bench` flags a timed output beyond.
GPU_REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||ref - out|| / ||ref|| (Frobenius, in float64); ||out|| when ref is all zero (or empty)."""
    out = out.detach().to(device="cpu", dtype=torch.float64)
    ref = ref.detach().to(device="cpu", dtype=torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"out, ref: shapes differ, {tuple(out.shape)} vs {tuple(ref.shape)}")
    ref_norm = torch.linalg.vector_norm(ref).item()
    if ref_norm == 0:
        return torch.linalg.vector_norm(out).item()
    return torch.linalg.vector_norm(ref - out).item() / ref_norm


# A DECO layer with a controllable active set.
_ROUTER_MARGIN = 1.0  # logit distance from 0 for the forced modes: robust to bf16 rounding and fp32 routing


def make_layer(T, d: int, N: int, de: int, ds: int, dtype=torch.float32, device="cpu", seed: int = 0,
               active=0.2, *, hot_expert: int | None = None, requires_grad: bool = False):
    """x and the 8 canonical weights of one DECO layer (SPEC §1), as ``(x, weights)``.

    ``ops.deco_ffn(x, **weights)`` runs it. ``T`` is the number of tokens, or a tuple of leading dims of x.
    Values are drawn in float64 on the CPU from ``seed`` and then cast, so every dtype and device gets the
    same numbers up to rounding: compare a bf16 or GPU run with the float64 CPU reference of the same seed.

    Scales are trained-like, not the 0.01 init, so the routed and the shared parts of y are both O(1) and an
    error in either shows: x ~ N(0, 1), router logits ~ N(0, 1) plus a per-expert offset, h = x @ w_up^T
    ~ N(0, 1), router_scale in [0.5, 1.5], gamma = 1 + 0.1 N(0, 1), w_down and ws_down scaled so y ~ O(1).

    The active set is controlled through a constant feature, x[..., 0] = 1 (a bias folded into
    w_router[:, 0]; when d == 1 the constant is all there is). ``active``:
      - a probability p (float, or a string like "0.2"): each (token, expert) gate is > 0 with probability p
        (exactly 0 and 1 mean "none" and "all");
      - "none": no gate > 0 for any token (y is the shared expert alone);
      - "all": every gate > 0 for every token;
      - "one": expert ``hot_expert`` (default N // 2) is active for every token, no other expert is.
    The forced modes hold exactly for the generated x in every dtype: their logits are at least 1 away from 0,
    far more than bf16 rounding of the weights moves them.
    With ``requires_grad`` every returned tensor is a leaf that requires grad.
    """
    lead = tuple(T) if isinstance(T, (tuple, list, torch.Size)) else (int(T),)
    if min((d, N, de, ds)) < 1 or any(t < 0 for t in lead):
        raise ValueError(f"T, d, N, de, ds: expected T >= 0 and positive sizes, got {lead}, {d}, {N}, {de}, {ds}")
    mode = active
    if not isinstance(active, str) or active not in ("none", "all", "one"):
        p = float(active)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"active: expected a probability in [0, 1] or 'none' / 'all' / 'one', got {active!r}")
        mode = "none" if p == 0.0 else "all" if p == 1.0 else p
    hot = N // 2 if hot_expert is None else hot_expert
    if mode == "one" and not 0 <= hot < N:
        raise ValueError(f"hot_expert: expected an index in [0, {N}), got {hot_expert}")

    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=f64) * std

    def rounded(t):  # the values the caller will actually see in `dtype`
        return t.to(dtype).to(f64)

    T_flat = math.prod(lead)
    x = randn(T_flat, d)
    x[:, 0] = 1.0
    w_router = randn(N, d, std=1.0 / math.sqrt(max(d - 1, 1)))
    router_scale = 0.5 + torch.rand(N, generator=gen, dtype=f64)
    w_up = randn(N * de, d, std=1.0 / math.sqrt(d))
    gamma = 1.0 + randn(de, std=0.1)
    w_down_raw = randn(d, N * de)
    ws_gate = randn(ds, d, std=1.0 / math.sqrt(d))
    ws_up = randn(ds, d, std=1.0 / math.sqrt(d))
    ws_down = randn(d, ds, std=1.0 / math.sqrt(ds))

    # Router offsets b (in w_router[:, 0]) from the logits of the non-constant features.
    w_router[:, 0] = 0.0
    if mode in ("none", "all", "one"):
        r_rest = rounded(x) @ rounded(w_router).t()                      # [T, N], the part b is added to
        bound = r_rest.abs().amax(dim=0) if T_flat else torch.zeros(N, dtype=f64)
        b = bound + _ROUTER_MARGIN
        if mode == "none":
            b = -b
        elif mode == "one":
            b = torch.where(torch.arange(N) == hot, b, -b)
        n_active = {"none": 1, "all": N, "one": 1}[mode]
    else:
        # The rest of the logit is ~ N(0, |w_e[1:]|^2) over tokens, so P(r > 0) = p with b = |w_e| ppf(p).
        b = torch.linalg.vector_norm(w_router[:, 1:], dim=1) * NormalDist().inv_cdf(mode)
        n_active = max(1.0, mode * N)
    w_router[:, 0] = b
    w_down = w_down_raw / math.sqrt(de * n_active)

    x = x.reshape(*lead, d)
    tensors = dict(x=x, w_router=w_router, router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down,
                   ws_gate=ws_gate, ws_up=ws_up, ws_down=ws_down)
    tensors = {k: v.to(device=device, dtype=dtype).requires_grad_(requires_grad) for k, v in tensors.items()}
    x = tensors.pop("x")
    return x, {name: tensors[name] for name in WEIGHT_NAMES}


def make_dense_twin(d: int, d_ff: int, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    """Weights of the dense SwiGLU twin of width ``d_ff`` ({w_gate, w_up} [d_ff, d], w_down [d, d_ff]), as
    ``ops.dense_swiglu(x, **weights)`` takes them; drawn like make_layer's (float64 on the CPU from ``seed``,
    then cast) at scales that keep the output O(1) for x ~ N(0, 1)."""
    if min(d, d_ff) < 1:
        raise ValueError(f"d, d_ff: expected positive sizes, got {d}, {d_ff}")
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(w_gate=((d_ff, d), d), w_up=((d_ff, d), d), w_down=((d, d_ff), d_ff))
    return {name: (torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)).to(device, dtype)
            for name, (shape, fan_in) in shapes.items()}
