"""Optional backends stay optional: `import deco_kernels` and backend "auto" work with triton absent, cupy absent
and both absent, and asking for a backend that cannot run says how to get it.

Each case runs in a fresh interpreter whose sys.meta_path starts with a finder that raises ImportError for the
blocked packages (as a missing or broken install does); a faked package is one whose spec is found but whose
import would fail, which is all the availability check looks at. A faked GPU patches torch.cuda.is_available.
``world(...)`` changes the blocked / faked sets and the GPU within one interpreter (and forgets what backends
looked up), so several situations share one torch import.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import importlib.abc, importlib.machinery, sys

BLOCKED = {blocked!r}
FAKED = {faked!r}

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        if top in FAKED:
            return importlib.machinery.ModuleSpec(name, None)
        return None

sys.meta_path.insert(0, Finder())
import torch
if {fake_gpu!r}:
    torch.cuda.is_available = lambda: True
import deco_kernels
from deco_kernels import backends, ops, reference
cpu, cuda = torch.device("cpu"), torch.device("cuda")

def layer(T=3, d=8, N=5, de=4, ds=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, d, generator=g)
    w = dict(w_router=torch.randn(N, d, generator=g), router_scale=torch.ones(N),
             w_up=torch.randn(N * de, d, generator=g), gamma=torch.ones(de),
             w_down=torch.randn(d, N * de, generator=g), ws_gate=torch.randn(ds, d, generator=g),
             ws_up=torch.randn(ds, d, generator=g), ws_down=torch.randn(d, ds, generator=g))
    return x, w

def world(blocked=(), faked=(), gpu=False):
    BLOCKED.clear(); BLOCKED.update(blocked)
    FAKED.clear(); FAKED.update(faked)
    torch.cuda.is_available = lambda: gpu
    backends._present.clear()

def raises(exc, match, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        assert match in str(e), f"{{match!r}} not in {{e}}"
        return str(e)
    raise AssertionError(f"{{fn.__name__}} did not raise {{exc.__name__}}")
"""


def run_case(body: str, blocked=(), faked=(), fake_gpu=False) -> str:
    code = PRELUDE.format(blocked=set(blocked), faked=set(faked), fake_gpu=fake_gpu) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k not in ("DECO_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stdout.strip().endswith("ok"), proc.stdout
    return proc.stdout


ABSENT = [pytest.param(("triton",), id="no-triton"), pytest.param(("cupy",), id="no-cupy"),
          pytest.param(("triton", "cupy"), id="neither")]


@pytest.mark.parametrize("blocked", ABSENT)
def test_packages_absent(blocked):
    run_case("""
        x, w = layer()
        for name in BLOCKED:
            assert not backends.available(name, cuda) and not backends.available(name, cpu)
            # asking for it by name says how to install it
            for device in (cpu, cuda):
                msg = raises(RuntimeError, "pip install", backends.resolve, name, device)
                assert f"{name} is not installed" in msg, msg
            raises(RuntimeError, "pip install", ops.deco_ffn, x, **w, backend=name)
        # auto on CPU tensors is the reference, bit for bit
        assert backends.resolve("auto", cpu) == "torch"
        assert torch.equal(ops.deco_ffn(x, **w, backend="auto"), reference.deco_ffn(x, **w))
        # the host-side plan of the CuPy backend imports without cupy
        from deco_kernels.cupy import geometry
        assert geometry.tokens_per_pass(3) == 4
        assert not BLOCKED & set(sys.modules), "a blocked package was imported"
        print("ok")
    """, blocked=blocked, fake_gpu=True)


def test_auto_choice_by_what_is_present():
    run_case("""
        # a GPU, cupy, no triton: auto takes cupy for CUDA tensors, torch when autograd needs a backward
        world(blocked=("triton",), faked=("cupy",), gpu=True)
        assert backends.resolve("auto", cuda) == "cupy"
        assert backends.resolve("auto", cpu) == "torch"
        assert backends.resolve("auto", cuda, needs_grad=True) == "torch"
        msg = raises(NotImplementedError, "inference only", backends.resolve, "cupy", cuda, needs_grad=True)
        assert "torch.no_grad()" in msg and "backend='torch'" in msg
        raises(RuntimeError, "CUDA tensors", backends.resolve, "cupy", cpu)
        assert "cupy" in backends.IMPLEMENTED and "cupy" not in backends.DIFFERENTIABLE

        # both installed: triton first
        world(faked=("triton", "cupy"), gpu=True)
        assert backends.resolve("auto", cuda) == "triton"

        # cupy installed but no GPU: not available, and the error says why
        world(blocked=("triton",), faked=("cupy",), gpu=False)
        assert not backends.available("cupy", cuda)
        raises(RuntimeError, "CUDA tensors", backends.resolve, "cupy", cuda)
        assert backends.resolve("auto", cuda) == "torch"

        # nothing optional: auto is torch everywhere
        world(blocked=("triton", "cupy"), gpu=True)
        assert backends.resolve("auto", cuda) == "torch"
        print("ok")
    """)
