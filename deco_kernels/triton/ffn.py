"""The DECO layer forward on Triton: picks the small-batch or the grouped path and launches its kernels.

Arguments arrive validated by deco_kernels.ops (shapes, dtypes, devices, knobs); this file checks only what the
Triton kernels add (power-of-two expert width, no autograd yet) and owns allocation and grids.
"""
from __future__ import annotations

import torch
import triton

from .. import layout
from ..ops import dense_swiglu
from ..reference.ops import NORM_EPS
from .grouped import _group_kernel, _grouped_down_kernel, _grouped_up_kernel
from .router import _router_kernel
from .small_batch import _union_down_kernel, _union_up_kernel

# Up to this many tokens one pass over the union of the batch's active experts beats grouping by expert.
SMALL_BATCH_MAX = 64


def _empty(*shape, device, dtype):
    """Every buffer the kernels write is allocated here, so tests can poison them all with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


_counter_cache: dict = {}


def _counters(device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for the last-program reductions. Kernels leave them at zero again, so
    one buffer per device serves every call (calls on one device run in stream order; a second stream that
    runs the same kernels concurrently would need its own)."""
    buf = _counter_cache.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        _counter_cache[device] = buf
    return buf


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs use exact fp32 products (TF32 off); 16-bit inputs ignore the flag.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bias_args(bias, n: int, device):
    """(scalar, vector-or-None): a tensor bias travels as an fp32 [N] vector, a number as a kernel argument."""
    if isinstance(bias, torch.Tensor):
        return 0.0, bias.detach().to(device=device, dtype=torch.float32).expand(n).contiguous()
    return float(bias), None


def _router(x, w_router, wbar, bias_s, bias_v, threshold, max_active, g, mu, gt=None):
    T, d = x.shape
    n = w_router.shape[0]
    block_t = 32 if T <= 32 else 64
    low_precision = x.dtype in (torch.float16, torch.bfloat16) and w_router.dtype == x.dtype
    _router_kernel[(triton.cdiv(T, block_t),)](
        x, w_router, wbar, bias_v if bias_v is not None else g, g, gt if gt is not None else g, mu,
        T, n, d, x.stride(0), bias_s, float(threshold), int(max_active or 0),
        HAS_BIAS_VEC=bias_v is not None, WRITE_GT=gt is not None, LOW_PRECISION_DOT=low_precision,
        BLOCK_T=block_t, BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_K=64)


def small_batch_config(T: int) -> dict:
    """Tile config of the small-batch path for T tokens (the autotune harness will replace this default)."""
    # Best of benchmarks/sweep_small_batch.py on the H100 at 1.2b (results/h100/sweep_small_batch_1.2b.json).
    if T <= 1:
        return dict(up_block_r=16, up_block_k=256, up_warps=4, up_stages=3, down_block_d=64, down_group=4,
                    down_warps=4)
    if T <= 16:
        return dict(up_block_r=64, up_block_k=256, up_warps=4, up_stages=3, down_block_d=16, down_group=4,
                    down_warps=4)
    return dict(up_block_r=16, up_block_k=64, up_warps=8, up_stages=4, down_block_d=64, down_group=2,
                down_warps=4)


def _small_batch(x, w, wbar, bias_s, bias_v, threshold, max_active, g, y, cfg=None):
    T, d = x.shape
    n, de, ds = w["w_router"].shape[0], w["gamma"].shape[0], w["ws_gate"].shape[0]
    cfg = cfg or small_batch_config(T)
    prec = _precision(x.dtype)
    block_t = max(16, triton.next_power_of_2(T))
    block_r = min(cfg["up_block_r"], de)  # row blocks never straddle two experts
    h = _empty(T, n * de, device=x.device, dtype=torch.float32)
    hs = _empty(T, ds, device=x.device, dtype=torch.float32)
    mu = _empty(T, device=x.device, dtype=torch.float32)
    # max_active needs every logit of a token at once: then the router kernel runs first (gates and mu).
    gates_given = max_active is not None
    if gates_given:
        _router(x, w["w_router"], wbar, bias_s, bias_v, threshold, max_active, g, mu)
    grid_up = n * (de // block_r) + triton.cdiv(ds, block_r)
    block_tr = triton.next_power_of_2(T)
    _union_up_kernel[(grid_up,)](
        x, w["w_router"], w["w_up"], w["ws_gate"], w["ws_up"], wbar, bias_v if bias_v is not None else g, g, h, hs,
        mu, T, n, d, ds, x.stride(0), bias_s, float(threshold),
        DE=de, GATES_GIVEN=gates_given, HAS_BIAS_VEC=bias_v is not None, PREC=prec,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=cfg["up_block_k"],
        BLOCK_TR=block_tr, BLOCK_KR=min(triton.next_power_of_2(d), max(64, 8192 // block_tr)),
        num_warps=cfg["up_warps"], num_stages=cfg["up_stages"])
    # Experts per down program: fewer as T grows, so the [T, GROUP, DE] tile stays in registers.
    block_d, group = cfg["down_block_d"], cfg["down_group"]
    grid = (triton.cdiv(d, block_d), triton.cdiv(n, group))
    part = _empty(grid[1], T, d, device=x.device, dtype=torch.float32)
    _union_down_kernel[grid](
        h, hs, mu, g, w["router_scale"], w["gamma"], w["w_down"], w["ws_down"], part, _counters(x.device, grid[0]),
        y, T, n, d, ds, y.stride(0), NORM_EPS,
        DE=de, BLOCK_DS=max(16, triton.next_power_of_2(ds)), PREC=prec, BLOCK_T=block_t,
        BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_D=block_d, GROUP=group, num_warps=cfg["down_warps"])


def _grouped(x, w, wbar, bias_s, bias_v, threshold, max_active, g, y):
    T, d = x.shape
    n, de = w["w_router"].shape[0], w["gamma"].shape[0]
    prec = _precision(x.dtype)
    dev = x.device
    mu = _empty(T, device=dev, dtype=torch.float32)
    gt = _empty(n, T, device=dev, dtype=torch.float32)
    _router(x, w["w_router"], wbar, bias_s, bias_v, threshold, max_active, g, mu, gt)
    tokens = _empty(n, T, device=dev, dtype=torch.int32)
    counts = _empty(n, device=dev, dtype=torch.int32)
    _group_kernel[(n,)](gt, tokens, counts, T, BLOCK=1024)
    act = _empty(n, T, de, device=dev, dtype=x.dtype)
    block_m = 64
    grid = (n, triton.cdiv(T, block_m))
    _grouped_up_kernel[grid](x, w["w_up"], tokens, counts, g, mu, w["router_scale"], w["gamma"], act,
                             T, n, d, x.stride(0), NORM_EPS, DE=de, PREC=prec, BLOCK_M=block_m, BLOCK_K=64)
    # The shared expert is one dense SwiGLU on all tokens (cuBLAS), seeding the fp32 accumulator.
    acc = dense_swiglu(x, w["ws_gate"], w["ws_up"], w["ws_down"]).float()
    _grouped_down_kernel[grid](act, w["w_down"], tokens, counts, acc, T, n, d,
                               DE=de, PREC=prec, BLOCK_M=block_m, BLOCK_D=64)
    y.copy_(acc)


def deco_ffn(x, w_router, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *,
             bias=0.0, threshold=0.0, max_active=None, return_gates=False, activation="norm_silu"):
    """Forward of one DECO layer on Triton; same contract as deco_kernels.ops.deco_ffn (inference only: the
    dispatch point refuses calls that need a backward)."""
    w = dict(w_router=w_router, router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down,
             ws_gate=ws_gate, ws_up=ws_up, ws_down=ws_down)
    de = gamma.shape[0]
    if de < 16 or de & (de - 1):
        raise ValueError(f"gamma: backend 'triton' needs an expert width de that is a power of two >= 16, got {de}")
    n = w_router.shape[0]
    if max_active is not None and max_active >= n:
        max_active = None
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = {k: v.contiguous() for k, v in w.items()}
    T = x2.shape[0]
    y = _empty(T, d, device=x.device, dtype=x.dtype)
    g = _empty(T, n, device=x.device, dtype=torch.float32)
    if T > 0:
        wbar = layout.expert_mean(w["w_up"])
        path = _small_batch if T <= SMALL_BATCH_MAX else _grouped
        path(x2, w, wbar, *_bias_args(bias, n, x.device), threshold, max_active, g, y)
    y = y.reshape(*lead, d)
    return (y, g.reshape(*lead, n)) if return_gates else y
