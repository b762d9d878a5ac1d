"""Plain-PyTorch reference of every DECO op (SPEC §1, §2, §4).

Readable before fast: each function is the formula of the spec, written for any floating dtype. All
arithmetic runs in ``compute_dtype(x)`` (float32, or float64 for float64 inputs) and results are cast back to
the input dtype, so the reference is the ground truth the kernels are checked against.

Shapes: T tokens, d model width, N routed experts of width de, ds the shared expert's width.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-5
ENTROPY_EPS = 1e-5
NORM_SILU_VARIANTS = ("norm_silu", "norm_silu_nomean", "norm_silu_norms", "silu")
# The canonical weights of one DECO layer (SPEC §1), in the order deco_ffn takes them.
WEIGHT_NAMES = ("w_router", "router_scale", "w_up", "gamma", "w_down", "ws_gate", "ws_up", "ws_down")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Routing (SPEC §1 and the elastic knobs of §4)
# ---------------------------------------------------------------------------------------------------------
def router_logits(x: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """r = fp32(x) @ fp32(w_router)^T, [T, N]. Always at least fp32."""
    cd = compute_dtype(x)
    return x.to(cd) @ w_router.to(cd).t()


def apply_knobs(r: torch.Tensor, bias=0.0, threshold=0.0, max_active: int | None = None) -> torch.Tensor:
    """Gates from logits: g = relu(r + bias); g = 0 where g <= threshold; keep the max_active largest per
    token (ties: lower expert index first). ``bias`` is a float or a tensor broadcastable to [N]."""
    if isinstance(bias, torch.Tensor):
        bias = bias.to(r.dtype)  # a float64 bias must not promote fp32 gates
    g = torch.relu(r + bias)
    if threshold > 0:
        g = torch.where(g > threshold, g, torch.zeros_like(g))
    if max_active is not None and max_active < g.shape[-1]:
        # A stable descending sort keeps the lower index first among equal gates.
        order = torch.sort(g, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep.scatter_(-1, order[..., :max_active], True)
        g = torch.where(keep, g, torch.zeros_like(g))
    return g


def route(x, w_router, router_scale, *, bias=0.0, threshold=0.0, max_active=None):
    """Router of one DECO layer. Returns (g, gs): gates after the knobs and before the scale, and the scaled
    gates g * router_scale, both [T, N] in compute_dtype(x). Expert e is active for token t iff g[t, e] > 0."""
    g = apply_knobs(router_logits(x, w_router), bias, threshold, max_active)
    gs = g * router_scale.to(g.dtype)
    return g, gs


# ---------------------------------------------------------------------------------------------------------
# EMoE-style elastic training for ReLU routing (SPEC §4, last paragraph; a proposal, not the paper's code)
# ---------------------------------------------------------------------------------------------------------
def bias_for_ratio(r: torch.Tensor, ratio: float, bias=0.0, threshold=0.0) -> torch.Tensor:
    """The extra bias δ (0-d tensor on r's device, no gradient) with which round(ratio * r.numel()) of the
    gates relu(r + bias + δ) are > threshold, ties aside (max_active may cut more). ``ratio`` in (0, 1]."""
    if isinstance(bias, torch.Tensor):
        bias = bias.to(r.dtype)
    v = (r.detach() + bias - threshold).reshape(-1)  # gate on iff v + δ > 0
    if v.numel() == 0:
        return torch.zeros((), dtype=r.dtype, device=r.device)
    n_off = v.numel() - max(1, round(ratio * v.numel()))
    if n_off <= 0:
        return 1.0 - v.min()
    return -torch.kthvalue(v, n_off).values


def _descending_rank(v: torch.Tensor) -> torch.Tensor:
    """rank[..., e] = position of e when the last dim is sorted in descending order (ties: lower index first)."""
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices
    positions = torch.arange(v.shape[-1], device=v.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def coactivation_gates(r: torch.Tensor, g: torch.Tensor, pool_multiplier: float, scores: torch.Tensor,
                       bias=0.0) -> torch.Tensor:
    """EMoE co-activation sampling under ReLU routing, deterministic given ``scores`` [..., N] (uniform
    random numbers in [0, 1) for sampling).

    Per token, with A = {e: g[e] > 0} its active set (g: gates from r by any rule) and z = r + bias:
      pool P  = the top p experts by z (ties: lower index first), p = max(|A|, min(ceil(m * |A|), N - 1)):
                the lowest-ranked expert joins only when all N are active, so an expert outside P always
                marks the pool's edge;
      kept S  = the |A| members of P with the largest scores: the number of active experts is unchanged;
      gates   = relu(z + δ) on S, 0 elsewhere, δ = max(0, -z_p) with z_p the largest logit outside P: the
                gates inference would give with the smallest per-token bias under which all of P is active.
                A token whose pool is no larger than A keeps δ = 0, so m = 1 returns g's active set with the
                gates relu(z). δ carries no gradient; the kept gates do, through r. ``threshold`` and
                ``max_active`` act through A only.
    """
    if pool_multiplier < 1:
        raise ValueError(f"pool_multiplier: expected a number >= 1, got {pool_multiplier!r}")
    if scores.shape != r.shape or g.shape != r.shape:
        raise ValueError(f"g, scores: expected the shape of r {tuple(r.shape)}, got {tuple(g.shape)} and "
                         f"{tuple(scores.shape)}")
    n = r.shape[-1]
    z = r + (bias.to(r.dtype) if isinstance(bias, torch.Tensor) else bias)
    size = (g > 0).sum(dim=-1, keepdim=True)
    # - 1e-9: m * |A| that is a whole number up to rounding (1.1 * 10) must not round up to the next one
    enlarged = torch.clamp(torch.ceil(size * pool_multiplier - 1e-9).long(), max=n - 1)
    pool = torch.maximum(size, enlarged)
    in_pool = _descending_rank(z.detach()) < pool
    z_edge = torch.sort(z.detach(), dim=-1, descending=True).values.gather(-1, torch.clamp(pool, max=n - 1))
    delta = torch.where(pool > size, torch.clamp(-z_edge, min=0.0), torch.zeros_like(z_edge))
    keep = in_pool & (_descending_rank(torch.where(in_pool, scores.to(r.dtype), -1.0)) < size)
    return torch.where(keep, torch.relu(z + delta), torch.zeros_like(z))


def elastic_training_gates(r: torch.Tensor, *, bias=0.0, threshold=0.0, max_active: int | None = None,
                           prob: float = 0.0, pool_multiplier: float = 1.0,
                           budget_range: tuple[float, float] | None = None, target_ratio: float = 0.2,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Gates [..., N] for one training forward under EMoE-style elastic training (SPEC §4).

    With probability ``prob`` (one draw per call) the call is elastic:
      1. random budget, if ``budget_range`` = (lo, hi): rho ~ Uniform(lo, hi) and the bias gets the extra
         δ = bias_for_ratio(r, min(1, rho * target_ratio), bias, threshold), so that about rho * target_ratio
         of the gates are active;
      2. co-activation sampling, if ``pool_multiplier`` m > 1: coactivation_gates with uniform scores.
    Otherwise, and always when ``prob`` is 0 (nothing is drawn then), the gates are
    apply_knobs(r, bias, threshold, max_active). Random numbers come from ``generator`` (on its device), else
    from torch's global RNG: the draw and rho on the CPU (no device sync), the scores on r's device.
    """
    if not 0 <= prob <= 1:
        raise ValueError(f"prob: expected a probability in [0, 1], got {prob!r}")
    if prob == 0 or _uniform((), generator).item() >= prob:
        return apply_knobs(r, bias, threshold, max_active)
    if budget_range is not None:
        lo, hi = budget_range
        rho = lo + (hi - lo) * _uniform((), generator).item()
        bias = bias + bias_for_ratio(r, min(1.0, rho * target_ratio), bias, threshold)
    g = apply_knobs(r, bias, threshold, max_active)
    if pool_multiplier > 1:
        scores = _uniform(r.shape, generator, r.device).to(r.device)
        g = coactivation_gates(r, g, pool_multiplier, scores, bias)
    return g


def _uniform(shape, generator: torch.Generator | None, device=None) -> torch.Tensor:
    """Uniform [0, 1) numbers from ``generator`` on its device, else from the global RNG on ``device``
    (default CPU)."""
    if generator is not None:
        device = generator.device
    return torch.rand(shape, generator=generator, device=device)


# ---------------------------------------------------------------------------------------------------------
# NormSiLU and the routed experts
# ---------------------------------------------------------------------------------------------------------
def expert_mean_vector(w_up: torch.Tensor) -> torch.Tensor:
    """wbar: the mean of the rows of w_up, so that mean(x @ w_up^T) = x @ wbar."""
    return w_up.to(compute_dtype(w_up)).mean(dim=0)


def norm_silu(u: torch.Tensor, gamma: torch.Tensor, mu: torch.Tensor | None = None,
              activation: str = "norm_silu", eps: float = NORM_EPS) -> torch.Tensor:
    """NormSiLU of pre-activations ``u`` [..., N, de] with the layer's global mean ``mu`` [..., 1, 1].

    norm_silu:        silu(gamma * (u - mu) / rms(u - mu))      rms over each expert's de entries
    norm_silu_nomean: silu(gamma * u / rms(u))
    norm_silu_norms:  silu(u - mu)
    silu:             silu(u)
    """
    if activation not in NORM_SILU_VARIANTS:
        raise ValueError(f"activation: expected one of {NORM_SILU_VARIANTS}, got {activation!r}")
    if activation in ("norm_silu", "norm_silu_norms"):
        if mu is None:
            raise ValueError(f"mu: activation {activation!r} needs the global mean mu")
        u = u - mu
    if activation in ("norm_silu", "norm_silu_nomean"):
        u = gamma.to(u.dtype) * u * torch.rsqrt(u.pow(2).mean(dim=-1, keepdim=True) + eps)
    return F.silu(u)


def expert_activations(x, w_up, gamma, num_experts: int, activation: str = "norm_silu"):
    """silu(NormSiLU(x @ w_up^T)) for ALL experts, [T, N, de], in compute_dtype(x)."""
    cd = compute_dtype(x)
    h = x.to(cd) @ w_up.to(cd).t()
    mu = h.mean(dim=-1, keepdim=True).unsqueeze(-1)
    # explicit sizes, not -1: a view with -1 is ambiguous when T = 0
    return norm_silu(h.view(x.shape[0], num_experts, w_up.shape[0] // num_experts), gamma, mu, activation)


def scaled_combine(act: torch.Tensor, gs: torch.Tensor, w_down: torch.Tensor,
                   shared: torch.Tensor | None = None) -> torch.Tensor:
    """y = (act * gs[..., None]).view(T, N*de) @ w_down^T (+ shared), in act's dtype."""
    a = act * gs.to(act.dtype).unsqueeze(-1)
    y = a.reshape(a.shape[0], a.shape[1] * a.shape[2]) @ w_down.to(act.dtype).t()
    return y if shared is None else y + shared.to(y.dtype)


def routed_experts(x, gs, w_up, gamma, w_down, activation: str = "norm_silu"):
    """The routed part of the layer by the dense formula: every expert is computed and inactive ones are
    multiplied by their zero gate (this is what the authors' training code does)."""
    act = expert_activations(x, w_up, gamma, gs.shape[-1], activation)
    return scaled_combine(act, gs, w_down)


def routed_experts_sparse(x, gs, w_up, gamma, w_down, activation: str = "norm_silu"):
    """The same function computed expert by expert over active (token, expert) pairs only, with mu from
    x @ wbar: the algorithm the kernels implement, spelled out."""
    cd = compute_dtype(x)
    T, N = gs.shape
    de = w_up.shape[0] // N
    xc = x.to(cd)
    mu = (xc @ expert_mean_vector(w_up).to(cd)).view(T, 1, 1)
    y = torch.zeros(T, w_down.shape[0], dtype=cd, device=x.device)
    for e in range(N):
        tokens = (gs[:, e] != 0).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        rows = slice(e * de, (e + 1) * de)
        h = xc[tokens] @ w_up[rows].to(cd).t()
        act = norm_silu(h.view(-1, 1, de), gamma, mu[tokens], activation).view(-1, de)
        y.index_add_(0, tokens, (act * gs[tokens, e, None].to(cd)) @ w_down[:, rows].to(cd).t())
    return y


# ---------------------------------------------------------------------------------------------------------
# Shared expert and the whole layer
# ---------------------------------------------------------------------------------------------------------
def swiglu(x, w_gate, w_up, w_down):
    """(silu(x @ w_gate^T) * (x @ w_up^T)) @ w_down^T in compute_dtype(x): the shared expert, the dense
    layer 0 and the dense twin."""
    cd = compute_dtype(x)
    xc = x.to(cd)
    return (F.silu(xc @ w_gate.to(cd).t()) * (xc @ w_up.to(cd).t())) @ w_down.to(cd).t()


def deco_ffn(x, w_router, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *,
             bias=0.0, threshold=0.0, max_active=None, return_gates=False, activation="norm_silu"):
    """One DECO FFN layer (SPEC §1) on x [..., d]. Returns y [..., d] in x's dtype, or (y, g) with
    ``return_gates`` where g [..., N] are the gates after the knobs and before the scale (fp32, or float64
    for float64 input). Differentiable in every input."""
    g = apply_knobs(router_logits(x.reshape(-1, x.shape[-1]), w_router), bias, threshold, max_active)
    g = g.reshape(*x.shape[:-1], g.shape[-1])
    y = deco_ffn_from_gates(x, g, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, activation)
    return (y, g) if return_gates else y


def deco_ffn_from_gates(x, g, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down,
                        activation="norm_silu"):
    """The layer of SPEC §1 after the router: x [..., d] and its gates g [..., N] (before router_scale, from
    any gate rule: the knobs, or elastic_training_gates) -> y [..., d] in x's dtype."""
    lead = x.shape[:-1]
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    gs = g2 * router_scale.to(g2.dtype)
    y = routed_experts(x2, gs, w_up, gamma, w_down, activation) + swiglu(x2, ws_gate, ws_up, ws_down)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Sparsity regularisation (SPEC §2)
# ---------------------------------------------------------------------------------------------------------
def gate_entropy(g: torch.Tensor) -> torch.Tensor:
    """H[t] = -sum_e p ln(p + eps) with p = g / (sum_e g + eps); a token with all gates zero gives 0."""
    p = g / (g.sum(dim=-1, keepdim=True) + ENTROPY_EPS)
    return -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)


def entropy_loss(g: torch.Tensor, lam: float | torch.Tensor, num_layers: int) -> torch.Tensor:
    """L_ent = lam * mean_t H[t] / L_total for one DECO layer; g are the gates before the scale."""
    h = gate_entropy(g.reshape(-1, g.shape[-1]))
    mean_h = h.mean() if h.numel() else h.sum()
    return lam * mean_h / num_layers


def gate_stats(g: torch.Tensor, lam: float | torch.Tensor, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, active) of one DECO layer's gates g [..., N] in one call: loss = entropy_loss(g, lam, num_layers)
    (differentiable in g) and active = the number of gates > 0 (0-d int64, detached), which the training
    counters and the active ratio need. The kernels of the other backends fuse both into one launch."""
    return entropy_loss(g, lam, num_layers), (g.detach() > 0).sum()


def update_lambda(lam: float, active_ratio: float, target: float = 0.2, multiplier: float = 1.002,
                  lam0: float = 1e-8) -> float:
    """Adaptive coefficient, once per optimizer step: too many active gates -> stronger regulariser."""
    if active_ratio > target:
        return lam * multiplier
    return max(lam / multiplier, lam0)


def active_ratio(g: torch.Tensor) -> torch.Tensor:
    """Fraction of gates > 0 (0 for an empty batch), as a 0-d float32 tensor."""
    if g.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=g.device)
    return (g > 0).float().mean()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """RMSNorm in compute_dtype(x), cast back to x's dtype."""
    xc = x.to(compute_dtype(x))
    out = xc * torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(xc.dtype)
    return out.to(x.dtype)


__all__ = [
    "NORM_EPS", "ENTROPY_EPS", "NORM_SILU_VARIANTS", "WEIGHT_NAMES", "compute_dtype", "router_logits",
    "apply_knobs", "route",
    "bias_for_ratio", "coactivation_gates", "elastic_training_gates", "deco_ffn_from_gates",
    "expert_mean_vector", "norm_silu", "expert_activations", "scaled_combine", "routed_experts",
    "routed_experts_sparse", "swiglu", "deco_ffn", "gate_entropy", "entropy_loss", "gate_stats",
    "update_lambda", "active_ratio", "rms_norm",
]
