"""pytest-benchmark microbenchmarks: every op on every available backend, beside the dense twin and the torch
reference, at the paper's presets and T in 1, 8, 64, 512, 4096 (bf16, ~20% of experts active).

    python -m pytest benchmarks --benchmark-json=ops.json                  # all four presets
    DECO_BENCH_QUICK=1 python -m pytest benchmarks --benchmark-json=ops.json   # 0.1b and 1.2b, fewer rounds

Ops (deco_kernels.benchmark.MICRO_OPS): dense_twin (ops.dense_swiglu of width d_ff), route (ops.route),
norm_silu (ops.norm_silu), routed_experts (the routed MLP by the dense formula), scaled_combine
(ops.scaled_combine) and deco_ffn (the whole layer). Kernel backends add the ops they implement under the same
name (today triton: deco_ffn), checked against the torch reference (REL_TOL) before they are timed.

Inputs come from the tests' factory (deco_kernels.testing.make_layer), so the benchmarks and the tests never
drift. T <= 8 runs under a CUDA graph. One round = `inner_calls` back-to-back calls and one synchronize; the
per-call median is in extra_info["us_per_call_median"]. Without a CUDA GPU (or without pytest-benchmark)
every case is skipped. Groups are "<preset> T=<T>", so `--benchmark-group-by=group` compares each op with the
dense twin at the same size.
"""
from __future__ import annotations

import importlib
import time

import pytest
import torch

from deco_kernels import benchmark as bench
from deco_kernels import ops
from deco_kernels.config import DecoConfig
from deco_kernels.reference import ops as ref
from deco_kernels.testing import REL_TOL, rel_err

pytest.importorskip("pytest_benchmark")

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

QUICK = bench.quick_from_env()
ROUNDS = 5 if QUICK else 15
MIN_ROUND_S = 1e-3  # enough back-to-back calls per round that the synchronize is noise


def _kernel_ops() -> dict[str, set[str]]:
    """{kernel backend: the MICRO_OPS its module defines} (only where a GPU runs them)."""
    if not HAS_CUDA:
        return {}
    found = {}
    for backend in bench.kernel_backends("cuda"):
        module = importlib.import_module(ops._BACKEND_MODULES[backend])
        found[backend] = {op for op in bench.MICRO_OPS if hasattr(module, op)}
    return found


CASES = bench.micro_cases(QUICK, _kernel_ops())
_layers: dict[str, tuple] = {}


def _layer(preset: str):
    """x [4096, d], weights and dense-twin weights of a preset, made once per session (bf16, on the GPU)."""
    if preset not in _layers:
        _layers.clear()  # one preset at a time keeps the memory bounded
        _layers[preset] = bench.layer_inputs(DecoConfig.preset(preset), max(bench.TOKENS), "cuda")
    return _layers[preset]


def _calls(op: str, backend: str, cfg: DecoConfig, x, w, dense):
    """(fn, reference fn) of one op on x: the reference is the torch op (None for the torch backend itself)."""
    with torch.no_grad():
        g, gs = ref.route(x, w["w_router"], w["router_scale"])
        h = x.float() @ w["w_up"].float().t()  # [T, N*de], fp32 as in the reference
        mu = h.mean(dim=-1, keepdim=True).unsqueeze(-1)
        u = h.view(x.shape[0], cfg.num_experts, cfg.expert_dim)
        act = ref.norm_silu(u, w["gamma"], mu)
        shared = ref.swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    torch_calls = {
        "dense_twin": lambda: ops.dense_swiglu(x, **dense),
        "route": lambda: ops.route(x, w["w_router"], w["router_scale"]),
        "norm_silu": lambda: ops.norm_silu(u, w["gamma"], mu),
        "routed_experts": lambda: ref.routed_experts(x, gs, w["w_up"], w["gamma"], w["w_down"]),
        "scaled_combine": lambda: ops.scaled_combine(act, gs, w["w_down"], shared),
        "deco_ffn": lambda: ops.deco_ffn(x, **w, backend="torch"),
    }
    if backend == "torch":
        return torch_calls[op], None
    if op == "deco_ffn":
        return (lambda: ops.deco_ffn(x, **w, backend=backend)), torch_calls[op]
    impl = getattr(importlib.import_module(ops._BACKEND_MODULES[backend]), op)  # same signature as ops.<op>
    args = {"route": (x, w["w_router"], w["router_scale"]), "norm_silu": (u, w["gamma"], mu),
            "routed_experts": (x, gs, w["w_up"], w["gamma"], w["w_down"]),
            "scaled_combine": (act, gs, w["w_down"], shared)}[op]
    return (lambda: impl(*args)), torch_calls[op]


def _last(out):
    """The tensor to compare: the op's output, or the last of a tuple (route's scaled gates)."""
    return out[-1] if isinstance(out, tuple) else out


@pytest.mark.parametrize("preset, T, op, backend", CASES,
                         ids=[f"{p}-T{t}-{o}-{b}" for p, t, o, b in CASES] or None)
def test_op(benchmark, preset, T, op, backend):
    cfg = DecoConfig.preset(preset)
    x_all, w, dense = _layer(preset)
    x = x_all[:T]
    fn, reference = _calls(op, backend, cfg, x, w, dense)
    info = dict(preset=preset, T=T, op=op, backend=backend)
    with torch.no_grad():
        if reference is not None:
            err = rel_err(_last(fn()), _last(reference()))
            info["rel_err"] = err
            assert err <= REL_TOL[torch.bfloat16], f"{op} on {backend}: rel_err {err:.3e} against the reference"
        run, info["graph"] = fn, False
        if bench.uses_graph(T):
            try:
                graph, _ = bench.cuda_graph(fn)
                run, info["graph"] = graph.replay, True
            except Exception as exc:  # noqa: BLE001  (timed eagerly instead, and said so)
                info["graph_error"] = f"{type(exc).__name__}: {exc}"
        run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        inner = max(1, min(200, int(MIN_ROUND_S / max(time.perf_counter() - start, 1e-7))))

        def target():
            for _ in range(inner):
                run()
            torch.cuda.synchronize()

        if op in ("deco_ffn", "dense_twin"):
            g = ref.route(x, w["w_router"], w["router_scale"])[0] > 0
            floors = bench.layer_floor(cfg, T, int(g.sum()), int(g.any(0).sum()), x.element_size(), 1.0, 1.0)
            info.update(active_ratio=float(g.float().mean()),
                        floor_bytes=floors["dense_bytes" if op == "dense_twin" else "floor_bytes"],
                        floor_flops=floors["dense_flops" if op == "dense_twin" else "floor_flops"])
        benchmark.group = f"{preset} T={T}"
        benchmark.extra_info.update(info, inner_calls=inner)
        benchmark.pedantic(target, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["us_per_call_median"] = stats.stats.median / inner * 1e6
