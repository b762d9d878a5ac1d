"""DecoMoE and SwiGLU: canonical parameters and inits, forward through ops == reference, sparsity statistics,
elastic knobs."""
import math

import pytest
import torch

from deco_kernels import DecoConfig, DecoMoE, SwiGLU, ops
from deco_kernels import reference as ref
from conftest import rel_err

SHAPES = {"w_router": ("N", "d"), "router_scale": ("N",), "w_up": ("N*de", "d"), "gamma": ("de",),
          "w_down": ("d", "N*de"), "ws_gate": ("ds", "d"), "ws_up": ("ds", "d"), "ws_down": ("d", "ds")}


def tiny(**overrides):
    # backend "torch": these tests are about the module; the kernels have their own tests
    return DecoConfig.preset("tiny", **{"backend": "torch", **overrides})


def layer_and_input(dtype=torch.float32, tokens=(2, 7), seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny(**overrides)
    layer = DecoMoE(config).to(dtype)
    return layer, torch.randn(*tokens, config.d_model, dtype=dtype)



def test_owns_exactly_the_canonical_parameters():
    c = tiny()
    layer = DecoMoE(c)
    sizes = {"N": c.num_experts, "d": c.d_model, "de": c.expert_dim, "ds": c.shared_dim,
             "N*de": c.num_experts * c.expert_dim}
    got = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert got == {name: tuple(sizes[s] for s in shape) for name, shape in SHAPES.items()}
    # λ and the counters are controller state, not weights: the state_dict holds exactly the parameters.
    assert set(layer.state_dict()) == set(SHAPES)
    assert layer.no_weight_decay_parameters() == {"router_scale", "gamma"}


def test_init_follows_spec():
    c = DecoConfig.preset("0.1b")  # large enough for a tight statistical check of the stds
    torch.manual_seed(0)
    layer = DecoMoE(c)
    assert torch.equal(layer.router_scale, torch.full((c.num_experts,), 0.1))
    assert torch.equal(layer.gamma, torch.ones(c.expert_dim))
    expected_std = {name: 0.01 for name in ("w_router", "w_up", "w_down", "ws_gate", "ws_up")}
    expected_std["ws_down"] = 0.01 / math.sqrt(2 * c.num_layers)
    for name, std in expected_std.items():
        w = getattr(layer, name).detach().double()
        # std of the sample std is std / sqrt(2n): n >= 40k entries gives < 0.4%; allow 5%.
        assert abs(w.std().item() / std - 1) < 0.05, name
        assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel()), name
    assert layer.sparsity_lambda.item() == pytest.approx(c.lambda0)
    assert (layer.bias, layer.threshold, layer.max_active, layer.backend) == (0.0, 0.0, None, "auto")


def test_forward_is_ops_deco_ffn_on_the_module_weights():
    layer, x = layer_and_input()
    layer.eval()
    y = layer(x)
    expected = ops.deco_ffn(x, **layer.weights(), backend="torch")
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_forward_matches_float64_reference():
    layer, x = layer_and_input(torch.float64, tokens=(3, 5))
    y = layer.eval()(x)
    expected = ref.deco_ffn(x, **layer.weights())
    assert rel_err(y, expected) < 1e-12
    # and the sparse, expert-by-expert formulation of the same layer
    x2 = x.reshape(-1, x.shape[-1])
    _, gs = ref.route(x2, layer.w_router, layer.router_scale)
    sparse = ref.routed_experts_sparse(x2, gs, layer.w_up, layer.gamma, layer.w_down) + ref.swiglu(
        x2, layer.ws_gate, layer.ws_up, layer.ws_down)
    assert rel_err(y.reshape(-1, x.shape[-1]), sparse) < 1e-12


def test_active_ratio_reg_loss_and_counters():
    layer, x = layer_and_input(tokens=(4, 9))
    layer.train()
    layer.sparsity_lambda.fill_(0.3)
    layer(x)
    g, _ = ref.route(x.reshape(-1, x.shape[-1]), layer.w_router, layer.router_scale)
    assert layer.active_ratio.item() == pytest.approx((g > 0).float().mean().item())
    assert not layer.active_ratio.requires_grad
    torch.testing.assert_close(layer.reg_loss, ref.entropy_loss(g, 0.3, layer.config.num_layers))
    assert layer.active_count.item() == (g > 0).sum().item()
    assert layer.gate_count.item() == g.numel() == 36 * layer.config.num_experts

    layer.reg_loss.backward()
    assert layer.w_router.grad is not None and layer.w_router.grad.abs().sum() > 0
    assert layer.w_up.grad is None  # the regulariser sees only the gates

    layer(x)  # counters accumulate across forwards until the controller reads them
    assert layer.gate_count.item() == 2 * g.numel()
    layer.reset_counters()
    layer.eval()
    layer(x)
    assert layer.reg_loss is None and layer.gate_count.item() == 0 and layer.active_count.item() == 0
    assert layer.active_ratio is not None


@pytest.mark.parametrize("knobs, check", [
    ({"bias": -100.0}, lambda ratio, base, g: ratio == 0),
    ({"bias": 100.0}, lambda ratio, base, g: ratio == 1),
    ({"bias": 0.005}, lambda ratio, base, g: base < ratio < 1),
    ({"threshold": 0.005}, lambda ratio, base, g: 0 < ratio < base),
    ({"max_active": 2}, lambda ratio, base, g: ((g > 0).sum(-1) <= 2).all() and (g > 0).sum(-1).max() == 2),
], ids=["bias-off", "bias-all", "bias+", "threshold", "max_active"])
def test_knobs_change_the_active_set(knobs, check):
    layer, x = layer_and_input(tokens=(1, 16))
    layer.eval()
    layer(x)
    base = layer.active_ratio.item()
    assert 0.3 < base < 0.7  # an untrained router activates about half the experts
    layer.set_elastic(**knobs)
    y = layer(x)
    g, _ = ref.route(x.reshape(-1, x.shape[-1]), layer.w_router, layer.router_scale, **knobs)
    assert check(layer.active_ratio.item(), base, g)
    torch.testing.assert_close(y, ref.deco_ffn(x, **layer.weights(), **knobs))


def test_no_active_expert_leaves_the_shared_expert():
    layer, x = layer_and_input()
    layer.set_elastic(bias=-100.0)
    y = layer.eval()(x)
    torch.testing.assert_close(y, ref.swiglu(x, layer.ws_gate, layer.ws_up, layer.ws_down))


def test_bias_tensor_per_expert():
    layer, x = layer_and_input()
    bias = torch.full((layer.config.num_experts,), -100.0)
    bias[3] = 100.0  # only expert 3 on
    layer.set_elastic(bias=bias)
    layer.eval()(x)
    assert layer.active_ratio.item() == pytest.approx(1 / layer.config.num_experts)


@pytest.mark.parametrize("knobs, arg", [({"max_active": 0}, "max_active"), ({"threshold": -1.0}, "threshold"),
                                        ({"bias": torch.zeros(5)}, "bias"), ({"bias": "x"}, "bias")])
def test_bad_knobs_raise_naming_the_argument(knobs, arg):
    layer, _ = layer_and_input()
    with pytest.raises(ValueError, match=arg):
        layer.set_elastic(**knobs)
    assert (layer.bias, layer.threshold, layer.max_active) == (0.0, 0.0, None)  # nothing changed


def test_half_keeps_lambda_in_fp32():
    layer = DecoMoE(tiny(lambda0=1e-8)).half()
    assert layer.w_up.dtype == torch.float16
    assert layer.sparsity_lambda.dtype == torch.float32 and layer.sparsity_lambda.item() == pytest.approx(1e-8)
    assert layer.active_count.dtype == torch.int64


def test_swiglu_matches_reference():
    torch.manual_seed(0)
    mlp = SwiGLU(24, 40).double()
    assert [n for n, _ in mlp.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected = ref.swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    assert rel_err(mlp(x), expected) < 1e-13



def test_backend_attribute_reaches_the_dispatch():
    layer, x = layer_and_input()
    layer.backend = "auto"
    layer.train()(x).sum().backward()  # "auto" picks a differentiable backend when autograd needs one
    assert layer.w_up.grad is not None
    layer.backend = "nope"
    with pytest.raises(ValueError, match="backend"):
        layer(x)
