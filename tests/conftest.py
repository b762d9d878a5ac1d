"""Shared test helpers for every test file (reference, modules, Triton and CuPy kernels).

``make_layer``, ``rel_err`` and ``REL_TOL`` are defined in ``deco_kernels.testing`` (shared with benchmarks/)
and re-exported here. Use them as plain functions (``from conftest import make_layer, rel_err,
assert_rel_close``; pytest puts tests/ on sys.path) or as fixtures of the same names. Hypothesis tests
must import them: hypothesis refuses function-scoped fixtures.

- ``rel_err(out, ref)``: ||ref - out|| / ||ref||, the error measure of every comparison (||out|| when ref is 0).
- ``assert_rel_close(out, ref, tol)``: shape, finiteness and rel_err in one assertion with a useful message.
- ``make_layer(T, d, N, de, ds, ...)``: x and the 8 canonical weights of one DECO layer at trained-like scales,
  with a controllable active fraction ("none", "all", "one" expert for every token, or a probability).
- ``@pytest.mark.gpu`` (alias ``requires_gpu``): the test is skipped cleanly when torch sees no CUDA GPU.
  ``DEVICES`` parametrises a test over "cpu" and "cuda" (the latter marked gpu).
- ``triton_device`` fixture: "cuda" with a GPU, "cpu" under TRITON_INTERPRET=1, else the test is skipped.
- Hypothesis profiles: "ci" (derandomised, loaded when the environment variable CI is set) and "dev"; both
  have no deadline and 25 examples. HYPOTHESIS_PROFILE=<name> picks one explicitly.

``torch.set_default_dtype`` is left alone: every helper takes an explicit dtype.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from deco_kernels import backends
# The weight factory and the error measure live in the package so the benchmarks share them; re-exported.
from deco_kernels.testing import REL_TOL, make_layer, rel_err  # noqa: F401

# ---------------------------------------------------------------------------------------------------------
# Hypothesis: no deadline (the first call of a torch op is slow on a cold 2-core CI machine) and a bounded
# number of examples so the whole suite stays within a few minutes there.
# ---------------------------------------------------------------------------------------------------------
_HYPOTHESIS_COMMON = dict(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, print_blob=True, **_HYPOTHESIS_COMMON)
settings.register_profile("dev", **_HYPOTHESIS_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

# fp32 matmuls at full precision on the GPU (no TF32), as the reference assumes.
torch.set_float32_matmul_precision("highest")

HAS_CUDA = torch.cuda.is_available()

# ---------------------------------------------------------------------------------------------------------
# GPU marker
# ---------------------------------------------------------------------------------------------------------
requires_gpu = pytest.mark.gpu
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def pytest_collection_modifyitems(config, items):
    """Skip every test marked ``gpu`` when torch sees no CUDA GPU (the marker is declared in pyproject)."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> str:
    """Where Triton kernels can run: "cuda" with a GPU, "cpu" under TRITON_INTERPRET=1 (set it before the
    first import of triton, as .ci/run does), otherwise the test is skipped."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if HAS_CUDA:
        return "cuda"
    if backends.interpreting():
        return "cpu"
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set")


# ---------------------------------------------------------------------------------------------------------
# Error measure
# ---------------------------------------------------------------------------------------------------------
def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float | None = None, what: str = "output"):
    """Assert same shape, no NaN/inf where ref is finite (catches unwritten NaN-poisoned outputs) and
    rel_err(out, ref) <= tol (default: REL_TOL of out's dtype)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if tol is None:
        tol = REL_TOL[out.dtype]
    bad = ~torch.isfinite(out.detach().cpu()) & torch.isfinite(ref.detach().cpu())
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite entries, first at {bad.nonzero()[0].tolist()}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: rel_err {err:.3e} > {tol:.1e}"


def poison_outputs(monkeypatch, module) -> None:
    """Make ``module._empty`` (the one allocator of a backend's kernel-written buffers) fill with NaN (floats)
    or -1 (indices), so an element a kernel forgets to write fails the comparison."""
    def poisoned(*shape, device, dtype):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.empty(*shape, device=device, dtype=dtype).fill_(fill)   # any shape form torch.empty takes
    monkeypatch.setattr(module, "_empty", poisoned)


def backend_and_reference(x, w, backend: str, **knobs):
    """(y, g, y_ref, g_ref): ops.deco_ffn on ``backend`` without autograd, and the float64 reference of the
    same inputs on the CPU."""
    from deco_kernels import ops, reference
    with torch.no_grad():
        y, g = ops.deco_ffn(x, **w, backend=backend, return_gates=True, **knobs)
    w64 = {k: v.detach().double().cpu() for k, v in w.items()}
    if isinstance(knobs.get("bias"), torch.Tensor):
        knobs = {**knobs, "bias": knobs["bias"].double().cpu()}
    y_ref, g_ref = reference.deco_ffn(x.detach().double().cpu(), **w64, return_gates=True, **knobs)
    return y, g, y_ref, g_ref


def far_apart_rows(T: int, d: int = 64):
    """(x, w): a small bf16 layer on the GPU whose x [T, d] rows sit so far apart in memory that the last row's
    offset passes 2^31 elements (int64 offsets needed); skips the test when the GPU lacks the memory."""
    stride = 2**31 // (T - 1) + 64
    if torch.cuda.get_device_properties(0).total_memory < 3 * T * stride * 2:
        pytest.skip("not enough GPU memory")
    storage = torch.zeros(T * stride, device="cuda", dtype=torch.bfloat16)
    x_small, w = make_layer(T, d, 13, 16, 32, dtype=torch.bfloat16, device="cuda", seed=8, active=0.4)
    x = storage.as_strided((T, d), (stride, 1))
    x.copy_(x_small)
    assert (T - 1) * stride > 2**31
    return x, w


# Adversarial layer shapes for kernel tests, as (T, d, N, de, ds), each with the reason it is there.
ODD_SHAPES = [
    pytest.param(1, 64, 13, 16, 32, id="decode-T1-primeN"),        # the batch-1 decode path
    pytest.param(7, 96, 13, 16, 32, id="T7-below-block"),          # T smaller than any token tile
    pytest.param(0, 64, 5, 16, 32, id="T0-empty"),                 # empty batch: empty output, no launch error
    pytest.param(33, 80, 17, 64, 128, id="T33-d80-N17"),           # d not a power of two, tails everywhere
    pytest.param(5, 64, 1, 64, 128, id="N1"),                      # a single routed expert
    pytest.param(3, 768, 42, 64, 128, id="preset-0.1b"),           # the paper's smallest preset
]


# Fixtures of the same names, for non-hypothesis tests that prefer injection.
@pytest.fixture(name="make_layer")
def _make_layer_fixture():
    return make_layer


@pytest.fixture(name="rel_err")
def _rel_err_fixture():
    return rel_err


@pytest.fixture(name="assert_rel_close")
def _assert_rel_close_fixture():
    return assert_rel_close
