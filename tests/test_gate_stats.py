"""gate_stats (the sparsity regulariser's loss and active count, SPEC §2): the Triton op against the float64
reference, its dispatch in deco_kernels.ops, and DecoMoE's training statistics on backend "triton" vs "torch".

On the CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, fp32); on a GPU the same cases run
compiled and the tests marked gpu add preset sizes and run-to-run determinism. Every buffer the kernels write is
poisoned with NaN (or -1) first, so an unwritten element fails.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from conftest import assert_rel_close, make_layer, poison_outputs

from deco_kernels import DecoConfig, DecoMoE, ops
from deco_kernels.reference import ops as ref

TOL = 1e-5


@pytest.fixture
def reg(triton_device, monkeypatch):
    """The Triton module, with its output buffers poisoned."""
    ffn = importlib.import_module("deco_kernels.triton.ffn")
    poison_outputs(monkeypatch, ffn)
    return importlib.import_module("deco_kernels.triton.regulariser")


def gates(T, n, pattern="random", seed=0, device="cpu"):
    """Gates [T, n] >= 0 like a ReLU router's: "random" (~30% active, some rows all zero, some all active),
    "zero" (no active gate), "all", "one" (one expert per token), "ties" (equal values within rows)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(T, n, generator=gen, dtype=torch.float64)
    if pattern == "random":
        g = torch.relu(r - 0.5)
        g[::5] = 0                       # rows with all gates zero among active ones
        g[1::7] = r[1::7].abs() + 0.01   # rows with every gate active
    elif pattern == "zero":
        g = torch.zeros(T, n, dtype=torch.float64)
    elif pattern == "all":
        g = r.abs() + 0.01
    elif pattern == "one":
        g = torch.zeros(T, n, dtype=torch.float64)
        if T:
            g[torch.arange(T), torch.randint(0, n, (T,), generator=gen)] = r[:, 0].abs() + 0.1
    elif pattern == "ties":
        g = torch.where(torch.arange(n) % 3 == 0, 0.25, 0.0).expand(T, n).clone()
        g[1::2] = 0.5                    # rows of one repeated value, and rows of exact ties among the active
    else:
        raise ValueError(pattern)
    return g.float().to(device)


def expected(g, lam, num_layers, dloss):
    """(loss, active, dg) of the float64 reference by autograd, on the CPU."""
    g64 = g.detach().double().cpu().requires_grad_()
    lam64 = lam.detach().double().cpu() if isinstance(lam, torch.Tensor) else lam
    loss, active = ref.gate_stats(g64, lam64, num_layers)
    (loss * dloss).backward()
    return loss.detach(), active, g64.grad


def check(reg, g, lam=0.7, num_layers=3, dloss=3.7):
    """The Triton op's loss, active count and dg (from loss * dloss) against the float64 reference."""
    g = g.detach().requires_grad_()   # a leaf with g's strides (detach keeps them)
    loss, active = reg.gate_stats(g, lam, num_layers)
    assert loss.shape == () and loss.dtype == torch.float32 and loss.requires_grad
    assert active.shape == () and active.dtype == torch.int64 and not active.requires_grad
    (loss * dloss).backward()
    loss_ref, active_ref, dg_ref = expected(g, lam, num_layers, dloss)
    assert active.item() == active_ref.item()
    # H of rows with one active expert is tiny and ill-conditioned in fp32 (p + eps rounds near 1): an
    # absolute floor of 1e-6 nats per token (a few ulps of 1), scaled like the loss.
    scale = abs(float(lam)) / num_layers
    assert abs(loss.item() - loss_ref.item()) <= TOL * abs(loss_ref.item()) + 1e-6 * scale, (loss, loss_ref)
    if g.numel():
        assert_rel_close(g.grad.cpu().double(), dg_ref, TOL, "dg")
    else:
        assert g.grad.shape == g.shape
    return loss, active, g.grad


# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------
def test_reference_gate_stats_is_entropy_loss_and_the_count():
    g = gates(9, 7, "random").double().requires_grad_()
    loss, active = ref.gate_stats(g, 0.5, 4)
    torch.testing.assert_close(loss, ref.entropy_loss(g, 0.5, 4))
    assert active.dtype == torch.int64 and active.item() == (g > 0).sum().item() and not active.requires_grad
    loss.backward()
    assert g.grad is not None and "gate_stats" in ref.__all__


# ---------------------------------------------------------------------------------------------------------
# The Triton op against the float64 reference (interpreter on the CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [0, 1, 3, 17, 65])
@pytest.mark.parametrize("n", [1, 7, 42, 102, 130])   # 130: BLOCK_N 256, so fewer rows per program
def test_shapes(reg, triton_device, T, n):
    check(reg, gates(T, n, seed=T * 1000 + n, device=triton_device))


@pytest.mark.parametrize("pattern", ["zero", "all", "one", "ties"])
@pytest.mark.parametrize("T", [1, 17, 65])
def test_patterns(reg, triton_device, pattern, T):
    _, active, _ = check(reg, gates(T, 13, pattern, seed=T, device=triton_device))
    ties = 5 * (T - T // 2) + 13 * (T // 2)   # even rows: 5 equal gates of 13; odd rows: 13 equal gates
    assert active.item() == {"zero": 0, "all": 13 * T, "one": T, "ties": ties}[pattern]


def test_all_zero_rows_have_the_reference_gradient(reg, triton_device):
    # p = 0 in such a row, so dH/dg_e = -ln(eps) / eps: large but finite, and what autograd gives in float64
    _, _, dg = check(reg, gates(4, 6, "zero", device=triton_device), lam=1.0, num_layers=1, dloss=1.0)
    eps = ref.ENTROPY_EPS
    dh = -torch.log(torch.tensor(eps, dtype=torch.float64)) / eps / 4
    torch.testing.assert_close(dg.cpu().double(), dh.expand(4, 6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("lam", ["float", "tensor", "float64-tensor"])
def test_lam_as_number_or_tensor(reg, triton_device, lam):
    value = {"float": 0.3, "tensor": torch.tensor(0.3, device=triton_device),
             "float64-tensor": torch.tensor(0.3, dtype=torch.float64, device=triton_device)}[lam]
    check(reg, gates(17, 11, device=triton_device), lam=value)


def test_lam_gradient_when_lam_requires_grad(reg, triton_device):
    g = gates(9, 5, device=triton_device)
    lam = torch.tensor(0.4, device=triton_device, requires_grad=True)
    loss, _ = reg.gate_stats(g, lam, 2)
    (loss * 2.5).backward()
    lam64 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (ref.gate_stats(g.double().cpu(), lam64, 2)[0] * 2.5).backward()
    assert lam.grad.dtype == lam.dtype
    assert_rel_close(lam.grad.cpu().double(), lam64.grad, TOL, "dlam")


@pytest.mark.parametrize("view", ["transposed", "sliced", "leading-dims", "permuted-leading-dims"])
def test_non_contiguous_and_leading_dims(reg, triton_device, view):
    base = gates(24, 40, seed=5, device=triton_device)
    g = {"transposed": base.t().contiguous().t(),           # column stride T
         "sliced": base[1::2, 3:33],                         # row stride 80, offset
         "leading-dims": base.view(2, 12, 40),
         "permuted-leading-dims": base.view(4, 6, 40).transpose(0, 1)}[view]
    assert view == "leading-dims" or not g.is_contiguous()
    check(reg, g)


def test_zero_tokens_launch_nothing(reg, triton_device, monkeypatch):
    def no_launch(kernel, grid, *args, **meta):
        raise AssertionError(f"{kernel} launched for T = 0")
    monkeypatch.setattr(reg, "launch", no_launch)
    g = torch.zeros(0, 9, device=triton_device, requires_grad=True)
    loss, active = reg.gate_stats(g, torch.tensor(0.5, device=triton_device), 2)
    assert loss.item() == 0.0 and active.item() == 0
    loss.backward()
    assert g.grad.shape == (0, 9)
    loss, active = reg.gate_stats(torch.zeros(2, 0, 5, device=triton_device), 0.5, 2)   # leading dim 0
    assert loss.item() == 0.0 and active.item() == 0


def test_repeat_calls_are_bit_identical_and_leave_the_counter_at_zero(reg, triton_device, monkeypatch):
    ffn = importlib.import_module("deco_kernels.triton.ffn")
    monkeypatch.setattr(reg, "BLOCK_P", 2)   # the last arriver adds 5 partials in 3 steps of its loop
    g = gates(300, 7, seed=9, device=triton_device).requires_grad_()
    runs = []
    for _ in range(3):
        g.grad = None
        loss, active = reg.gate_stats(g, 0.9, 5)
        (loss * 1.3).backward()
        runs.append((loss.detach(), active, g.grad.clone()))
        assert ffn._zeroed(torch.device(triton_device), torch.int32, 1)[0].item() == 0
    for loss, active, dg in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(active, runs[0][1]) and torch.equal(dg, runs[0][2])
    check(reg, g.detach(), lam=0.9, num_layers=5, dloss=1.3)


@pytest.mark.parametrize("args, match", [
    ((torch.zeros(3, 4, dtype=torch.float64), 1.0, 1), "backend='torch'"),
    ((torch.zeros(3, 4, dtype=torch.bfloat16), 1.0, 1), "g: the Triton gate_stats takes fp32"),
    ((torch.zeros(3, 4, dtype=torch.int64), 1.0, 1), "g: expected a floating dtype"),
    ((torch.zeros(()), 1.0, 1), r"g: expected gates of shape \[..., N\]"),
    ((torch.zeros(3, 0), 1.0, 1), "N >= 1"),
    ((torch.zeros(3, 4), 1.0, 0), "num_layers"),
    ((torch.zeros(3, 4), 1.0, 2.0), "num_layers"),
    ((torch.zeros(3, 4), torch.ones(1), 1), "lam: expected a number or a 0-d"),
    ((torch.zeros(3, 4), "0.1", 1), "lam"),
], ids=["float64", "bf16", "int", "0-d", "N0", "layers0", "layers-float", "lam-1d", "lam-str"])
def test_errors_name_the_argument(reg, triton_device, args, match):
    g, lam, layers = args
    with pytest.raises(ValueError, match=match):
        reg.gate_stats(g.to(triton_device), lam, layers)


def test_double_backward_raises(reg, triton_device):
    g = gates(5, 7, device=triton_device).requires_grad_()
    dg, = torch.autograd.grad(reg.gate_stats(g, 1.0, 1)[0], g, create_graph=True)
    with pytest.raises(RuntimeError):
        dg.sum().backward()


def test_make_fx_traces_the_reference(reg, triton_device):
    # Tracers (dynamo, make_fx with fake tensors) see the reference's torch ops, which Inductor fuses itself.
    from torch.fx.experimental.proxy_tensor import make_fx
    g = gates(6, 7, device=triton_device).requires_grad_()

    def f(g):
        loss, active = reg.gate_stats(g, 0.5, 2)
        return torch.autograd.grad(loss, g)[0], active
    graph = make_fx(f, tracing_mode="fake")(g).graph
    assert not any("triton" in str(n.target) for n in graph.nodes)


# ---------------------------------------------------------------------------------------------------------
# ops.gate_stats: one validation, one dispatch
# ---------------------------------------------------------------------------------------------------------
def test_ops_dispatch(triton_device):
    g = gates(17, 9, device=triton_device)
    for backend in ("torch", "triton"):
        loss, active = ops.gate_stats(g, 0.5, 3, backend=backend)
        loss_ref, active_ref = ref.gate_stats(g.double(), 0.5, 3)
        assert abs(loss.item() - loss_ref.item()) <= TOL * loss_ref.item() and active.item() == active_ref.item()
    with pytest.raises(ValueError, match="num_layers"):
        ops.gate_stats(g, 0.5, 0, backend="torch")
    with pytest.raises(ValueError, match="backend"):
        ops.gate_stats(g, 0.5, 1, backend="nope")


def test_ops_on_a_cupy_resolution_runs_the_reference(monkeypatch):
    # CuPy has no gate_stats and no backward: a cupy layer only reaches it without autograd (a train-mode forward
    # under no_grad), where the torch ops run.
    from deco_kernels import backends
    monkeypatch.setattr(backends, "resolve", lambda backend, device, needs_grad=False: "cupy")
    g = gates(5, 7)
    loss, active = ops.gate_stats(g, 0.5, 3, backend="cupy")
    torch.testing.assert_close(loss, ref.entropy_loss(g, 0.5, 3))
    assert active.item() == (g > 0).sum().item()


# ---------------------------------------------------------------------------------------------------------
# DecoMoE in training mode: triton vs torch
# ---------------------------------------------------------------------------------------------------------
def _layer(backend, device, w):
    layer = DecoMoE(DecoConfig.preset("tiny", backend=backend, lambda0=0.5)).to(device).train()
    with torch.no_grad():
        for name, value in w.items():
            getattr(layer, name).copy_(value)
    return layer


@pytest.mark.parametrize("tokens", [(2, 9), (0, 4)], ids=["2x9", "empty"])
def test_deco_moe_training_statistics_match_torch(reg, triton_device, tokens):
    c = DecoConfig.preset("tiny")
    _, w = make_layer(1, c.d_model, c.num_experts, c.expert_dim, c.shared_dim, device=triton_device, seed=21,
                      active=0.3)
    x, _ = make_layer(tokens, c.d_model, c.num_experts, c.expert_dim, c.shared_dim, device=triton_device,
                      seed=22, active=0.3)
    cy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(triton_device)
    out = {}
    for backend in ("torch", "triton"):
        layer = _layer(backend, triton_device, w)
        for _ in range(2):   # the counters accumulate
            y = layer(x)
        ((y * cy).sum() + 100 * layer.reg_loss).backward()   # 100: the regulariser's gradient is not negligible
        out[backend] = layer
    t, r = out["triton"], out["torch"]
    assert t.active_count.item() == r.active_count.item() and t.gate_count.item() == r.gate_count.item()
    assert t.active_ratio.dtype == torch.float32 and not t.active_ratio.requires_grad
    assert t.active_ratio.item() == pytest.approx(r.active_ratio.item(), rel=1e-6, abs=0)
    assert t.reg_loss.dtype == r.reg_loss.dtype == torch.float32
    assert t.reg_loss.item() == pytest.approx(r.reg_loss.item(), rel=TOL, abs=1e-12)
    if x.numel():
        assert 0 < t.active_count.item() < t.gate_count.item()
    for name, p in t.named_parameters():
        assert_rel_close(p.grad, r.get_parameter(name).grad, 5e-5, f"d{name}")


def test_deco_moe_eval_mode_and_no_grad_training(reg, triton_device):
    c = DecoConfig.preset("tiny")
    _, w = make_layer(1, c.d_model, c.num_experts, c.expert_dim, c.shared_dim, device=triton_device, seed=3)
    x, _ = make_layer((3, 5), c.d_model, c.num_experts, c.expert_dim, c.shared_dim, device=triton_device, seed=4)
    layer = _layer("triton", triton_device, w)
    with torch.no_grad():   # train mode without autograd: the statistics still come from the Triton op
        layer(x)
    g, _ = ref.route(x.reshape(-1, c.d_model), layer.w_router, layer.router_scale)
    assert layer.active_count.item() == (g > 0).sum().item() and layer.reg_loss is not None
    layer.reset_counters()
    layer.eval()(x)
    assert layer.reg_loss is None and layer.active_count.item() == 0
    assert layer.active_ratio.item() == pytest.approx(ref.active_ratio(g).item())


# ---------------------------------------------------------------------------------------------------------
# GPU only: preset sizes, many programs, run-to-run determinism of the last arriver
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n", [42, 57, 77, 102])
def test_gpu_preset_sizes_and_determinism(reg, n):
    g = gates(32768 + 5, n, seed=n, device="cuda")
    lam = torch.tensor(1e-3, device="cuda")
    loss, active, dg = check(reg, g, lam=lam, num_layers=32, dloss=1.0)
    for _ in range(5):
        g2 = g.detach().requires_grad_()
        loss2, active2 = reg.gate_stats(g2, lam, 32)
        loss2.backward()
        assert torch.equal(loss2, loss.detach()) and torch.equal(active2, active) and torch.equal(g2.grad, dg)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(reg):
    g = gates(4096, 102, device="cuda").requires_grad_()
    lam = torch.tensor(0.1, device="cuda")
    reg.gate_stats(g, lam, 16)[0].backward()   # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, active = reg.gate_stats(g.detach(), lam, 16)
    lam.fill_(0.2)   # read on the device: a replay sees the new value
    graph.replay()
    loss_ref, active_ref = ref.gate_stats(g.detach().double(), 0.2, 16)
    assert active.item() == active_ref.item()
    assert abs(loss.item() - loss_ref.item()) <= TOL * loss_ref.item()
