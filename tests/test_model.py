"""DecoForCausalLM: logits == reference.model, loss, KV cache, generation, knobs, a short training run."""
import pytest
import torch
import torch.nn.functional as F

from deco_kernels import DecoConfig, DecoForCausalLM, SparsityController
from deco_kernels.reference import model as ref_model
from conftest import rel_err

TINY = DecoConfig.preset("tiny", backend="torch")  # module semantics; kernels have their own tests


def build(dtype=torch.float32, dense_twin=False, seed=0, **overrides):
    torch.manual_seed(seed)
    config = DecoConfig.preset("tiny", backend="torch", **overrides) if overrides else TINY
    return DecoForCausalLM(config, dense_twin=dense_twin).to(dtype).eval()


def ids_of(shape, seed=1):
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))



@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dense_twin", [False, True], ids=["deco", "dense_twin"])
def test_logits_match_reference_model(dtype, tol, dense_twin):
    model = build(dtype, dense_twin)
    ids = ids_of((2, 13))
    logits = model(ids).logits
    assert logits.shape == (2, 13, TINY.vocab_size) and logits.dtype == dtype
    assert rel_err(logits, ref_model.forward(model.state_dict(), model.config, ids)) < tol


def test_logits_match_reference_with_knobs():
    model = build(torch.float64)
    ids = ids_of((2, 9))
    knobs = dict(bias=-0.002, threshold=0.001, max_active=3)
    model.set_elastic(**knobs)
    out = model(ids)
    assert rel_err(out.logits, ref_model.forward(model.state_dict(), model.config, ids, **knobs)) < 1e-12
    assert out.active_ratio <= 3 / TINY.num_experts
    assert all(layer.max_active == 3 for layer in model.deco_layers())


def test_structure_and_dense_twin():
    model, twin = build(), build(dense_twin=True)
    assert len(list(model.deco_layers())) == TINY.num_layers - 1 and not list(twin.deco_layers())
    assert type(model.layers[0].mlp).__name__ == "SwiGLU"
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()  # untied
    out = twin(ids_of((1, 5)))
    assert out.active_ratio is None and out.reg_loss is None


def test_loss_is_shifted_ce_plus_reg_loss_in_training():
    model = build(torch.float64)
    ids = ids_of((3, 10))
    labels = ids.clone()
    labels[0, 4:] = -100
    out = model(ids, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, TINY.vocab_size), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    torch.testing.assert_close(out.loss, ce)
    assert out.reg_loss is None

    model.train()
    layers = list(model.deco_layers())
    terms = []  # each layer's reg_loss as its forward leaves it (the model moves them into its output)
    hooks = [m.register_forward_hook(lambda m, args, y: terms.append(m.reg_loss)) for m in layers]
    out = model(ids, labels=labels)
    for h in hooks:
        h.remove()
    assert len(terms) == len(layers) and all(t is not None for t in terms)
    torch.testing.assert_close(out.reg_loss, sum(terms))
    torch.testing.assert_close(out.loss, ce + out.reg_loss)
    torch.testing.assert_close(out.active_ratio, torch.stack([m.active_ratio for m in layers]).mean())
    assert out.reg_loss > 0


def test_no_module_keeps_the_training_steps_graph_alive():
    """After forward + backward of a training step no tensor held by a module has a grad_fn: a graph kept alive
    keeps its AccumulateGrad nodes, and a CUDA graph captured later on another stream (torch.cuda.graph after
    eager steps, as the bench does) that reaches them is invalidated (seen on the H100)."""
    model = build().train()
    ids = ids_of((2, 9))
    model(ids, labels=ids).loss.backward()
    held = [f"{name}.{attr}" for name, m in model.named_modules() for attr, v in vars(m).items()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None]
    assert held == []


def test_kv_cache_matches_full_forward():
    model = build(torch.float64)
    ids = ids_of((2, 12))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)  # prefill
    chunks = [out.logits]
    out = model(ids[:, 5:9], past_key_values=out.past_key_values, use_cache=True)  # several tokens at once
    chunks.append(out.logits)
    for t in range(9, 12):  # then one token at a time
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        chunks.append(out.logits)
    assert out.past_key_values[0][0].shape == (2, TINY.num_heads, 12, TINY.head_dim)
    assert rel_err(torch.cat(chunks, dim=1), full) < 1e-12


def test_greedy_generation_same_with_and_without_cache():
    model = build()
    prompt = ids_of((2, 4))
    cached = model.generate(prompt, max_new_tokens=10)
    uncached = model.generate(prompt, max_new_tokens=10, use_cache=False)
    assert cached.shape == (2, 14) and cached.dtype == torch.int64
    assert torch.equal(cached[:, :4], prompt) and torch.equal(cached, uncached)
    # greedy = argmax of the full forward at every step
    logits = model(cached[:, :-1]).logits[:, 3:]
    assert torch.equal(logits.argmax(-1), cached[:, 4:])
    assert torch.equal(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1), cached)


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = build()
    prompt = ids_of((3, 3))
    runs = [model.generate(prompt, 12, do_sample=True, temperature=2.0, top_k=20,
                           generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    uncached = model.generate(prompt, 12, do_sample=True, temperature=2.0, top_k=20, use_cache=False,
                              generator=torch.Generator().manual_seed(7))
    assert torch.equal(runs[0], uncached)


@pytest.mark.parametrize("call, arg", [
    (lambda m: m(torch.zeros(2, 3)), "input_ids"),                    # float ids
    (lambda m: m(torch.zeros(5, dtype=torch.long)), "input_ids"),     # 1-D
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), "input_ids"),  # empty sequence
    (lambda m: m(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), -1), "max_new_tokens"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 2, do_sample=True, temperature=0), "temperature"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 2, top_k=0), "top_k"),
    (lambda m: m.set_elastic(max_active=0), "max_active"),
    (lambda m: m.set_elastic(threshold=-0.1), "threshold"),
    (lambda m: m(torch.zeros(1, 1, dtype=torch.long), past_key_values=((torch.zeros(1),) * 2,)),
     "past_key_values"),
    (lambda m: DecoConfig.preset("7b"), "name"),
], ids=["float-ids", "1d-ids", "empty-ids", "labels-shape", "max_new_tokens", "temperature", "top_k",
        "max_active", "threshold", "cache", "preset"])
def test_bad_input_raises_naming_the_argument(call, arg):
    with pytest.raises(ValueError, match=arg):
        call(build())


def test_optimizer_param_groups_exclude_gains_and_norms():
    model = build()
    decay, no_decay = model.optimizer_param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "layers.1.mlp.router_scale" in skipped and "layers.2.mlp.gamma" in skipped
    assert "norm.weight" in skipped and "layers.0.input_layernorm.weight" in skipped
    assert all(names[id(p)].endswith(("router_scale", "gamma", "norm.weight", "layernorm.weight"))
               for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def _train(lam0, multiplier, steps=45):
    """Tiny model on a learnable synthetic task (arithmetic sequences mod V: next = prev + 5); returns the
    CE and active-ratio curves."""
    torch.manual_seed(0)
    model = DecoForCausalLM(TINY).train()
    controller = SparsityController(model, target=0.2, multiplier=multiplier, lam0=lam0)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.01), lr=TINY.lr)
    gen = torch.Generator().manual_seed(1)
    ces, ratios = [], []
    for _ in range(steps):
        ids = (torch.randint(0, TINY.vocab_size, (16, 1), generator=gen) + 5 * torch.arange(24)) % TINY.vocab_size
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ratios.append(controller.step())
        ces.append((out.loss - out.reg_loss).item())
    return ces, ratios


def test_training_lowers_loss_and_moves_active_ratio_to_target():
    ces, ratios = _train(lam0=1e-2, multiplier=1.5)
    assert 0.4 < ratios[0] < 0.6  # an untrained router: about half the experts
    assert ces[-1] < 0.5 * ces[0]
    late = sum(ratios[-10:]) / 10
    assert late < ratios[0] - 0.2 and late < 0.3
    # without the regulariser (λ = 0) the ratio stays where it started: the drop is the controller's doing
    _, free = _train(lam0=0.0, multiplier=1.0, steps=25)
    assert sum(free[-10:]) / 10 > 0.35
