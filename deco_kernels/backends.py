"""Which backends exist here, and the choice behind backend="auto".

Backends: "torch" (the reference path, always there, differentiable), "triton" (inference kernels, and sparse
training kernels with a backward whenever autograd needs one), "cupy" (inference kernels compiled by NVRTC: the
path for Jetson, where Triton has no official wheel). The optional packages are imported lazily so
`import deco_kernels` works with neither installed.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch

log = logging.getLogger("deco_kernels")

BACKENDS = ("torch", "triton", "cupy")
INSTALL_HINT = {
    "triton": 'pip install "deco-kernels[triton]" (needs a CUDA GPU, or TRITON_INTERPRET=1 on the CPU)',
    "cupy": 'pip install "deco-kernels[cupy]" (cupy-cuda12x), or cupy-cuda13x for CUDA 13 (needs a CUDA GPU)',
}
# Backends whose DECO-layer kernels exist in this version of the library.
IMPLEMENTED = {"torch", "triton", "cupy"}
# Backends whose kernels have a backward pass; "auto" picks only these when autograd needs one.
DIFFERENTIABLE = {"torch", "triton"}


_present: dict[str, bool] = {}


def _module_present(name: str) -> bool:
    # Looked up once: torch.compile can read a dict but not trace importlib.util.find_spec.
    if name not in _present:
        try:
            _present[name] = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as absent
            _present[name] = False
    return _present[name]


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run a layer whose tensors live on ``device``."""
    if backend == "torch":
        return True
    if backend not in IMPLEMENTED:
        return False
    if backend == "triton":
        return _module_present("triton") and (device.type == "cuda" or interpreting())
    if backend == "cupy":
        return _module_present("cupy") and device.type == "cuda" and _cuda_present()
    return False


def _cuda_present() -> bool:
    if "torch.cuda" not in _present:
        _present["torch.cuda"] = torch.cuda.is_available()
    return _present["torch.cuda"]


def _unavailable_reason(backend: str, device: torch.device) -> str:
    if backend in INSTALL_HINT and not _module_present(backend):
        return f"{backend} is not installed: {INSTALL_HINT[backend]}"
    if backend == "cupy":
        return "it runs CUDA tensors only (with a CUDA GPU present)"
    return INSTALL_HINT.get(backend, "")


_announced: set[tuple[str, str]] = set()


def resolve(backend: str, device: torch.device, needs_grad: bool = False) -> str:
    """Map a requested backend to the one that runs; raise a clear error when it cannot.

    "auto" takes the first of triton, cupy, torch that is available for CUDA tensors (the interpreter is for
    tests that ask for triton by name, never an automatic choice) and, when autograd needs a backward, has one.
    """
    env = os.environ.get("DECO_BACKEND")
    if backend == "auto" and env:
        backend = env
    if backend == "auto":
        for name in ("triton", "cupy", "torch"):
            if name != "torch" and device.type != "cuda":
                continue
            if needs_grad and name not in DIFFERENTIABLE:
                continue
            if available(name, device):
                if (name, device.type) not in _announced:
                    _announced.add((name, device.type))
                    log.info("deco_kernels: backend 'auto' runs %r on %s", name, device.type)
                return name
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in IMPLEMENTED:
        raise NotImplementedError(f"backend {backend!r} is not implemented yet in this version of deco_kernels; "
                                  f"use backend='torch' or 'auto'")
    if not available(backend, device):
        raise RuntimeError(f"backend {backend!r} is not available for tensors on {device}: "
                           f"{_unavailable_reason(backend, device)}")
    if needs_grad and backend not in DIFFERENTIABLE:
        raise NotImplementedError(f"backend {backend!r} runs inference only for now: call it under "
                                  f"torch.no_grad() or use backend='torch' (or 'auto') for training")
    return backend


def alert_not_deterministic(what: str) -> None:
    """What torch does for its own nondeterministic ops under torch.use_deterministic_algorithms(True), for a
    path of ours whose fp32 atomics make results vary between runs in the last bits: raise a RuntimeError naming
    ``what`` (a warning with warn_only=True). Nothing when determinism was not asked for."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{what} sums with fp32 atomics, so its results can differ between runs in the last bits, but "
           "torch.use_deterministic_algorithms(True) is set: use backend 'triton' (deterministic then) or "
           "'torch'")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)
