"""What a launcher launches for a config, without a GPU: run ffn's launcher on meta tensors with its Triton
kernels replaced by recorders.

Each record holds the kernel, its grid, its bound arguments (meta tensors carry dtypes and shapes) and its
launch options. The cost model reads grids and constexprs from it; compile.py turns it into a Triton
signature and compiles it for any target. Because the launcher itself computes grids and constexprs, these
stay in step with the kernels when they change.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

_lock = threading.Lock()


@dataclass
class Launch:
    name: str
    kernel: object               # the @triton.jit object (JITFunction, or InterpretedFunction under TRITON_INTERPRET)
    grid: tuple[int, ...]
    args: dict                   # parameter name -> value (tensors on the meta device)
    options: dict = field(default_factory=dict)   # num_warps, num_stages

    @property
    def programs(self) -> int:
        p = 1
        for g in self.grid:
            p *= int(g)
        return p

    def constexprs(self) -> dict:
        return {k: v for k, v in self.args.items() if k in _constexpr_names(self.kernel)}


def _constexpr_names(kernel) -> set:
    params = getattr(kernel, "params", None)
    if params is None:   # InterpretedFunction keeps the JIT parameters on .fn's wrapper in some versions
        params = getattr(getattr(kernel, "fn", None), "params", None)
    if params is None:   # ... or only the Python function: read its annotations
        import inspect

        import triton.language as tl
        return {name for name, p in inspect.signature(kernel.fn).parameters.items()
                if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}
    return {p.name for p in params if getattr(p, "is_constexpr", False)}


def _arg_names(kernel) -> list[str]:
    names = getattr(kernel, "arg_names", None)
    if names is None:
        import inspect
        names = list(inspect.signature(kernel.fn).parameters)
    return list(names)


class _Recorder:
    def __init__(self, name, kernel, out):
        self.name, self.kernel, self.out = name, kernel, out

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            names = _arg_names(self.kernel)
            bound = dict(zip(names, args))
            bound.update(kwargs)
            g = grid(bound) if callable(grid) else grid
            g = tuple(int(v) for v in (g if isinstance(g, tuple) else (g,)))
            self.out.append(Launch(self.name, self.kernel, g, bound, options))
        return launch


def _is_kernel(obj) -> bool:
    return hasattr(obj, "run") and (hasattr(obj, "arg_names") or hasattr(obj, "fn")) and hasattr(obj, "__getitem__")


@contextlib.contextmanager
def recording(*modules):
    """Replace every Triton kernel that each of `modules` references by a recorder; yields the list of launches
    (all modules' in call order). One lock for all of them: nested recordings would wait on each other."""
    out: list[Launch] = []
    saved = [(m, {k: v for k, v in vars(m).items() if _is_kernel(v)}) for m in modules]
    with _lock:
        try:
            for module, kernels in saved:
                for k, v in kernels.items():
                    setattr(module, k, _Recorder(k, v, out))
            yield out
        finally:
            for module, kernels in saved:
                for k, v in kernels.items():
                    setattr(module, k, v)


def meta_layer(T: int, d: int, n: int, de: int, ds: int, dtype=torch.bfloat16, device="meta"):
    """x and the canonical weights of one layer (SPEC §1) as empty tensors on `device`."""
    def e(*shape, dt=dtype):
        return torch.empty(*shape, device=device, dtype=dt)
    w = dict(w_router=e(n, d), router_scale=e(n), w_up=e(n * de, d), gamma=e(de), w_down=e(d, n * de),
             ws_gate=e(ds, d), ws_up=e(ds, d), ws_down=e(d, ds))
    return e(T, d), w


def record(path: str, cfg: dict, T: int, d: int, n: int, de: int, ds: int, dtype=torch.bfloat16) -> list[Launch]:
    """The kernel launches of ffn's `path` launcher ("small_batch" or "grouped") for T tokens and `cfg` (the
    grouped path with cfg's down projection, ffn.down_gemm; the GEMM's torch ops, its zero fill and cuBLAS
    call, are not Triton launches and are not recorded)."""
    from deco_kernels.triton import ffn

    x, w = meta_layer(T, d, n, de, ds, dtype)
    g = torch.empty(T, n, device="meta", dtype=torch.float32)
    y = torch.empty(T, d, device="meta", dtype=dtype)
    launcher = {"small_batch": ffn._small_batch, "grouped": ffn._grouped}[path]
    with recording(ffn) as launches, torch.no_grad():
        launcher(x, w, _meta_mean(d), 0.0, None, 0.0, None, g, y, dict(cfg))
    return launches


def record_router(T: int, d: int, n: int, block_t: int, stages: int, warps: int, block_k: int,
                  dtype=torch.bfloat16) -> list[Launch]:
    """The prefill router's launch alone (ffn._router) at the given geometry, as benchmarks/probe_router.py times
    it."""
    from deco_kernels.triton import ffn

    x, w = meta_layer(T, d, n, 16, 16, dtype)
    g, mu, gt = (torch.empty(*s, device="meta", dtype=torch.float32) for s in ((T, n), (T,), (n, T)))
    with recording(ffn) as launches, torch.no_grad():
        ffn._router(x, w["w_router"], _meta_mean(d), 0.0, None, 0.0, None, g, mu, gt, block_t, stages, warps,
                    block_k)
    return launches


def _meta_mean(d: int):
    """w_up's means.ExpertMean (fp32 wbar, its three bf16 parts) on the meta device."""
    from deco_kernels.triton import means

    return means.ExpertMean(torch.empty(d, device="meta", dtype=torch.float32),
                            torch.empty(3, d, device="meta", dtype=torch.bfloat16))
