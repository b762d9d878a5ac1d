"""The functional API (deco_kernels.ops): same numbers as the reference, argument validation, backend choice."""
from __future__ import annotations

import logging

import pytest
import torch

from conftest import DEVICES, make_layer
from deco_kernels import backends, ops
from deco_kernels import reference as R
from deco_kernels._validate import SAME_DTYPE_AS_X, WEIGHT_NAMES

T, D, N, DE, DS = 6, 24, 7, 8, 12
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16"), pytest.param(torch.float64, id="fp64")]
KNOBS = [pytest.param({}, id="default"),
         pytest.param({"bias": 0.3, "threshold": 0.1, "max_active": 3}, id="knobs"),
         pytest.param({"bias": torch.linspace(-0.5, 0.5, N)}, id="bias-per-expert")]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose the backend themselves: an exported DECO_BACKEND must not leak in."""
    monkeypatch.delenv("DECO_BACKEND", raising=False)


def layer(dtype=torch.float32, T=T, **kw):
    return make_layer(T, D, N, DE, DS, dtype, seed=1, **kw)


# ---------------------------------------------------------------------------------------------------------
# Same numbers as the reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", KNOBS)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_deco_ffn_equals_reference(dtype, knobs, backend):
    x, w = layer(dtype)
    y = ops.deco_ffn(x, **w, backend=backend, **knobs)
    y_ref = R.deco_ffn(x, **w, **knobs)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deco_ffn_return_gates(dtype):
    x, w = layer(dtype)
    y, g = ops.deco_ffn(x, **w, return_gates=True, max_active=2)
    y_ref, g_ref = R.deco_ffn(x, **w, return_gates=True, max_active=2)
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g.shape == (T, N)
    assert ((g > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("activation", R.NORM_SILU_VARIANTS)
def test_deco_ffn_activations(activation):
    x, w = layer()
    torch.testing.assert_close(ops.deco_ffn(x, **w, activation=activation),
                               R.deco_ffn(x, **w, activation=activation), rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(), (2, 3), (1, 1, 4), (0,), (3, 0, 2)], ids=str)
def test_deco_ffn_leading_dims(lead):
    x, w = make_layer(lead if lead else 1, D, N, DE, DS, torch.float32, seed=2)
    if not lead:
        x = x[0]                                   # a single token of shape [d]
    y, g = ops.deco_ffn(x, **w, return_gates=True)
    assert y.shape == x.shape and g.shape == (*x.shape[:-1], N)
    y_flat, g_flat = R.deco_ffn(x.reshape(-1, D), **w, return_gates=True)
    torch.testing.assert_close(y.reshape(-1, D), y_flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g.reshape(-1, N), g_flat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("view", ["transposed", "strided-tokens", "strided-features"])
def test_deco_ffn_non_contiguous_x(view):
    x, w = make_layer((4, 5), 2 * D, N, DE, DS, torch.float32, seed=3)
    if view == "transposed":                       # [5, 4, d] view of a [4, 5, d] tensor
        x = x[..., :D].transpose(0, 1)
    elif view == "strided-tokens":
        x = x[::2, :, :D]
    else:                                          # feature stride 2
        x = x[..., ::2]
    w = {k: v[:, :D] if k in ("w_router", "w_up", "ws_gate", "ws_up") else v for k, v in w.items()}
    w["w_down"], w["ws_down"] = w["w_down"][:D], w["ws_down"][:D]
    assert not x.is_contiguous()
    y = ops.deco_ffn(x, **w)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ops.deco_ffn(x.contiguous(), **w), rtol=1e-6, atol=1e-6)


def test_deco_ffn_is_differentiable_through_ops():
    x, w = make_layer(3, 6, 3, 4, 5, torch.float64, seed=4, active=0.5, requires_grad=True)
    ops.deco_ffn(x, **w, backend="torch").sum().backward()
    assert all(t.grad is not None for t in (x, *w.values()))


# ---------------------------------------------------------------------------------------------------------
# Validation: ValueErrors that name the argument
# ---------------------------------------------------------------------------------------------------------
def _grow(t: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] += 1
    return torch.zeros(shape, dtype=t.dtype)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_wrong_weight_shape(name):
    x, w = layer()
    for dim in range(w[name].dim()):
        bad = dict(w, **{name: _grow(w[name], dim)})
        with pytest.raises(ValueError, match=name):
            ops.deco_ffn(x, **bad)
    with pytest.raises(ValueError, match=name):
        ops.deco_ffn(x, **dict(w, **{name: w[name].unsqueeze(0)}))      # an extra dim


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_weight_not_a_tensor(name):
    x, w = layer()
    with pytest.raises(ValueError, match=name):
        ops.deco_ffn(x, **dict(w, **{name: w[name].tolist()}))


@pytest.mark.parametrize("name", SAME_DTYPE_AS_X)
def test_weight_dtype_mismatch(name):
    x, w = layer()
    with pytest.raises(ValueError, match=name):
        ops.deco_ffn(x, **dict(w, **{name: w[name].double()}))


@pytest.mark.parametrize("name", sorted(set(WEIGHT_NAMES) - set(SAME_DTYPE_AS_X)))
def test_router_and_gamma_may_have_another_dtype(name):
    # They are read in fp32 (SPEC §1), so e.g. an fp32 router next to bf16 experts is allowed.
    x, w = layer(torch.bfloat16)
    y = ops.deco_ffn(x, **dict(w, **{name: w[name].float()}))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_weight_device_mismatch(name):
    # The meta device stands in for a second device.
    x, w = layer()
    with pytest.raises(ValueError, match=name):
        ops.deco_ffn(x, **dict(w, **{name: w[name].to("meta")}))


def test_x_on_another_device():
    x, w = layer()
    with pytest.raises(ValueError, match="device"):
        ops.deco_ffn(x.to("meta"), **w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_x_integer_dtype(dtype):
    x, w = layer()
    with pytest.raises(ValueError, match="x"):
        ops.deco_ffn(x.to(dtype), **w)


def test_x_bad_shape():
    x, w = layer()
    with pytest.raises(ValueError, match="x"):
        ops.deco_ffn(torch.tensor(1.0), **w)
    with pytest.raises(ValueError, match="w_router"):                    # d of x disagrees with the weights
        ops.deco_ffn(x[:, :-1], **w)


@pytest.mark.parametrize("max_active", [0, -1, 1.5, 2.0, True, "3", torch.tensor(2)])
def test_bad_max_active(max_active):
    x, w = layer()
    with pytest.raises(ValueError, match="max_active"):
        ops.deco_ffn(x, **w, max_active=max_active)


@pytest.mark.parametrize("threshold", [-0.1, -1, "0.1", None, torch.tensor(0.1)])
def test_bad_threshold(threshold):
    x, w = layer()
    with pytest.raises(ValueError, match="threshold"):
        ops.deco_ffn(x, **w, threshold=threshold)


@pytest.mark.parametrize("bias", [torch.zeros(N + 1), torch.zeros(1, N), torch.zeros(1), "0.1", None,
                                  torch.zeros(N, device="meta")],
                         ids=["N+1", "1xN", "1", "str", "None", "meta"])
def test_bad_bias(bias):
    x, w = layer()
    with pytest.raises(ValueError, match="bias"):
        ops.deco_ffn(x, **w, bias=bias)


def test_good_knobs_accepted():
    x, w = layer()
    for knobs in ({"bias": 1}, {"bias": torch.tensor(0.5)}, {"bias": torch.zeros(N, dtype=torch.float64)},
                  {"threshold": 0}, {"threshold": 2}, {"max_active": 1}, {"max_active": N + 5}):
        ops.deco_ffn(x, **w, **knobs)


def test_unknown_backend():
    x, w = layer()
    with pytest.raises(ValueError, match="backend"):
        ops.deco_ffn(x, **w, backend="numpy")


def test_unknown_activation():
    x, w = layer()
    with pytest.raises(ValueError, match="activation"):
        ops.deco_ffn(x, **w, activation="gelu")


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [b for b in backends.BACKENDS if b != "torch"])
def test_unimplemented_backend_raises(name):
    if name in backends.IMPLEMENTED:
        pytest.skip(f"backend {name!r} is implemented; its own tests cover it")
    x, w = layer()
    with pytest.raises(NotImplementedError, match=name):
        ops.deco_ffn(x, **w, backend=name)


def test_autograd_goes_only_to_differentiable_backends(monkeypatch):
    # Triton has a backward (deco_kernels/triton/training.py), CuPy runs inference only: a call that needs
    # gradients must be refused there, and "auto" must skip such a backend when autograd needs one.
    assert backends.IMPLEMENTED - backends.DIFFERENTIABLE == {"cupy"}
    monkeypatch.setattr(backends, "DIFFERENTIABLE", {"torch"})
    monkeypatch.setattr(backends, "available", lambda name, device: name in backends.IMPLEMENTED)
    cuda = torch.device("cuda")
    with pytest.raises(NotImplementedError, match="inference only"):
        backends.resolve("triton", cuda, needs_grad=True)
    assert backends.resolve("triton", cuda, needs_grad=False) == "triton"
    assert backends.resolve("auto", cuda, needs_grad=True) == "torch"
    assert backends.resolve("auto", cuda, needs_grad=False) == "triton"


def test_auto_resolves_to_an_available_backend_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_announced", set())
    caplog.set_level(logging.INFO, logger="deco_kernels")
    x, w = layer()
    name = backends.resolve("auto", x.device)
    assert name in backends.BACKENDS and name in backends.IMPLEMENTED and backends.available(name, x.device)
    caplog.clear()
    monkeypatch.setattr(backends, "_announced", set())
    for _ in range(3):
        ops.deco_ffn(x, **w, backend="auto")
    records = [r for r in caplog.records if r.name == "deco_kernels" and "auto" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert repr(name) in records[0].getMessage()


def test_deco_backend_env_is_honoured_by_auto(monkeypatch):
    x, w = layer()
    monkeypatch.setenv("DECO_BACKEND", "torch")
    assert backends.resolve("auto", x.device) == "torch"
    monkeypatch.setenv("DECO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        ops.deco_ffn(x, **w, backend="auto")
    ops.deco_ffn(x, **w, backend="torch")                  # an explicit backend wins over the variable
    for name in sorted(set(backends.BACKENDS) - backends.IMPLEMENTED):
        monkeypatch.setenv("DECO_BACKEND", name)
        with pytest.raises(NotImplementedError, match=name):
            ops.deco_ffn(x, **w, backend="auto")
    monkeypatch.setenv("DECO_BACKEND", "")                 # empty means unset
    assert backends.resolve("auto", x.device) in backends.IMPLEMENTED


# ---------------------------------------------------------------------------------------------------------
# The single ops
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", KNOBS)
def test_route_equals_reference(dtype, knobs):
    x, w = layer(dtype)
    g, gs = ops.route(x, w["w_router"], w["router_scale"], **knobs)
    g_ref, gs_ref = R.route(x, w["w_router"], w["router_scale"], **knobs)
    assert g.dtype == gs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    torch.testing.assert_close(gs, gs_ref, rtol=0, atol=0)


def test_route_validates():
    x, w = layer()
    with pytest.raises(ValueError, match="x"):
        ops.route(x[None], w["w_router"], w["router_scale"])
    with pytest.raises(ValueError, match="w_router"):
        ops.route(x, w["w_router"][:, :-1], w["router_scale"])
    with pytest.raises(ValueError, match="max_active"):
        ops.route(x, w["w_router"], w["router_scale"], max_active=0)
    with pytest.raises(ValueError, match="threshold"):
        ops.route(x, w["w_router"], w["router_scale"], threshold=-1.0)
    with pytest.raises(ValueError, match="bias"):
        ops.route(x, w["w_router"], w["router_scale"], bias=torch.zeros(N + 1))


@pytest.mark.parametrize("shape", [(1,), (N + 1,), (N, 1)], ids=str)
def test_route_validates_router_scale(shape):
    x, w = layer()
    with pytest.raises(ValueError, match="router_scale"):
        ops.route(x, w["w_router"], torch.ones(shape))


@pytest.mark.parametrize("activation", R.NORM_SILU_VARIANTS)
def test_norm_silu_equals_reference(activation):
    u = torch.randn(5, N, DE, generator=torch.Generator().manual_seed(0))
    gamma = torch.rand(DE, generator=torch.Generator().manual_seed(1)) + 0.5
    mu = u.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(ops.norm_silu(u, gamma, mu, activation), R.norm_silu(u, gamma, mu, activation),
                               rtol=0, atol=0)


def test_norm_silu_validates():
    u = torch.randn(5, N, DE)
    mu = u.mean(dim=(-2, -1), keepdim=True)
    with pytest.raises(ValueError, match="gamma"):
        ops.norm_silu(u, torch.ones(DE + 1), mu)
    with pytest.raises(ValueError, match="activation"):
        ops.norm_silu(u, torch.ones(DE), mu, "gelu")
    with pytest.raises(ValueError, match="mu"):
        ops.norm_silu(u, torch.ones(DE), None, "norm_silu")


@pytest.mark.parametrize("with_shared", [False, True])
def test_scaled_combine_equals_reference(with_shared):
    x, w = layer()
    _, gs = R.route(x, w["w_router"], w["router_scale"])
    act = R.expert_activations(x, w["w_up"], w["gamma"], N)
    shared = R.swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"]) if with_shared else None
    y = ops.scaled_combine(act, gs, w["w_down"], shared)
    torch.testing.assert_close(y, R.scaled_combine(act, gs, w["w_down"], shared), rtol=0, atol=0)
    if with_shared:      # the whole layer, assembled from the single ops
        torch.testing.assert_close(y.to(x.dtype), ops.deco_ffn(x, **w), rtol=1e-6, atol=1e-6)


def test_scaled_combine_validates():
    act, gs, w_down = torch.randn(T, N, DE), torch.rand(T, N), torch.randn(D, N * DE)
    for bad in ((act[0], gs, w_down), (act, gs[:, :-1], w_down), (act, gs, w_down[:, :-1]),
                (act, gs[:-1], w_down)):
        with pytest.raises(ValueError, match="act, gs, w_down"):
            ops.scaled_combine(*bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_swiglu_equals_reference(dtype):
    x, w = layer(dtype)
    y = ops.dense_swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    assert y.dtype == dtype
    ref = R.swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.to(ref.dtype), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_swiglu_fp32_is_the_layer_in_fp32(dtype, device):
    x, w = layer(dtype, T=37)
    x, w = x.to(device), {k: v.to(device) for k, v in w.items()}
    args = (x, w["ws_gate"], w["ws_up"], w["ws_down"])
    y = ops.dense_swiglu_fp32(*args)
    assert y.dtype == torch.float32 and y.shape == x.shape and y.is_contiguous()
    ref = R.swiglu(*(t.cpu().double() for t in args))
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]  # fp32 out
    torch.testing.assert_close(y.cpu().double(), ref, rtol=tol, atol=tol)


def test_an_op_a_backend_lacks_is_refused_by_name(monkeypatch):
    # CuPy runs deco_ffn only: the dispatch point says so for any other layer op, instead of an AttributeError.
    monkeypatch.setattr(backends, "available", lambda name, device: True)
    x, w = layer()
    w.pop("w_router")
    g = torch.relu(torch.randn(*x.shape[:-1], w["router_scale"].shape[0]))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="deco_ffn_from_gates: backend 'cupy'"):
        ops.deco_ffn_from_gates(x, g, **w, backend="cupy")


def test_alert_not_deterministic_follows_torch():
    """backends.alert_not_deterministic: silent by default, raises under torch.use_deterministic_algorithms(True),
    warns with warn_only=True (torch's own rule for its nondeterministic ops)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(False)
        backends.alert_not_deterministic("the path")
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="the path sums with fp32 atomics"):
            backends.alert_not_deterministic("the path")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="the path"):
            backends.alert_not_deterministic("the path")
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
