"""Properties of the plain-PyTorch reference (SPEC §1, §2, §4), mostly in float64 over hypothesis-drawn shapes.

The reference is the ground truth every kernel is checked against, so it is checked here against the spec's
formulas written out by hand (loops over tokens and experts) and against its own algebraic identities.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_layer, rel_err
from deco_kernels import reference as R

F64 = torch.float64
ACTIVE_MODES = [0.2, 0.5, "none", "all", "one"]


@st.composite
def layers(draw, dtype=F64, active=None):
    """A small random DECO layer: (x [T, d], weights) with T 0..9, d <= 48, N 1..13, de in {4, 8, 16}, ds <= 24."""
    T = draw(st.integers(0, 9))
    d = draw(st.integers(1, 48))
    N = draw(st.integers(1, 13))
    de = draw(st.sampled_from([4, 8, 16]))
    ds = draw(st.integers(1, 24))
    mode = draw(st.sampled_from(ACTIVE_MODES)) if active is None else active
    seed = draw(st.integers(0, 2**31 - 1))
    return make_layer(T, d, N, de, ds, dtype, seed=seed, active=mode)


def logits(draw_seed: int, T: int, N: int) -> torch.Tensor:
    """Router logits with both signs and distinct magnitudes."""
    return torch.randn(T, N, generator=torch.Generator().manual_seed(draw_seed), dtype=F64)


logit_shapes = st.tuples(st.integers(0, 9), st.integers(1, 13), st.integers(0, 2**31 - 1))


def silu_np(v):
    return v / (1.0 + np.exp(-v))


# ---------------------------------------------------------------------------------------------------------
# §1: skipping inactive experts is exact; mu from wbar
# ---------------------------------------------------------------------------------------------------------
@given(layers(), st.sampled_from(R.NORM_SILU_VARIANTS))
def test_sparse_equals_dense(layer, activation):
    x, w = layer
    _, gs = R.route(x, w["w_router"], w["router_scale"])
    dense = R.routed_experts(x, gs, w["w_up"], w["gamma"], w["w_down"], activation)
    sparse = R.routed_experts_sparse(x, gs, w["w_up"], w["gamma"], w["w_down"], activation)
    assert sparse.shape == dense.shape == (x.shape[0], x.shape[1])
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


@given(layers())
def test_mu_from_mean_row_of_w_up(layer):
    x, w = layer
    h = x @ w["w_up"].t()
    mu = x @ R.expert_mean_vector(w["w_up"])
    assert mu.shape == (x.shape[0],)
    torch.testing.assert_close(mu, h.mean(dim=-1), rtol=1e-10, atol=1e-12)


@given(layers())
def test_no_active_expert_gives_the_shared_expert(layer):
    x, w = layer
    shared = R.swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    y, g = R.deco_ffn(x, **w, bias=-1e6, return_gates=True)
    assert not (g > 0).any()
    assert torch.equal(y, shared)


def test_active_none_layer_gives_the_shared_expert():
    x, w = make_layer(9, 24, 7, 8, 12, F64, seed=3, active="none")
    assert torch.equal(R.deco_ffn(x, **w), R.swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"]))


# ---------------------------------------------------------------------------------------------------------
# §4: elastic knobs
# ---------------------------------------------------------------------------------------------------------
@given(logit_shapes)
def test_default_knobs_are_relu(shape):
    r = logits(shape[2], shape[0], shape[1])
    assert torch.equal(R.apply_knobs(r), torch.relu(r))
    assert torch.equal(R.apply_knobs(r, bias=0.0, threshold=0.0, max_active=None), torch.relu(r))


@given(layers())
def test_route_defaults(layer):
    x, w = layer
    g, gs = R.route(x, w["w_router"], w["router_scale"])
    r = x @ w["w_router"].t()
    assert torch.equal(g, torch.relu(r))
    assert torch.equal(gs, g * w["router_scale"])


@given(logit_shapes, st.floats(0, 3), st.floats(0, 3))
def test_higher_threshold_activates_a_subset(shape, t1, t2):
    lo, hi = sorted((t1, t2))
    r = logits(shape[2], shape[0], shape[1])
    act_lo = R.apply_knobs(r, threshold=lo) > 0
    act_hi = R.apply_knobs(r, threshold=hi) > 0
    assert not (act_hi & ~act_lo).any()                                    # subset
    assert (act_hi.sum(-1) <= act_lo.sum(-1)).all()                        # per-token count is monotone
    assert torch.equal(R.apply_knobs(r, threshold=hi), torch.where(r > hi, r, torch.zeros_like(r)))


def test_threshold_is_strict():
    r = torch.tensor([[0.5, 1.0, 1.5, -1.0]], dtype=F64)
    assert R.apply_knobs(r, threshold=1.0).tolist() == [[0.0, 0.0, 1.5, 0.0]]


def _keep_largest_loop(g: np.ndarray, k: int) -> np.ndarray:
    """max_active by hand: per token keep the k largest gates, ties to the lower index."""
    out = np.zeros_like(g)
    for t in range(g.shape[0]):
        order = sorted(range(g.shape[1]), key=lambda e: (-g[t, e], e))
        for e in order[:k]:
            out[t, e] = g[t, e]
    return out


@given(logit_shapes, st.integers(1, 14), st.booleans())
def test_max_active_keeps_the_largest(shape, k, with_ties):
    T, N, seed = shape
    r = logits(seed, T, N)
    if with_ties:  # round to a coarse grid so many gates are equal
        r = torch.round(r * 2) / 2
    g = R.apply_knobs(r, max_active=k)
    assert ((g > 0).sum(-1) <= k).all()
    np.testing.assert_array_equal(g.numpy(), _keep_largest_loop(torch.relu(r).numpy(), k))


def test_max_active_ties_go_to_the_lower_index():
    r = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5],
                      [3.0, 1.0, 1.0, 1.0, 1.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0],
                      [0.0, -1.0, 0.7, 0.0, 0.7]], dtype=F64)
    g = R.apply_knobs(r, max_active=2)
    assert g.tolist() == [[0.0, 2.0, 2.0, 0.0, 0.0],
                          [3.0, 1.0, 0.0, 0.0, 0.0],
                          [1.0, 1.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.7, 0.0, 0.7]]
    assert torch.equal(R.apply_knobs(r, max_active=5), torch.relu(r))
    assert torch.equal(R.apply_knobs(r, max_active=99), torch.relu(r))


@given(logit_shapes, st.floats(-3, 3), st.floats(-3, 3))
def test_bias_moves_the_active_count_monotonically(shape, b1, b2):
    lo, hi = sorted((b1, b2))
    r = logits(shape[2], shape[0], shape[1])
    act_lo = R.apply_knobs(r, bias=lo) > 0
    act_hi = R.apply_knobs(r, bias=hi) > 0
    assert not (act_lo & ~act_hi).any()
    assert (act_lo.sum(-1) <= act_hi.sum(-1)).all()
    assert torch.equal(R.apply_knobs(r, bias=torch.tensor(hi, dtype=F64)), R.apply_knobs(r, bias=hi))


@given(logit_shapes)
def test_per_expert_bias(shape):
    T, N, seed = shape
    r = logits(seed, T, N)
    bias = torch.linspace(-1, 1, N, dtype=F64)
    assert torch.equal(R.apply_knobs(r, bias=bias), torch.relu(r + bias))
    # Raising every expert's bias by a non-negative amount never deactivates an expert.
    more = R.apply_knobs(r, bias=bias + torch.rand(N, generator=torch.Generator().manual_seed(seed), dtype=F64))
    assert not ((R.apply_knobs(r, bias=bias) > 0) & ~(more > 0)).any()


def test_knob_order_bias_then_threshold_then_max_active():
    r = torch.tensor([[0.2, 0.9, 0.6, 1.2, -0.5]], dtype=F64)
    g = R.apply_knobs(r, bias=0.3, threshold=0.8, max_active=2)
    # r + bias = [0.5, 1.2, 0.9, 1.5, -0.2] -> above 0.8: [0, 1.2, 0.9, 1.5, 0] -> the 2 largest
    torch.testing.assert_close(g, torch.tensor([[0.0, 1.2, 0.0, 1.5, 0.0]], dtype=F64))


# ---------------------------------------------------------------------------------------------------------
# NormSiLU and its ablations against hand formulas
# ---------------------------------------------------------------------------------------------------------
def _activations_by_hand(x, w_up, gamma, N, activation, eps=1e-5):
    """Loops over tokens and experts: u = h - mean over all N*de entries; rms per expert; one gamma for all."""
    x, w_up, gamma = x.numpy(), w_up.numpy(), gamma.numpy()
    T, de = x.shape[0], w_up.shape[0] // N
    out = np.zeros((T, N, de))
    for t in range(T):
        h = w_up @ x[t]
        mu = h.mean()
        for e in range(N):
            he = h[e * de:(e + 1) * de]
            if activation == "silu":
                n = he
            elif activation == "norm_silu_norms":
                n = he - mu
            else:
                u = he - mu if activation == "norm_silu" else he
                n = gamma * u / math.sqrt((u ** 2).mean() + eps)
            out[t, e] = silu_np(n)
    return torch.from_numpy(out)


@given(layers(), st.sampled_from(R.NORM_SILU_VARIANTS))
def test_norm_silu_variants_by_hand(layer, activation):
    x, w = layer
    N = w["w_router"].shape[0]
    act = R.expert_activations(x, w["w_up"], w["gamma"], N, activation)
    torch.testing.assert_close(act, _activations_by_hand(x, w["w_up"], w["gamma"], N, activation),
                               rtol=1e-9, atol=1e-12)


def test_norm_silu_eps_is_1e_5():
    # Deviations of 1e-3 make mean(u^2) ~ 1e-6, so eps = 1e-5 dominates and any other eps would show.
    T, N, de, d = 2, 3, 4, 5
    x = torch.randn(T, d, dtype=F64, generator=torch.Generator().manual_seed(0))
    w_up = torch.randn(N * de, d, dtype=F64, generator=torch.Generator().manual_seed(1)) * 1e-3
    gamma = torch.linspace(0.5, 2.0, de, dtype=F64)
    act = R.expert_activations(x, w_up, gamma, N)
    torch.testing.assert_close(act, _activations_by_hand(x, w_up, gamma, N, "norm_silu", eps=1e-5),
                               rtol=1e-9, atol=1e-15)
    assert rel_err(act, _activations_by_hand(x, w_up, gamma, N, "norm_silu", eps=1e-6)) > 0.1


def test_gamma_is_shared_by_all_experts():
    # Two experts with identical rows give identical activations: one gamma vector for all of them.
    d, de = 6, 4
    block = torch.randn(de, d, dtype=F64, generator=torch.Generator().manual_seed(2))
    w_up = torch.cat([block, block, -block])
    x = torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(3))
    act = R.expert_activations(x, w_up, torch.tensor([0.5, 1.0, 2.0, -1.0], dtype=F64), 3)
    assert torch.equal(act[:, 0], act[:, 1])


def test_norm_silu_argument_errors():
    u = torch.randn(2, 3, 4, dtype=F64)
    with pytest.raises(ValueError, match="activation"):
        R.norm_silu(u, torch.ones(4, dtype=F64), torch.zeros(2, 1, 1, dtype=F64), "gelu")
    with pytest.raises(ValueError, match="mu"):
        R.norm_silu(u, torch.ones(4, dtype=F64), None, "norm_silu")
    # The variants that do not subtract the mean do not need it.
    R.norm_silu(u, torch.ones(4, dtype=F64), None, "norm_silu_nomean")
    R.norm_silu(u, torch.ones(4, dtype=F64), None, "silu")


# ---------------------------------------------------------------------------------------------------------
# §2: sparsity regulariser and its adaptive coefficient
# ---------------------------------------------------------------------------------------------------------
G_SMALL = [[1.0, 0.0, 3.0, 0.0],
           [0.0, 0.0, 0.0, 0.0],      # no active expert: contributes 0
           [2.0, 2.0, 0.0, 0.0],
           [0.5, 0.0, 0.0, 0.0],
           [0.25, 0.5, 1.0, 2.0]]


def _entropy_by_hand(g):
    hs = []
    for row in g:
        s = sum(row) + 1e-5
        hs.append(-sum((v / s) * math.log(v / s + 1e-5) for v in row))
    return hs


def test_gate_entropy_by_hand():
    h = R.gate_entropy(torch.tensor(G_SMALL, dtype=F64))
    torch.testing.assert_close(h, torch.tensor(_entropy_by_hand(G_SMALL), dtype=F64), rtol=1e-12, atol=0)
    assert h[1].item() == 0.0
    assert abs(h[2].item() - math.log(2)) < 1e-4      # two equal gates: ~ln 2


@pytest.mark.parametrize("lam,num_layers", [(1.0, 1), (0.3, 4), (1e-8, 16)])
def test_entropy_loss_by_hand(lam, num_layers):
    expected = lam * sum(_entropy_by_hand(G_SMALL)) / len(G_SMALL) / num_layers
    loss = R.entropy_loss(torch.tensor(G_SMALL, dtype=F64), lam, num_layers)
    assert loss.dim() == 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_entropy_loss_scaling_and_shape():
    g = torch.tensor(G_SMALL, dtype=F64)
    base = R.entropy_loss(g, 0.5, 3)
    torch.testing.assert_close(R.entropy_loss(g, 1.0, 3), 2 * base)
    torch.testing.assert_close(R.entropy_loss(g, 0.5, 6), base / 2)
    torch.testing.assert_close(R.entropy_loss(g, torch.tensor(0.5, dtype=F64), 3), base)
    torch.testing.assert_close(R.entropy_loss(g.view(1, 5, 4), 0.5, 3), base)   # leading dims are tokens
    assert R.entropy_loss(torch.zeros(3, 4, dtype=F64), 1.0, 2).item() == 0.0


def test_active_ratio():
    assert R.active_ratio(torch.tensor(G_SMALL)).item() == pytest.approx(9 / 20)
    assert R.active_ratio(torch.tensor(G_SMALL)).dtype == torch.float32


@given(st.floats(1e-10, 1.0), st.floats(0.0, 1.0), st.floats(0.01, 0.99), st.floats(1.0001, 2.0),
       st.floats(1e-10, 1e-2))
def test_update_lambda(lam, ratio, target, m, lam0):
    new = R.update_lambda(lam, ratio, target=target, multiplier=m, lam0=lam0)
    if ratio > target:
        assert new == pytest.approx(lam * m) and new > lam
    else:
        assert new == pytest.approx(max(lam / m, lam0)) and new >= lam0
        assert new < lam or lam <= lam0 * m


def test_update_lambda_edges():
    assert R.update_lambda(1.0, 0.2, target=0.2, multiplier=2.0) == 0.5      # at the target: relax
    assert R.update_lambda(1e-8, 0.0, multiplier=2.0, lam0=1e-8) == 1e-8    # stays at the floor
    assert R.update_lambda(1e-12, 0.0, multiplier=2.0, lam0=1e-8) == 1e-8   # below the floor: back to lam0
    lam = 1e-3
    for _ in range(200):                                                     # converges down to lam0
        lam = R.update_lambda(lam, 0.1, multiplier=1.5, lam0=1e-6)
    assert lam == 1e-6
    assert R.update_lambda(1e-6, 0.9, multiplier=1.5, lam0=1e-6) == pytest.approx(1.5e-6)


# ---------------------------------------------------------------------------------------------------------
# Empty batches
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("activation", R.NORM_SILU_VARIANTS)
def test_empty_batch(lead, activation):
    d, N, de, ds = 8, 5, 4, 6
    x, w = make_layer(lead, d, N, de, ds, F64)
    y, g = R.deco_ffn(x, **w, max_active=2, threshold=0.1, bias=0.5, return_gates=True, activation=activation)
    assert y.shape == (*lead, d) and y.dtype == F64
    assert g.shape == (*lead, N)
    x2 = x.reshape(0, d)
    g2, gs2 = R.route(x2, w["w_router"], w["router_scale"], max_active=1)
    assert g2.shape == gs2.shape == (0, N)
    assert R.expert_activations(x2, w["w_up"], w["gamma"], N, activation).shape == (0, N, de)
    assert R.routed_experts(x2, gs2, w["w_up"], w["gamma"], w["w_down"], activation).shape == (0, d)
    assert R.routed_experts_sparse(x2, gs2, w["w_up"], w["gamma"], w["w_down"], activation).shape == (0, d)
    assert R.swiglu(x2, w["ws_gate"], w["ws_up"], w["ws_down"]).shape == (0, d)
    assert R.rms_norm(x2, torch.ones(d, dtype=F64)).shape == (0, d)
    assert R.gate_entropy(g2).shape == (0,)
    assert R.entropy_loss(g2, 1.0, 3).item() == 0.0
    assert R.active_ratio(g2).item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", R.NORM_SILU_VARIANTS)
@pytest.mark.parametrize("knobs", [{}, {"threshold": 0.2, "max_active": 2}], ids=["default", "knobs"])
def test_gradcheck_deco_ffn(activation, knobs):
    x, w = make_layer(3, 5, 4, 4, 3, F64, seed=11, active=0.5, requires_grad=True)
    bias = torch.full((4,), 0.1, dtype=F64, requires_grad=True)
    g = R.route(x, w["w_router"], w["router_scale"], bias=bias, **knobs)[0]
    assert (g > 0).any() and (g == 0).any()
    # Finite differences must not cross a ReLU kink or a threshold/top-k boundary.
    r = (x @ w["w_router"].t() + bias).detach()
    assert (r.abs() > 1e-3).all() and ((r - knobs.get("threshold", 0)).abs() > 1e-3).all()

    def f(x, bias, *weights):
        return R.deco_ffn(x, *weights, bias=bias, activation=activation, **knobs)

    assert torch.autograd.gradcheck(f, (x, bias, *w.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_inactive_experts_get_no_router_gradient():
    T, d, N, de, ds = 6, 10, 7, 4, 5
    x, w = make_layer(T, d, N, de, ds, F64, seed=5, active=0.3, requires_grad=True)
    g = R.route(x, w["w_router"], w["router_scale"])[0].detach()
    assert (g > 0).any() and (g == 0).any()
    # Token by token: the w_router rows (and router_scale entries) of the inactive experts get exactly zero.
    for t in range(T):
        for p in w.values():
            p.grad = None
        R.deco_ffn(x[t:t + 1], **w).pow(2).sum().backward()
        off = g[t] <= 0
        assert torch.equal(w["w_router"].grad[off], torch.zeros_like(w["w_router"].grad[off]))
        assert torch.equal(w["router_scale"].grad[off], torch.zeros_like(w["router_scale"].grad[off]))
        assert (w["w_router"].grad[~off].abs().sum(-1) > 0).all()


def test_expert_inactive_for_every_token_gradients():
    # Expert `hot` serves every token and no other expert is active: the other experts' w_router, router_scale
    # and w_down blocks get zero gradient, but their w_up rows still get the (identical) gradient through mu.
    T, d, N, de, ds = 5, 9, 4, 4, 3
    x, w = make_layer(T, d, N, de, ds, F64, seed=9, active="one", hot_expert=2, requires_grad=True)
    R.deco_ffn(x, **w).pow(2).sum().backward()
    cold = [e for e in range(N) if e != 2]
    assert torch.equal(w["w_router"].grad[cold], torch.zeros(len(cold), d, dtype=F64))
    assert torch.equal(w["router_scale"].grad[cold], torch.zeros(len(cold), dtype=F64))
    w_down_grad = w["w_down"].grad.view(d, N, de)
    assert torch.equal(w_down_grad[:, cold], torch.zeros(d, len(cold), de, dtype=F64))
    up_grad = w["w_up"].grad.view(N, de, d)[cold].reshape(-1, d)
    assert up_grad.abs().sum() > 0
    torch.testing.assert_close(up_grad, up_grad[:1].expand_as(up_grad), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# Low precision inputs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("active", ACTIVE_MODES)
def test_low_precision_close_to_float64(dtype, tol, active):
    x, w = make_layer(13, 40, 11, 8, 24, dtype, seed=4, active=active)
    y, g = R.deco_ffn(x, **w, return_gates=True)
    assert y.dtype == dtype and g.dtype == torch.float32
    # The float64 result of the same (rounded) numbers: only the arithmetic differs.
    y64, g64 = R.deco_ffn(x.double(), **{k: v.double() for k, v in w.items()}, return_gates=True)
    assert rel_err(y, y64) <= tol
    assert rel_err(g, g64) <= 1e-6
