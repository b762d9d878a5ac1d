"""The DECO layer forward on CuPy: CUDA C kernels (common.cuh, decode.cu, prefill.cu) compiled at run time by
NVRTC through cupy.RawModule and launched on torch's current stream with torch tensors' raw pointers
(zero-copy, no cupy arrays). Outputs and scratch are torch tensors.

Arguments arrive validated by deco_kernels.ops (shapes, dtypes, devices, knobs); this file checks only what the
kernels add (x's dtype, the expert width) and owns allocation and launches. Inference only: there is no
backward (ops.deco_ffn refuses autograd on this backend before it gets here).
"""
from __future__ import annotations

import cupy
import numpy as np
import torch

from .. import backends, layout
from ..ops import dense_swiglu_fp32
from ..reference.ops import NORM_EPS
from . import geometry as geo

_modules: dict = {}   # (device index, compile options) -> cupy.RawModule
_kernels: dict = {}   # (device index, compile options, kernel name) -> cupy.RawKernel
_smem_optin: dict = {}  # same key -> dynamic shared memory bytes the kernel was opted in to
_streams: dict = {}   # (device index, stream handle) -> cupy stream wrapping torch's
_scratch: dict = {}
# prefill_down adds four adjacent fp32 values with one red.global.add.v4.f32 on sm_90 when d % 4 == 0; False
# forces scalar atomics (benchmarks/probe_decode_paths.py times both).
VECTOR_REDUCTIONS = True


def _empty(*shape, device, dtype):
    """Every buffer the kernels write is allocated here, so tests can poison them all with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _zeroed(device, dtype, n: int) -> torch.Tensor:
    """A zero-filled scratch buffer per (device, dtype): the routers' arrival counters (the decode router's one,
    the prefill router's one per token block), which the last block to arrive leaves at zero again, so one buffer
    serves every call (and CUDA-graph replays) in stream order. 1024 counters cover prefills of up to 65536
    tokens without reallocating (a graph captured before a reallocation would keep the freed buffer)."""
    buf = _scratch.get((device, dtype))
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=dtype)
        _scratch[(device, dtype)] = buf
    return buf


def module(device_index: int, options: tuple) -> "cupy.RawModule":
    """The compiled module for ``options`` (geometry.compile_options) on a device, compiled once (NVRTC, for the
    device's architecture) and cached; cupy also caches the binary on disk."""
    key = (device_index, options)
    mod = _modules.get(key)
    if mod is None:
        with cupy.cuda.Device(device_index):
            mod = cupy.RawModule(code=geo.source(), options=options)
            mod.compile()
        _modules[key] = mod
    return mod


def _kernel(device_index: int, options: tuple, name: str):
    key = (device_index, options, name)
    k = _kernels.get(key)
    if k is None:
        with cupy.cuda.Device(device_index):
            k = module(device_index, options).get_function(name)
        _kernels[key] = k
    return k


def _stream(device: torch.device):
    """torch's current stream on ``device`` as a cupy stream (so kernels join torch's stream order and CUDA-graph
    captures)."""
    ts = torch.cuda.current_stream(device)
    key = (device.index, ts.cuda_stream)
    s = _streams.get(key)
    if s is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        s = from_external(ts) if from_external else cupy.cuda.ExternalStream(ts.cuda_stream, device.index)
        _streams[key] = s
    return s


def _p(t) -> np.uint64:
    """A kernel pointer argument: the tensor's data pointer, or NULL for None."""
    return np.uint64(0 if t is None else t.data_ptr())


def _i32(v) -> np.int32:
    return np.int32(v)


def _i64(v) -> np.int64:
    return np.int64(v)


def _f32(v) -> np.float32:
    return np.float32(v)


class _Launcher:
    """Launches kernels of one module on torch's current stream of one device. ``spec`` holds the
    geometry.compile_options arguments; specialise() adds the path's (which kernels the module holds)."""

    def __init__(self, device: torch.device, **spec):
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", self.index)
        self.spec = spec
        self.options = geo.compile_options(**spec)

    def specialise(self, **more) -> "_Launcher":
        return _Launcher(self.device, **self.spec, **more)

    def __call__(self, name: str, grid, threads: int, *args, smem: int = 0):
        """Launch ``name``; ``smem``: bytes of dynamic shared memory (above 48 KB the kernel is opted in once,
        outside any CUDA-graph capture as long as the first call runs eagerly)."""
        grid = tuple(grid) + (1,) * (3 - len(grid))
        with cupy.cuda.Device(self.index), _stream(self.device):
            kernel = _kernel(self.index, self.options, name)
            key = (self.index, self.options, name)
            if smem > _smem_optin.get(key, 48 * 1024):
                kernel.max_dynamic_shared_size_bytes = smem
                _smem_optin[key] = smem
            kernel(grid, (threads, 1, 1), args, shared_mem=smem)


def _bias_args(bias, n: int, device):
    """(scalar, vector-or-None): a tensor bias travels as an fp32 [N] vector, a number as a kernel argument."""
    if isinstance(bias, torch.Tensor):
        return 0.0, bias.detach().to(device=device, dtype=torch.float32).expand(n).contiguous()
    return float(bias), None


def _decode(launch, x, w, wbar, bias_s, bias_v, threshold, max_active, g, y, vec):
    T, d = x.shape
    n, de, ds = w["w_router"].shape[0], w["gamma"].shape[0], w["ws_gate"].shape[0]
    dev = x.device
    launch = launch.specialise(decode_tt=geo.tokens_per_pass(T))
    grids = geo.decode_grids(n, de, ds, d)
    f32 = torch.float32
    mu = _empty(T, device=dev, dtype=f32)
    h = _empty(T, n * de, device=dev, dtype=f32)
    hs = _empty(T, ds, device=dev, dtype=f32)
    xs = _i64(x.stride(0))
    gates_given = max_active is not None
    if gates_given:  # the top-k needs all of a token's logits: the router kernel writes g and mu first
        gt = _empty(n, T, device=dev, dtype=f32)
        launch("deco_decode_router", (grids["router"],), geo.DECODE_THREADS,
               _p(x), xs, _p(w["w_router"]), _p(wbar), _p(bias_v), _f32(bias_s), _f32(threshold),
               _i32(max_active), _i32(T), _i32(n), _i32(d), _i32(vec), _p(g), _p(gt), _p(mu),
               _p(_zeroed(dev, torch.int32, 1)))
    launch("deco_decode_up", (grids["up"],), geo.DECODE_THREADS,
           _p(x), xs, _p(w["w_router"]), _p(wbar), _p(w["w_up"]), _p(w["ws_gate"]), _p(w["ws_up"]), _p(bias_v),
           _f32(bias_s), _f32(threshold), _i32(gates_given), _i32(T), _i32(n), _i32(d), _i32(ds), _i32(vec),
           _p(g), _p(mu), _p(h), _p(hs))
    launch("deco_decode_down", (grids["down"],), geo.DECODE_THREADS,
           _p(h), _p(hs), _p(mu), _p(g), _p(w["router_scale"]), _p(w["gamma"]), _p(w["w_down"]),
           _p(w["ws_down"]), _i32(T), _i32(n), _i32(d), _i32(ds), _i32(vec), _f32(NORM_EPS), _p(y),
           _i64(y.stride(0)))


def _prefill(launch, x, w, wbar, bias_s, bias_v, threshold, max_active, g, y, vec):
    T, d = x.shape
    n, de = w["w_router"].shape[0], w["gamma"].shape[0]
    dev = x.device
    grids = geo.prefill_grids(T, n, d, x.dtype, de)
    launch = launch.specialise(prefill_warps=grids["tile"]["warps"])
    f32, i32 = torch.float32, torch.int32
    gt = _empty(n, T, device=dev, dtype=f32)
    mu = _empty(T, device=dev, dtype=f32)
    xs = _i64(x.stride(0))
    # Only max_active needs the arrival counters (the top-k waits for all of a token block's expert chunks).
    arrivals = _zeroed(dev, i32, grids["router_counters"]) if max_active else None
    launch("deco_prefill_router", grids["router"], grids["router_threads"],
           _p(x), xs, _p(w["w_router"]), _p(wbar), _p(bias_v), _f32(bias_s), _f32(threshold),
           _i32(max_active or 0), _i32(T), _i32(n), _i32(d), _i32(vec), _p(g), _p(gt), _p(mu), _p(arrivals))
    tokens = _empty(n, T, device=dev, dtype=i32)
    counts = _empty(n, device=dev, dtype=i32)
    launch("deco_group_tokens", grids["group"], grids["group_threads"], _p(gt), _i32(T), _p(tokens), _p(counts))
    # Activations of the active (token, expert) pairs, rows of expert e in token order (only rows < counts[e]
    # are written and read).
    act = _empty(n, T, de, device=dev, dtype=x.dtype)
    launch("deco_prefill_up", grids["up"], grids["expert_threads"],
           _p(x), xs, _p(w["w_up"]), _p(tokens), _p(counts), _p(g), _p(mu), _p(w["router_scale"]),
           _p(w["gamma"]), _i32(T), _i32(n), _i32(d), _i32(vec), _f32(NORM_EPS), _p(act), smem=grids["up_smem"])
    # The shared expert is one dense SwiGLU on all tokens (cuBLAS), seeding the fp32 accumulator the experts'
    # down-projections add into with atomics.
    acc = dense_swiglu_fp32(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    launch("deco_prefill_down", grids["down"], grids["expert_threads"],
           _p(act), _p(w["w_down"]), _p(tokens), _p(counts), _i32(T), _i32(n), _i32(d), _i32(grids["fb"]),
           _i32(vec), _i32(VECTOR_REDUCTIONS and d % 4 == 0), _p(acc), smem=grids["down_smem"])
    y.copy_(acc)


def deco_ffn(x, w_router, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *,
             bias=0.0, threshold=0.0, max_active=None, return_gates=False, activation="norm_silu",
             ldmatrix=True):
    """Forward of one DECO layer on CuPy; same contract as deco_kernels.ops.deco_ffn (inference only).

    T <= geometry.DECODE_MAX_T tokens take the decode kernels (two launches, CUDA-graph capturable: the up
    kernel computes each expert's gates and skips inactive experts, the down kernel finds the active experts
    from the gates; a router launch runs first for max_active, whose top-k needs all of a token's logits);
    more tokens take the grouped prefill kernels (router, grouping, expert up + NormSiLU into an activation
    buffer, expert down with fp32 atomics; the shared expert through cuBLAS). ``ldmatrix=False`` loads
    tensor-core fragments with plain shared loads (a debugging switch; same results)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_router, router_scale, w_up, gamma, w_down,
                                                                  ws_gate, ws_up, ws_down)):
        raise NotImplementedError("backend 'cupy' runs inference only: call it under torch.no_grad() or use "
                                  "backend='torch' or 'triton' for training")
    if activation != "norm_silu":
        raise ValueError(f"activation: backend 'cupy' implements only 'norm_silu', got {activation!r}")
    if x.device.type != "cuda":
        raise ValueError(f"x: backend 'cupy' needs CUDA tensors, got device {x.device}")
    n, de = w_router.shape[0], gamma.shape[0]
    geo.check_supported(x.dtype, de)
    if max_active is not None and max_active >= n:
        max_active = None
    w = dict(w_router=w_router, router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down,
             ws_gate=ws_gate, ws_up=ws_up, ws_down=ws_down)
    # .contiguous() returns the tensor itself when it already is: the wbar cache (layout) keys on it.
    w = {k: v.contiguous() for k, v in w.items()}
    w["w_router"] = w["w_router"].to(geo.router_dtype(w_router.dtype))
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    y = _empty(T, d, device=x.device, dtype=x.dtype)
    g = _empty(T, n, device=x.device, dtype=torch.float32)
    if T > 0:
        wbar = layout.expert_mean(w["w_up"])
        launch = _Launcher(x.device, x_dtype=x.dtype, w_router_dtype=w["w_router"].dtype,
                           scale_dtype=router_scale.dtype, gamma_dtype=gamma.dtype, de=de, ldmatrix=ldmatrix)
        vec = geo.vector_loads_ok(d, x2.stride(0), x2.element_size(),
                                  [x2.data_ptr(), wbar.data_ptr()] + [w[k].data_ptr() for k in
                                                                      ("w_router", "w_up", "w_down", "ws_gate",
                                                                       "ws_up", "ws_down")])
        path = _decode if T <= geo.DECODE_MAX_T else _prefill
        if path is _prefill:
            backends.alert_not_deterministic(f"backend 'cupy' at {T} tokens (the grouped prefill)")
        path(launch, x2, w, wbar, *_bias_args(bias, n, x.device), threshold, max_active, g, y, vec)
    y = y.reshape(*lead, d)
    return (y, g.reshape(*lead, n)) if return_gates else y
