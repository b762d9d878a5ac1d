"""triton/launch.py: the cache key of a launch (CPU) and the direct launcher against Triton's entry (GPU).

A key coarser than Triton's specialisation would run a binary compiled for other arguments (wrong results or
misaligned loads), so the CPU tests check that every property Triton specialises on changes the key.
"""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, make_layer

pytest.importorskip("triton")
from deco_kernels import ops  # noqa: E402
from deco_kernels.triton import launch as L  # noqa: E402


def key(*args, constexprs=frozenset(), **meta):
    return L.spec_key(args, meta, constexprs)


def test_ints_keyed_by_what_triton_specialises():
    assert key(5) == key(7)                         # neither 1 nor a multiple of 16: one binary
    assert key(1) != key(5)                         # == 1 is a constant
    assert key(32) != key(5) and key(32) == key(48)  # divisible by 16
    assert key(2 ** 31) != key(2 ** 31 - 16)        # int64 against int32
    assert key(2 ** 63) != key(2 ** 63 - 16)        # uint64
    assert key(True) != key(1) and key(True) != key(False)   # bools by value (finer than Triton: safe)
    assert key(0.5) == key(2.0) and key(0.5) != key(1)
    assert key(None) != key(0)


def test_tensors_keyed_by_dtype_and_alignment():
    buf = torch.zeros(64)
    assert key(buf) == key(torch.zeros(8))
    assert key(buf) != key(buf.to(torch.float64))
    assert key(buf[1:]) != key(buf)                 # 4 bytes past an aligned address
    assert key(buf[4:]) == key(buf)                 # 16 bytes past it
    assert key(buf.view(8, 8).t()) == key(buf)      # strides are runtime arguments, not part of the binary


def test_constexprs_and_options_keyed_by_value():
    assert key(BLOCK=16) != key(BLOCK=32)
    assert key(num_warps=4) != key(num_warps=8)
    assert key(3, constexprs=frozenset({0})) != key(5, constexprs=frozenset({0}))
    assert key(2.0, constexprs=frozenset({0})) != key(0.5, constexprs=frozenset({0}))


def test_uncacheable_calls_take_tritons_entry():
    assert key(object()) is None
    assert key([1, 2]) is None
    assert key(W=torch.zeros(2)) is None              # a tensor keyword
    assert key(torch.zeros(2), constexprs=frozenset({0})) is None


def test_interpreter_and_stand_ins_take_tritons_entry():
    """Objects that are not compiled JITFunctions (the interpreter's, autotune's recorders) are called as
    kernel[grid](...)."""
    calls = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k))

    L.launch(StandIn(), (3, 1), 1, 2, BLOCK=4)
    assert calls == [((3, 1), (1, 2), {"BLOCK": 4})]


if HAS_CUDA:
    import triton
    import triton.language as tl

    @triton.jit
    def _axpb(x_ptr, out_ptr, n, a, B: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=m) * a + B, mask=m)


@pytest.mark.gpu
def test_direct_launches_match_tritons_entry(monkeypatch):
    """Repeat calls (the direct launcher) with every kind of key change give what Triton's entry gives."""
    base = torch.randn(1000, device="cuda")
    cases = [(base, 1000, 2.0, 1.0), (base, 1000, -3.0, 1.0), (base, 1, 2.0, 1.0), (base, 992, 2.0, 1.0),
             (base[1:], 999, 2.0, 1.0), (base, 1000, 2.0, 4.0), (base.double(), 1000, 2.0, 1.0)]
    for x, n, a, b in cases * 2:   # the second pass hits the cache
        out = torch.full_like(x, float("nan"))
        L.launch(_axpb, (triton.cdiv(n, 128),), x, out, n, a, B=b, BLOCK=128)
        torch.testing.assert_close(out[:n], x[:n] * a + b)
        assert out[n:].isnan().all()
    assert sum(k[0] is _axpb for k in L._launcher.entries) == 6   # the two a values share one binary


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 300])
def test_layer_identical_with_and_without_direct_launches(monkeypatch, T):
    x, w = make_layer(T, 256, 13, 64, 128, dtype=torch.bfloat16, device="cuda", seed=T)
    with torch.no_grad():
        ops.deco_ffn(x, **w, backend="triton")                  # compile and cache
        fast = ops.deco_ffn(x, **w, backend="triton")
    monkeypatch.setenv("DECO_KERNELS_FAST_LAUNCH", "0")
    with torch.no_grad():
        slow = ops.deco_ffn(x, **w, backend="triton")
    if T > 8:   # the prefill's fp32 atomics may add in another order
        torch.testing.assert_close(fast, slow, rtol=1e-2, atol=1e-2)
    else:
        assert torch.equal(fast, slow)
