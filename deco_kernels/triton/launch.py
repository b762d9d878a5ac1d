"""The one place the Triton backend launches its kernels: ``launch(kernel, grid, *args, **meta)``.

Why not ``kernel[grid](*args, **meta)`` everywhere: Triton's JIT entry re-derives, on every call, what the
compiled binary depends on (binding the arguments, each one's specialisation, a string cache key, option reads
from the environment). On the lent H200's host that costs 20 µs for a 4-argument kernel and 48 µs for a
30-argument one, against 7 and 17 µs for calling the compiled kernel's launcher directly
(`benchmarks/probe_launch.py`, `benchmarks/results/h200/probe_launch.json`); an eager training step of one
layer makes about a dozen such launches.

So the first call with a given specialisation goes through Triton (which compiles, caches and launches it) and
keeps the CompiledKernel it returns; later calls with the same key call that kernel's launcher. The key is at
least as fine as Triton's own specialisation: per tensor its dtype and whether its address is 16-byte aligned;
per int whether it equals 1, whether 16 divides it, and its integer type's range; bools by value; floats and
None by type; the constexpr and option keywords by value; the current device. Two calls with one key therefore
run the binary Triton would have picked. Anything else (a callable grid, an argument of another type, the
interpreter, a machine without a GPU driver, a Triton without these internals, or DECO_KERNELS_FAST_LAUNCH=0)
takes Triton's own entry. The direct call passes the launcher what Triton's entry passes it, launch hooks
(profilers such as proton) and their metadata included. Measured on whole layers the saving was within the
lent host's noise (benchmarks/NOTES.md, 2026-12-04 night).
"""
from __future__ import annotations

import os

from triton.runtime.jit import JITFunction

from ..backends import interpreting

_INT32 = (-(2 ** 31), 2 ** 31)
_INT64 = (-(2 ** 63), 2 ** 63)
_SCALARS = (int, float, bool, str, type(None))  # keyword values a key may hold (a tensor keyword: Triton's entry)


def enabled() -> bool:
    """DECO_KERNELS_FAST_LAUNCH (default 1): 0 sends every launch through Triton's JIT entry."""
    return os.environ.get("DECO_KERNELS_FAST_LAUNCH", "1") not in ("0", "")


def _arg_key(a):
    """What Triton's specialisation can depend on for one runtime argument, or None when this module does not
    know the type (the caller then takes Triton's entry)."""
    t = type(a)
    if t is bool:  # by value: finer than Triton (which does not specialise bools) costs at most two binaries
        return ("b", a)
    if t is int:
        width = 0 if _INT32[0] <= a < _INT32[1] else 1 if _INT64[0] <= a < _INT64[1] else 2
        return ("i", a == 1, a % 16 == 0, width)
    if t is float:
        return ("f",)
    if a is None:
        return ("n",)
    dtype = getattr(a, "dtype", None)
    if dtype is not None and hasattr(a, "data_ptr"):
        return (dtype, a.data_ptr() % 16 == 0)
    return None


def spec_key(args, meta, constexprs=frozenset()) -> tuple | None:
    """The cache key of a call's positional arguments and keywords (None: not cacheable here). ``constexprs``:
    the positions of constexpr parameters among the positional arguments, keyed by value."""
    keys = tuple(("c", a) if i in constexprs else _arg_key(a) for i, a in enumerate(args))
    if None in keys or any(type(v) not in _SCALARS for v in meta.values()):
        return None
    if constexprs and any(type(args[i]) not in _SCALARS for i in constexprs if i < len(args)):
        return None
    return keys, tuple(sorted(meta.items()))


class _Entry:
    """A compiled kernel and how to complete a call's arguments for its launcher (every parameter in declared
    order: the positional ones, then the keywords or their defaults)."""

    __slots__ = ("compiled", "tail")

    def __init__(self, compiled, tail):
        self.compiled = compiled
        self.tail = tail


class _Launcher:
    def __init__(self):
        self.entries: dict = {}
        self.params: dict = {}
        self.driver = None
        self.knobs = None

    def _bind(self) -> bool:
        """Triton's driver and launch hooks, looked up once; False when this Triton lacks what we call."""
        if self.driver is None:
            try:
                from triton import knobs
                from triton.runtime.driver import driver

                self.driver, self.knobs = driver.active, knobs
                self.get_device = self.driver.get_current_device
                self.get_stream = self.driver.get_current_stream
            except (ImportError, AttributeError, RuntimeError):  # RuntimeError: no GPU driver on this machine
                self.driver = False
        return bool(self.driver)

    def _params(self, kernel):
        """(names and defaults of the kernel's parameters, positions of its constexpr ones), per kernel."""
        info = self.params.get(kernel)
        if info is None:
            info = self.params[kernel] = ([(p.name, p._param.default) for p in kernel.params],
                                          frozenset(i for i, p in enumerate(kernel.params) if p.is_constexpr))
        return info

    def _tail(self, kernel, nargs, meta):
        """The values of the parameters after the positional ones: keywords, else defaults (a parameter
        without either made Triton's entry raise on the first call, before anything was cached)."""
        return tuple(meta[name] if name in meta else default for name, default in self._params(kernel)[0][nargs:])

    def __call__(self, kernel, grid, args, meta):
        if (not isinstance(kernel, JITFunction) or not isinstance(grid, tuple) or not enabled() or interpreting()
                or not self._bind()):
            return kernel[grid](*args, **meta)
        spec = spec_key(args, meta, self._params(kernel)[1])
        if spec is None:
            return kernel[grid](*args, **meta)
        device = self.get_device()
        key = (kernel, device, spec)
        entry = self.entries.get(key)
        if entry is None:
            compiled = kernel[grid](*args, **meta)
            if compiled is None or not hasattr(compiled, "packed_metadata"):
                return compiled
            compiled._init_handles()
            self.entries[key] = _Entry(compiled, self._tail(kernel, len(args), meta))
            return compiled
        c = entry.compiled
        full = args + entry.tail
        stream = self.get_stream(device)
        g0 = grid[0]
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        hooks = self.knobs.runtime
        c.run(g0, g1, g2, stream, c.function, c.packed_metadata, c.launch_metadata(grid, stream, *full),
              hooks.launch_enter_hook, hooks.launch_exit_hook, *full)
        return c


_launcher = _Launcher()


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)`` with less host time on repeat calls (see the module docstring).
    ``grid`` a tuple of ints; ``meta`` the constexpr parameters by name and Triton's launch options
    (num_warps, num_stages, ...)."""
    return _launcher(kernel, grid, args, meta)
