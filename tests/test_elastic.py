"""Elastic inference and training (SPEC §4): knobs per layer and for the whole model, calibrate, and the
EMoE-style training gates with a short training run."""
import json

import pytest
import torch

from deco_kernels import DecoConfig, DecoForCausalLM, SparsityController, calibrate
from deco_kernels import reference as ref
from conftest import assert_rel_close, make_layer  # noqa: E402

TINY = DecoConfig.preset("tiny", backend="torch")  # module semantics; the kernels have their own tests
DECO = (1, 2)  # indices of the tiny model's DECO layers (layer 0 is dense)
N = TINY.num_experts


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return DecoForCausalLM(DecoConfig.preset("tiny", backend="torch", **overrides) if overrides else TINY).eval()


def ids_of(shape=(4, 32), seed=1):
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def layer_ratios(model, ids):
    model(ids)
    return {layer.layer_idx: layer.active_ratio.item() for layer in model.deco_layers()}


NEUTRAL = {"bias": 0.0, "threshold": 0.0, "max_active": None}


# ---------------------------------------------------------------------------------------------------------
# Knobs per layer and for the whole model
# ---------------------------------------------------------------------------------------------------------
def test_set_elastic_per_layer_and_for_all_layers():
    model, ids = build(), ids_of()
    base = layer_ratios(model, ids)
    assert all(0.3 < r < 0.7 for r in base.values())  # an untrained router: about half the experts

    model.set_elastic(bias=-100.0, layers=[1])
    assert model.elastic_state() == {1: {**NEUTRAL, "bias": -100.0}, 2: NEUTRAL}
    ratios = layer_ratios(model, ids)
    assert ratios[1] == 0 and 0.3 < ratios[2] < 0.7  # layer 2 keeps its knobs (its input changed)

    model.set_elastic(max_active=2, layers=2)  # a single index
    model.set_elastic(threshold=0.001)  # every DECO layer; the other knobs stay
    assert model.elastic_state() == {1: {"bias": -100.0, "threshold": 0.001, "max_active": None},
                                     2: {"bias": 0.0, "threshold": 0.001, "max_active": 2}}
    model(ids)
    assert model.layers[1].mlp.active_ratio == 0 and 0 < model.layers[2].mlp.active_ratio <= 2 / N
    assert model.elastic_state(layers=[2]) == {2: {"bias": 0.0, "threshold": 0.001, "max_active": 2}}


def test_per_layer_knobs_match_the_reference_layer_by_layer():
    """Each layer's knobs reach its ops: hooks compare every DECO layer's output with reference.deco_ffn
    under that layer's own knobs."""
    model, ids = build(), ids_of((2, 9))
    knobs = {1: dict(bias=0.01, threshold=0.0, max_active=None), 2: dict(bias=-0.01, threshold=0.002, max_active=4)}
    for i, k in knobs.items():
        model.set_elastic(**k, layers=[i])
    seen = {}
    hooks = [model.layers[i].mlp.register_forward_hook(
        lambda m, args, y, i=i: seen.__setitem__(i, (y, ref.deco_ffn(args[0], **m.weights(), **knobs[i]))))
        for i in knobs]
    model(ids)
    for h in hooks:
        h.remove()
    for i in knobs:
        torch.testing.assert_close(*seen[i], rtol=0, atol=0)


def test_bias_per_expert_fp32_tensor_on_one_layer_and_state_round_trip():
    model, ids = build(), ids_of()
    logits = model(ids).logits
    saved = model.elastic_state()
    bias = torch.full((N,), -100.0)
    bias[3] = 100.0  # only expert 3 on
    model.set_elastic(bias=bias, layers=[2])
    ratios = layer_ratios(model, ids)
    assert ratios[2] == pytest.approx(1 / N) and 0.3 < ratios[1] < 0.7
    state = model.elastic_state()
    assert state[2]["bias"].dtype == torch.float32 and torch.equal(state[2]["bias"], bias)
    state[2]["bias"][0] = 100.0  # the state is a copy: the layer does not change
    assert layer_ratios(model, ids)[2] == pytest.approx(1 / N)

    model.load_elastic_state(saved)
    assert model.elastic_state() == saved
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    model.load_elastic_state({2: {"bias": bias}})  # a subset of layers and of knobs
    assert layer_ratios(model, ids)[2] == pytest.approx(1 / N)


@pytest.mark.parametrize("call, arg", [
    (lambda m: m.set_elastic(bias=0.1, layers=[0]), "layers"),       # the dense layer
    (lambda m: m.set_elastic(bias=0.1, layers=[1, 7]), "layers"),    # no such layer
    (lambda m: m.set_elastic(bias=0.1, layers=[]), "layers"),        # selects nothing
    (lambda m: m.set_elastic(bias=0.1, layers=1.0), "layers"),
    (lambda m: m.set_elastic(bias=0.1, layers=[True]), "layers"),
    (lambda m: m.set_elastic(bias=torch.zeros(N + 1), layers=[1]), "bias"),
    (lambda m: m.set_elastic(bias=0.1, threshold=-1.0, layers=[1]), "threshold"),
    (lambda m: m.set_elastic(max_active=0, layers=[2]), "max_active"),
    (lambda m: m.elastic_state(layers=[3]), "layers"),
    (lambda m: m.load_elastic_state({1: {"scale": 2.0}}), "state"),
    (lambda m: m.load_elastic_state({1: {"bias": 0.3}, 2: {"max_active": 0}}), "max_active"),
    (lambda m: m.load_elastic_state({0: NEUTRAL}), "layers"),
], ids=["dense-layer", "missing-layer", "empty", "float", "bool", "bias-shape", "threshold", "max_active",
        "state-layers", "unknown-knob", "load-max_active", "load-dense"])
def test_bad_knobs_raise_naming_the_argument_and_change_nothing(call, arg):
    model = build()
    with pytest.raises(ValueError, match=arg):
        call(model)
    assert model.elastic_state() == {1: NEUTRAL, 2: NEUTRAL}  # validated before any layer changed


# ---------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, target", [("bias", 0.2), ("bias", 0.05), ("bias", 0.8), ("bias", 1.0),
                                          ("threshold", 0.2), ("threshold", 0.4)])
def test_calibrate_hits_the_target_within_one_point(knob, target):
    model, ids = build(), ids_of()
    model.set_elastic(bias=0.003)  # a bias that calibrating the threshold must keep
    report = calibrate(model, ids, target, knob=knob)
    assert report.knob == knob and report.reached and [c.layer for c in report.layers] == list(DECO)
    # measured again, independently of the report: every layer within ±1 percentage point
    ratios = layer_ratios(model, ids)
    for c in report.layers:
        assert abs(ratios[c.layer] - target) <= 0.01 and c.active_ratio == pytest.approx(ratios[c.layer])
    state = model.elastic_state()
    assert {i: s[knob] for i, s in state.items()} == report.values
    if knob == "threshold":
        assert all(s["bias"] == 0.003 and s["threshold"] > 0 for s in state.values())


def test_calibrate_bisects_on_top_of_the_router_offset():
    """A layer's router_offset (offset_step > 0) shifts its logits in every forward; the bias calibrate finds
    is the user knob on top of it, so the layer's own measured ratio hits the target."""
    model, ids = build(offset_step=0.1), ids_of()
    for layer, offset in zip(model.deco_layers(), (0.02, -0.01)):
        layer.set_router_offset(offset)
    report = calibrate(model, ids, 0.4)
    assert report.reached and all(abs(r - 0.4) <= 0.01 for r in layer_ratios(model, ids).values())


def test_calibrate_in_forward_order_sees_the_earlier_layers_new_values():
    """Each layer is calibrated on the input that the earlier layers' new values produce. Layer 1's output
    is scaled up so that its knob moves layer 2's input: calibrating layer 2 before layer 1 leaves layer 2
    off target (the premise), and one call over both layers gets both within ±1 point."""
    model, ids = build(), ids_of()
    with torch.no_grad():
        model.layers[1].mlp.w_down.mul_(300.0)  # make layer 1's output dominate layer 2's input
    calibrate(model, ids, 0.3, layers=[2])
    calibrate(model, ids, 0.9, layers=[1])
    stale = layer_ratios(model, ids)[2]
    assert abs(stale - 0.3) > 0.01  # the premise: layer 1's value moves layer 2's ratio
    calibrate(model, ids, 0.3, layers=[2])
    assert abs(layer_ratios(model, ids)[2] - 0.3) <= 0.01
    report = calibrate(model, ids, 0.5)  # both at once, in one forward
    assert all(abs(r - 0.5) <= 0.01 for r in layer_ratios(model, ids).values()) and report.reached


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_calibrate_restores_modes_and_touches_no_training_state(training):
    model, ids = build(), ids_of()
    model.train(training)
    model.lm_head.train(not training)  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    controller = SparsityController(model)
    seen = []
    model.layers[2].mlp.register_forward_hook(
        lambda m, args, y: seen.append((m.training, torch.is_grad_enabled(), y.requires_grad)))
    calibrate(model, ids, 0.3)
    assert seen == [(False, False, False)]  # one forward, in eval mode, without autograd
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert controller.step() is None  # no gate counted: calibration ran in eval mode


def test_threshold_cannot_raise_the_ratio():
    model, ids = build(), ids_of()
    model.set_elastic(bias=-0.05, layers=[2])  # layer 2's highest ratio (threshold 0) drops below layer 1's
    ratios = layer_ratios(model, ids)
    assert ratios[2] + 0.02 < 0.45 < ratios[1] - 0.02  # the premise: 0.45 is reachable on layer 1 only
    before = model.elastic_state()
    with pytest.raises(ValueError, match="target_ratio.*layer 2.*threshold can only lower"):
        calibrate(model, ids, 0.45, knob="threshold")
    assert model.elastic_state() == before  # layer 1, calibrated before layer 2 failed, is restored too
    report = calibrate(model, ids, 0.45, knob="threshold", strict=False)
    assert [c.reached for c in report.layers] == [True, False] and report.values[2] == 0.0
    assert not report.reached and "False" in str(report)


def test_max_active_caps_the_reachable_ratio():
    model, ids = build(), ids_of()
    model.set_elastic(max_active=2)
    with pytest.raises(ValueError, match="max_active=2 caps it"):
        calibrate(model, ids, 0.5)
    report = calibrate(model, ids, 2 / N)  # reachable: every token at its cap
    assert report.reached


@pytest.mark.parametrize("kwargs, arg", [
    (dict(target_ratio=0.0), "target_ratio"), (dict(target_ratio=1.5), "target_ratio"),
    (dict(target_ratio=True), "target_ratio"), (dict(knob="scale"), "knob"), (dict(tol=0.0), "tol"),
    (dict(max_iter=0), "max_iter"), (dict(batch=torch.zeros(2, 3)), "batch"),
    (dict(batch=torch.zeros(0, 3, dtype=torch.long)), "batch"), (dict(layers=[0]), "layers"),
    (dict(model=torch.nn.Linear(2, 2)), "model"), (dict(model="twin"), "model"),
], ids=["target-0", "target-1.5", "target-bool", "knob", "tol", "max_iter", "batch-float", "batch-empty",
        "layers", "model", "dense-twin"])
def test_calibrate_bad_arguments(kwargs, arg):
    args = dict(model=build(), batch=ids_of(), target_ratio=0.2)
    if kwargs.get("model") == "twin":
        kwargs = {"model": DecoForCausalLM(TINY, dense_twin=True)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        calibrate(args.pop("model"), args.pop("batch"), args.pop("target_ratio"), **args)


# ---------------------------------------------------------------------------------------------------------
# EMoE-style training gates (reference.elastic_training_gates, coactivation_gates, bias_for_ratio)
# ---------------------------------------------------------------------------------------------------------
def logits(T=64, n=N, seed=0):
    return torch.randn(T, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("knobs", [{}, dict(bias=0.3, threshold=0.1, max_active=4),
                                   dict(bias=torch.linspace(-1, 1, N))], ids=["default", "knobs", "bias-vector"])
def test_elastic_gates_off_is_apply_knobs_and_draws_nothing(knobs):
    r = logits()
    gen = torch.Generator().manual_seed(5)
    for off in (dict(), dict(prob=0.0, pool_multiplier=3.0, budget_range=(0.5, 2.0))):
        torch.testing.assert_close(ref.elastic_training_gates(r, **knobs, **off, generator=gen),
                                   ref.apply_knobs(r, **knobs), rtol=0, atol=0)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    # pool multiplier 1: co-activation sampling keeps the active set and its gates
    torch.testing.assert_close(ref.coactivation_gates(r, ref.apply_knobs(r, **knobs), 1.0, torch.rand(r.shape),
                                                      knobs.get("bias", 0.0)), ref.apply_knobs(r, **knobs))


@pytest.mark.parametrize("m", [1.5, 2.0, 4.0])
@pytest.mark.parametrize("knobs", [{}, dict(threshold=0.3, max_active=5)], ids=["relu", "knobs"])
def test_coactivation_keeps_the_count_inside_the_pool(m, knobs):
    r = logits(T=256)
    g = ref.apply_knobs(r, **knobs)
    size = (g > 0).sum(-1, keepdim=True)
    pool = torch.maximum(size, torch.clamp(torch.ceil(size * m - 1e-9).long(), max=N - 1))
    in_pool = torch.argsort(torch.argsort(r, dim=-1, descending=True), dim=-1) < pool
    gen = torch.Generator().manual_seed(0)
    outside = torch.zeros_like(g, dtype=torch.bool)
    for _ in range(20):
        kept = ref.coactivation_gates(r, g, m, torch.rand(r.shape, generator=gen)) > 0
        assert torch.equal(kept.sum(-1, keepdim=True), size)  # compute unchanged
        assert not (kept & ~in_pool).any()  # only pool members
        outside |= kept & (g == 0)
    assert outside.any()  # experts outside the active set do get sampled


@pytest.mark.parametrize("a, m, pool", [(3, 2.0, 6), (3, 1.5, 5), (10, 1.1, 11), (4, 4.0, N - 1), (N, 2.0, N),
                                        (0, 2.0, 0), (1, 1.0, 1)],
                         ids=["3x2", "ceil-4.5", "whole-11", "cap-N-1", "all-active", "none", "m1"])
def test_pool_size_rule(a, m, pool):
    """One token whose logits rank the experts 0, 1, ..., N-1, with experts 0..a-1 active. Scores that
    favour the lowest-ranked experts pick the pool's bottom members: the pool is exactly the top ``pool``."""
    r = torch.linspace(1.0, -1.0, N)[None, :]
    r = r - (r[0, a - 1] - 1e-3 if a > 0 else r[0, 0] + 1e-3)  # exactly a logits > 0
    g = torch.relu(r)
    assert (g > 0).sum() == a
    favour_low = torch.linspace(0.0, 0.99, N)[None, :]
    kept = (ref.coactivation_gates(r, g, m, favour_low) > 0)[0].nonzero().flatten().tolist()
    assert kept == list(range(pool - a, pool))
    if 0 < a < pool:  # the kept gates: relu(r + δ) with δ = -r of the first expert outside the pool
        gates = ref.coactivation_gates(r, g, m, favour_low)[0]
        torch.testing.assert_close(gates[kept], r[0, kept] - r[0, pool])


def test_elastic_gates_are_deterministic_with_a_seeded_generator():
    r = logits(T=128)
    flags = dict(prob=0.5, pool_multiplier=2.0, budget_range=(0.5, 3.0), target_ratio=0.2)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [ref.elastic_training_gates(r, **flags, generator=gen) for _ in range(8)]

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    natural = ref.apply_knobs(r)
    elastic = [not torch.equal(g, natural) for g in first]
    assert 0 < sum(elastic) < len(elastic)  # prob 0.5: some calls elastic, some not


@pytest.mark.parametrize("rho_range, knobs", [((1.0, 1.0), {}), ((2.0, 2.0), {}), ((0.5, 0.5), dict(bias=0.2)),
                                              ((3.0, 3.0), dict(bias=torch.linspace(-0.5, 0.5, N), threshold=0.1))],
                         ids=["1x", "2x", "half-bias", "3x-vector-threshold"])
def test_random_budget_sets_the_ratio_to_a_multiple_of_the_target(rho_range, knobs):
    r = logits(T=200)
    g = ref.elastic_training_gates(r, **knobs, prob=1.0, pool_multiplier=1.0, budget_range=rho_range,
                                   target_ratio=0.15, generator=torch.Generator().manual_seed(0))
    assert ref.active_ratio(g).item() == pytest.approx(rho_range[0] * 0.15, abs=1 / r.numel())
    # with co-activation on top the count is the same: sampling moves experts, the budget sets how many
    g2 = ref.elastic_training_gates(r, **knobs, prob=1.0, pool_multiplier=2.0, budget_range=rho_range,
                                    target_ratio=0.15, generator=torch.Generator().manual_seed(0))
    assert ref.active_ratio(g2).item() == pytest.approx(ref.active_ratio(g).item())


def test_bias_for_ratio_edges():
    r = logits(T=10)
    assert (ref.apply_knobs(r, ref.bias_for_ratio(r, 1.0)) > 0).all()
    assert (ref.apply_knobs(r, ref.bias_for_ratio(r, 1e-9)) > 0).sum() == 1  # at least one gate
    assert ref.bias_for_ratio(r[:0], 0.5).item() == 0.0


def test_gradient_flows_through_the_kept_gates_only():
    r = logits(T=32).requires_grad_(True)
    g = ref.elastic_training_gates(r, prob=1.0, pool_multiplier=3.0, budget_range=(1.0, 2.0),
                                   generator=torch.Generator().manual_seed(0))
    weights = torch.rand(r.shape, generator=torch.Generator().manual_seed(1))
    (g * weights).sum().backward()
    kept = g.detach() > 0
    # a kept gate is r + (bias + δ per step + δ per token), none of which carries a gradient: d g / d r = 1
    torch.testing.assert_close(r.grad, torch.where(kept, weights, torch.zeros_like(weights)))
    assert (kept & (r.detach() <= 0)).any()  # including gates of experts the plain router had off


# ---------------------------------------------------------------------------------------------------------
# Elastic training in the module
# ---------------------------------------------------------------------------------------------------------
def test_config_flags_validate_and_round_trip():
    c = DecoConfig.preset("tiny", elastic_prob=0.5, elastic_budget_range=[0.5, 2])
    assert c.elastic_budget_range == (0.5, 2.0) and c.elastic_pool_multiplier == 2.0
    assert DecoConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # as config.json stores it
    for bad, arg in [(dict(elastic_prob=1.5), "elastic_prob"), (dict(elastic_pool_multiplier=0.5), "elastic_pool"),
                     (dict(elastic_budget_range=(2.0, 1.0)), "elastic_budget_range"),
                     (dict(elastic_budget_range=(0.0, 1.0)), "elastic_budget_range"),
                     (dict(elastic_prob=0.5, elastic_pool_multiplier=1.0), "elastic_prob")]:
        with pytest.raises(ValueError, match=arg):
            DecoConfig.preset("tiny", **bad)


def test_elastic_training_forward_counts_and_regularises_the_natural_gates():
    """A training forward at twice the target ratio: the layer computes with the sampled gates, while λ's
    counters and the entropy loss see the gates inference would use (the natural ones of the knobs)."""
    model, ids = build(elastic_prob=1.0, elastic_pool_multiplier=1.0, elastic_budget_range=(2.0, 2.0)), ids_of()
    natural_eval = layer_ratios(model, ids)  # eval: no elastic sampling
    inputs, reg_losses = {}, {}   # each layer's input, and its reg_loss as its forward leaves it (the model takes it)
    for layer in model.deco_layers():
        layer.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m.layer_idx, args[0]))
        layer.register_forward_hook(lambda m, args, y: reg_losses.__setitem__(m.layer_idx, m.reg_loss))
        layer.sparsity_lambda.fill_(0.1)
    model.train()
    out = model(ids, labels=ids)
    for layer in model.deco_layers():
        x = inputs[layer.layer_idx]
        natural = ref.apply_knobs(ref.router_logits(x.reshape(-1, x.shape[-1]), layer.w_router))
        assert layer.active_ratio.item() == pytest.approx(2 * TINY.target_active_ratio, abs=1e-3)
        assert layer.active_count.item() == (natural > 0).sum().item() and layer.gate_count.item() == natural.numel()
        torch.testing.assert_close(reg_losses[layer.layer_idx], ref.entropy_loss(natural, 0.1, TINY.num_layers))
    assert abs(natural_eval[1] - 2 * TINY.target_active_ratio) > 0.05  # the premise: sampling changed the ratio
    out.loss.backward()
    assert all(layer.w_router.grad is not None and layer.w_up.grad.abs().sum() > 0 for layer in model.deco_layers())
    model.eval()
    assert layer_ratios(model, ids) == natural_eval  # eval mode: no sampling


def test_elastic_training_runs_sparse_on_triton(triton_device, monkeypatch):
    # The same sampled gates (same seed) through the torch reference and the Triton training path: the same
    # loss and the same gradients, the router's included (its gradient reaches it through the sampled gates).
    from deco_kernels.triton import training
    calls = []
    forward = training._forward
    monkeypatch.setattr(training, "_forward",
                        lambda *a, **k: calls.append(a[-1] is not None) or forward(*a, **k))  # a[-1]: gates
    grads = {}
    for backend in ("torch", "triton"):
        model = build(elastic_prob=1.0).to(triton_device).train()
        model.set_backend(backend)
        ids = ids_of((2, 7)).to(triton_device)
        torch.manual_seed(3)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads[backend] = {"loss": out.loss.detach(), **{k: p.grad for k, p in model.named_parameters()}}
    for name, ref_grad in grads["torch"].items():
        got = grads["triton"][name]
        assert got is not None and ref_grad is not None, name
        assert_rel_close(got, ref_grad, 5e-5, name)
    assert any("w_router" in k and v.abs().sum() > 0 for k, v in grads["triton"].items())
    assert calls == [True] * (TINY.num_layers - 1)  # every DECO layer ran the Triton op with the sampled gates


def test_deco_ffn_from_gates_on_triton_matches_the_reference(triton_device):
    from deco_kernels import ops
    x, w = make_layer(11, 40, 13, 16, 24, device=triton_device, seed=21, active=0.3, requires_grad=True)
    w.pop("w_router")
    g = torch.relu(torch.randn(11, 13, device=triton_device)).requires_grad_()  # about half the pairs active
    cy = torch.randn(11, 40, device=triton_device)
    y = ops.deco_ffn_from_gates(x, g, **w, backend="triton")
    (y * cy).sum().backward()
    leaves = {"x": x, "g": g, **w}
    got = {k: t.grad.clone() for k, t in leaves.items()}
    ref64 = {k: t.detach().double().requires_grad_() for k, t in leaves.items()}
    y_ref = ref.deco_ffn_from_gates(ref64["x"], ref64["g"], **{k: ref64[k] for k in w})
    (y_ref * cy.double()).sum().backward()
    assert_rel_close(y, y_ref.to(y.dtype), 2e-5, "y")
    active = g.detach() > 0
    for name, t in ref64.items():
        expected = torch.where(active, t.grad, 0.0) if name == "g" else t.grad  # only existing pairs get dL/dg
        assert_rel_close(got[name], expected, 5e-5, f"d{name}")
    assert bool((got["g"][~active] == 0).all())
    with pytest.raises(ValueError, match="g: expected"):
        ops.deco_ffn_from_gates(x, g[:, :5], **w, backend="triton")


def _train(steps=60, seed=0, offset0=0.0, **elastic):
    """Tiny model on arithmetic sequences mod V (next = prev + 5) with the SparsityController at target 0.3.
    Returns (natural ratio per step as the controller measured it, ratio of the gates used per step,
    CE per step, eval active ratio on a held-out batch). ``offset0``: every layer's starting router_offset
    (needs offset_step > 0)."""
    torch.manual_seed(seed)
    config = DecoConfig.preset("tiny", backend="torch", target_active_ratio=0.3, **elastic)
    model = DecoForCausalLM(config).train()
    for layer in model.deco_layers():
        if offset0:
            layer.set_router_offset(offset0)
    controller = SparsityController(model, multiplier=1.1, lam0=1e-3)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.01), lr=config.lr)
    gen = torch.Generator().manual_seed(1 + seed)

    def batch(b, g):
        return (torch.randint(0, config.vocab_size, (b, 1), generator=g) + 5 * torch.arange(24)) % config.vocab_size

    natural, used, ces = [], [], []
    for _ in range(steps):
        ids = batch(16, gen)
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        natural.append(controller.step())
        used.append(out.active_ratio.item())
        ces.append((out.loss - out.reg_loss).item())
    model.eval()
    with torch.no_grad():
        held_out = model(batch(64, torch.Generator().manual_seed(99)))
    return natural, used, ces, held_out.active_ratio.item()


def test_elastic_training_still_tracks_the_target():
    """With co-activation sampling and random budgets of 1x-3x the target on half the forwards, the
    trained (natural) active ratio ends where plain training puts it.

    The adaptive-λ rule only pushes the ratio down and reacts a few steps late, so in a 60-step run both
    runs overshoot the target 0.3 by about 0.1 (plain: 0.19-0.23 over seeds 0-5) instead of settling on it;
    the meaningful claim is that elastic training leaves that curve alone. Measured over seeds 0-5 the two
    runs differ by at most 0.03; a naive implementation (the regulariser and λ's counters fed the sampled
    gates) ends at 0.02-0.11, far outside these bounds.
    """
    target = 0.3
    plain_nat, plain_used, plain_ce, plain_eval = _train()
    nat, used, ce, held_out = _train(elastic_prob=0.5, elastic_pool_multiplier=2.0,
                                     elastic_budget_range=(1.0, 3.0))
    late = slice(-15, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert nat[0] > 0.4 and mean(nat[late]) < target + 0.03  # the controller moved the ratio down ...
    assert held_out > target - 0.15  # ... without collapsing it
    assert abs(mean(nat[late]) - mean(plain_nat[late])) < 0.05 and abs(held_out - plain_eval) < 0.05
    assert mean(used[late]) > mean(nat[late]) + 0.05  # the elastic forwards really ran at larger budgets
    assert max(abs(a - b) for a, b in zip(plain_used, plain_nat)) < 1e-6  # plain: the same gates
    assert ce[-1] < 0.5 * ce[0]  # and the model still learns


ELASTIC = dict(elastic_prob=0.5, elastic_pool_multiplier=2.0, elastic_budget_range=(1.0, 3.0))


@pytest.mark.parametrize("offset0", [0.0, -0.5], ids=["from-above", "from-below"])
def test_router_offset_keeps_elastic_training_on_the_target(offset0):
    """With offset_step the controller steers each layer's router_offset, so the trained natural ratio sits on
    the target (0.3) whichever side it starts from; λ alone only pushes down (plain training overshoots to
    0.21-0.23 in this run, and a ratio that starts low stays low: the second case starts near 0).

    Measured over seeds 0-1: late mean 0.28-0.29 from above; the offset pulls the start from below
    (offset -0.5: no gate active) up to the target within ~30 steps."""
    target = 0.3
    nat, used, ce, held_out = _train(offset0=offset0, offset_step=0.02, **ELASTIC)
    late = nat[-15:]
    if offset0 < 0:
        assert nat[0] < 0.05  # it really started below the target
    assert abs(sum(late) / len(late) - target) < 0.04
    assert abs(held_out - target) < 0.05
    assert ce[-1] < 0.5 * ce[0]

