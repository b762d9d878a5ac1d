"""The DECO layer forward on Triton: picks the small-batch or the grouped path and launches its kernels.

Arguments arrive validated by deco_kernels.ops (shapes, dtypes, devices, knobs); this file checks only what the
Triton kernels add (power-of-two expert width) and owns allocation and grids; calls that need autograd go to
training.py.
"""
from __future__ import annotations

import functools
import os

import torch

from .. import backends
from ..autotune import config_for
from ..ops import linear_fp32
from ..reference.ops import NORM_EPS
from . import means
from .grouped import _group_kernel, _grouped_down_kernel, _grouped_up_kernel
from .launch import launch
from .router import _router_kernel
from .small_batch import _decode_down_kernel, _union_down_kernel, _up_kernel

# Up to this many tokens one pass over the union of the batch's active experts beats grouping by expert.
SMALL_BATCH_MAX = 64
# Up to this many tokens the small-batch kernels multiply in registers; above, on tensor cores. H200, all four
# presets (results/h200/probe_decode_paths_before_cupy_rewrite.json): at 3 and 4 tokens the tensor-core kernels
# take 18-30 µs, the register ones 25-55 µs; at 2 tokens the register ones win at 0.1b (14.7 vs 17.9 µs) and tie
# at 1.2b.
FMA_MAX_T = 2
# Elements of the largest [rows, d] slab one FMA program loads at once.
FMA_SLAB = 16384
# Router launches of fewer token blocks than this also split K over programs (see _router): one per SM of an
# H100/H200. Against 32, whole layer on the H200 (results/h200/sweep_router_split.json, 16-token blocks): 1.2b
# T=512 116.1 -> 105.9 µs, 0.1b 50.5 -> 47.8; T=4096 makes enough blocks either way.
ROUTER_SPLIT_BLOCKS = 132
# Software-pipelining stages of the router's K loop (router_stages gives 1 at 64-token blocks).
ROUTER_STAGES = 3
# Programmatic dependent launch of the decode down kernel (see pdl_launch); DECO_KERNELS_PDL=0 turns it off.
USE_PDL = os.environ.get("DECO_KERNELS_PDL", "1") != "0"
# K step of the router from ROUTER_LONG_T tokens on (64 below). H200, the router alone under a CUDA graph
# (results/h200/probe_router_warps.json): at T=4096 128 beats 64 for 1.2b / 0.5b / 0.1b (21.7 -> 18.0,
# 17.1 -> 14.8, 11.6 -> 10.4 µs at 32-token blocks); at T=512 64 is better (1.2b 11.9 vs 14.4 at 16-token blocks).
# 16-bit x only: fp32 tiles of 128 columns in 3 stages would pass the shared memory of a block.
ROUTER_LONG_T = 1024
ROUTER_LONG_BLOCK_K = 128
# The down projection of the prefill (grouped.py) and of training (training.py) as one cuBLAS GEMM over
# token-major activations, zero where a gate is off ("gemm"), or the fp32-atomic scatter over the active pairs
# only ("atomics"). DOWN_GEMM None (the default): the prefill's config decides (its "down" key: a tuned cache's
# choice, else grouped_config's "gemm"), training takes the GEMM; 1 or 0 force the GEMM or the atomics
# everywhere; always the GEMM under torch.use_deterministic_algorithms(True). H100, whole layer under CUDA graphs, ~20%
# active (results/h100/probe_ab_down_gemm.json): 1.2b T=128 66.5 -> 62.3 µs, T=512 87.9 -> 73.9, T=2048
# 235.0 -> 190.1, T=4096 401.7 -> 306.4; 0.1b 34.4 -> 33.6, 39.2 -> 36.7, 73.3 -> 62.1, 106.3 -> 92.4; one
# training step at T=4096 from a CUDA graph (results/h100/probe_train_graph.json) 1.2b 1070 -> 935 µs, 0.1b
# 325 -> 324. The GEMM's FLOPs do not shrink with the active ratio, so far sparser layers, or GPUs with less
# compute per byte (the cost model's Jetson Orin caches), may prefer the atomics.
DOWN_GEMM = None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. triton.cdiv and triton.next_power_of_2 are constexpr functions whose
    host-side call costs ~10 µs each (the launchers call them a dozen times per layer); these are plain."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _empty(*shape, device, dtype):
    """Every buffer the kernels write is allocated here, so tests can poison them all with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _token_major(T: int, n: int, de: int, like: torch.Tensor) -> torch.Tensor:
    """A zero-filled token-major activation [T, N*de] in like's dtype: the kernels write the active (token,
    expert) cells (grouped.token_major_cells), the rest stays 0, and one GEMM by the expert weights sums every
    expert (the down projection of the prefill and of training: DOWN_GEMM). Filling it on a side stream beside the
    router and the grouping was slower on the H100, 1.2b and 0.1b at T=512-4096 under CUDA graphs
    (results/h100/probe_ab_zero_fill_beside.json: T=512 79.1 -> 82.6 µs and 37.2 -> 41.2, within 1% at 2048-4096)."""
    return _empty(T, n * de, device=like.device, dtype=like.dtype).zero_()


_scratch: dict = {}


def _zeroed(device, dtype, n: int) -> torch.Tensor:
    """A zero-filled scratch buffer of at least n elements per (device, dtype): fp32 accumulators and int32
    arrival counters. The kernels that use one leave it at zero again, so one buffer serves every call (calls
    on one device run in stream order; kernels of two streams running at once would need their own)."""
    buf = _scratch.get((device, dtype))
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=dtype)
        _scratch[(device, dtype)] = buf
    return buf


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(device: torch.device) -> bool:
    """Launch the decode down kernel with programmatic dependent launch: on sm_90+ it starts while the up kernel
    still runs (which lets it go at once) and waits in-kernel (griddepcontrol.wait) before reading the up
    kernel's outputs, so its launch hides behind the up kernel's tail. Off in the interpreter, below sm_90 and
    with DECO_KERNELS_PDL=0 (USE_PDL)."""
    return USE_PDL and device.type == "cuda" and not backends.interpreting() and _sm90(device.index or 0)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs use exact fp32 products (TF32 off); 16-bit inputs ignore the flag.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bias_args(bias, n: int, device):
    """(scalar, vector-or-None): a tensor bias travels as an fp32 [N] vector, a number as a kernel argument."""
    if isinstance(bias, torch.Tensor):
        return 0.0, bias.detach().to(device=device, dtype=torch.float32).expand(n).contiguous()
    return float(bias), None


def router_stages(block_t: int) -> int:
    """num_stages of the router at block_t tokens per program. 64-token blocks are warpgroup MMAs, whose
    pipelined K loop Triton 3.6 gets wrong on the H200 at 1.2b's 128 experts: gates off by up to 0.6 and
    different on every call, for num_stages 2-4 at 4 or 8 warps; unpipelined they are exact
    (results/h200/defect_router/probe_router.json). tests/test_triton.py test_gpu_router_is_exact_at_every_block
    checks every block size the tuner may pick with what this returns."""
    return 1 if block_t >= 64 else ROUTER_STAGES


def _router(x, w_router, mean, bias_s, bias_v, threshold, max_active, g, mu, gt=None, block_t=None, stages=None,
            warps=4, block_k=None):
    """Gates g [T, N] and mu [T] (gt, g transposed, when given); mean: w_up's means.ExpertMean."""
    T, d = x.shape
    n = w_router.shape[0]
    block_t = block_t or (16 if T <= 16 else 32)
    block_k = block_k or (ROUTER_LONG_BLOCK_K if T > ROUTER_LONG_T and x.element_size() == 2 else 64)
    blocks = cdiv(T, block_t)
    # Under ROUTER_SPLIT_BLOCKS token blocks, K is split too (chunks of >= 256 columns), so that a decode step's
    # router reads w_router on several SMs instead of one. 64-token blocks never split: adding their [64, BLOCK_N]
    # partial tiles costs more than the split saves (1.2b T=512: 139 -> 164 µs, sweep_router_split.json).
    split = 1 if block_t >= 64 else min(cdiv(d, 256), max(1, ROUTER_SPLIT_BLOCKS // blocks))
    block_n = max(16, pow2(n))
    # mu on tensor cores beside the logits where the tile has three spare rows (router.py, MU_MMA).
    mu_mma = x.dtype == torch.bfloat16 and w_router.dtype == torch.bfloat16 and n + 3 <= block_n
    part = _empty(split * T * (block_n + 1), device=x.device, dtype=torch.float32) if split > 1 else g
    launch(
        _router_kernel, (blocks, split), x, w_router, mean.wbar, mean.split, bias_v if bias_v is not None else g,
        g, gt if gt is not None else g, mu, part,
        _zeroed(x.device, torch.int32, blocks), T, n, d, x.stride(0), cdiv(cdiv(d, split), block_k) * block_k,
        bias_s, float(threshold), int(max_active or 0), HAS_BIAS_VEC=bias_v is not None, WRITE_GT=gt is not None,
        MU_MMA=mu_mma, SPLIT_K=split, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        num_stages=router_stages(block_t) if stages is None else stages)


def _group_by_expert(x, w_router, mean, bias_s, bias_v, threshold, max_active, g, mu, router_block_t=None,
                     offsets=None):
    """Router (gates g, mu) then the tokens of each expert: (tokens [N, T] int32, counts [N] int32), expert e's
    tokens in token order in tokens[e, :counts[e]]; the exclusive prefix sum of the counts into ``offsets``
    [N+1] int32 when given. Shared by the prefill and the training forward."""
    T = x.shape[0]
    n = w_router.shape[0]
    gt = _empty(n, T, device=x.device, dtype=torch.float32)
    _router(x, w_router, mean, bias_s, bias_v, threshold, max_active, g, mu, gt, router_block_t)
    return _group_gates(gt, offsets)


def _group_gates(gt, offsets=None):
    """The tokens of each expert from the transposed gates gt [N, T] (fp32): (tokens [N, T], counts [N]), and
    offsets [N+1] (the exclusive prefix sum of counts) written when given."""
    n, T = gt.shape
    tokens = _empty(n, T, device=gt.device, dtype=torch.int32)
    counts = _empty(n, device=gt.device, dtype=torch.int32)
    launch(_group_kernel, (n,), gt, tokens, counts, counts if offsets is None else offsets,
           _zeroed(gt.device, torch.int32, 1), T, n, WRITE_OFFSETS=offsets is not None, BLOCK=1024,
           BLOCK_N=max(16, pow2(n)))
    return tokens, counts


def small_batch_config(T: int, dtype: torch.dtype = torch.bfloat16, use_dot: bool | None = None) -> dict:
    """Default tile config of the small-batch path for T tokens (a tuned cache, deco_kernels.autotune, wins).

    use_dot: tensor cores (split-K up kernel and the expert-group union down kernel), else register FMAs (and
    the decode down kernel); None picks by T, True / False give the defaults of that regime at T (used to fill
    the keys a cached config lacks). rows: up-projection rows per program; block_k: K step of the tensor-core
    up-projection; split_k: K-chunks of d, each its own up program; block_d: output features per down program;
    group: experts per union down program; slots: active experts per round of the decode down kernel's loop;
    presum (split_k > 1): the up kernel sums the split partial h tiles, so the down kernel's feature blocks
    read one per expert (H200: 0.1b T=64 26.2 µs against 30.3 without; 1 µs slower at 8-16 tokens,
    results/h200/probe_ab_presum_h.json), off by default and a tuned choice."""
    if use_dot is None:
        use_dot = T > FMA_MAX_T
    if not use_dot:
        return dict(use_dot=False, rows=4, up_warps=4, block_d=16, slots=16, down_warps=8)
    wide = dtype == torch.float32  # 4-byte tiles: shorter K steps and feature blocks fit shared memory
    # Best of benchmarks/sweep_tiles.py on the H200 at 1.2b and 0.1b (results/h200/sweep_tiles_*.json), bf16.
    # Up to 16 tokens: whole experts (rows=64) in 4 K-chunks, 4 warps, groups of 4 experts per down program
    # (1.2b T=8: 30.1 µs; K unsplit 42.3, groups of 8 24% slower). From 17 tokens every down program re-reads
    # the partial h of its experts for each chunk ([T, de] fp32 each), which outweighs the K-split: one chunk
    # with long K steps, wide feature blocks and groups of 8 (1.2b T=64: 46.3 µs against 70.0 with 2 chunks).
    if T <= 16:
        return dict(use_dot=True, rows=64, block_k=64, split_k=4, up_warps=4, up_stages=3,
                    block_d=64 if wide else 128, group=4, down_warps=4, down_stages=3, presum=False)
    return dict(use_dot=True, rows=64, block_k=64 if wide else 256, split_k=1, up_warps=4, up_stages=3,
                block_d=32 if wide else 256, group=8, down_warps=8, down_stages=3, presum=False)


def _small_batch(x, w, mean, bias_s, bias_v, threshold, max_active, g, y, cfg=None):
    T, d = x.shape
    n, de, ds = w["w_router"].shape[0], w["gamma"].shape[0], w["ws_gate"].shape[0]
    cfg = cfg or config_for("small_batch", x.device, T, x.dtype, d, n, de, ds) or small_batch_config(T, x.dtype)
    use_dot = bool(cfg.get("use_dot", T > FMA_MAX_T))
    # A partial config (a sweep's) takes the keys it lacks from the defaults of its own regime; the tune cache
    # never yields one (the lookup ignores entries tuned for an earlier kernel).
    cfg = {**small_batch_config(T, x.dtype, use_dot), **cfg}
    dev = x.device
    f32 = torch.float32
    split = int(cfg["split_k"]) if use_dot else 1
    rows = min(cfg["rows"], de)  # row blocks never straddle two experts
    # Without a dot the whole [rows, d] slab (and the router row) is one load, capped to stay in registers.
    block_k = cfg["block_k"] if use_dot else min(pow2(d), max(16, FMA_SLAB // rows))
    k_chunk = cdiv(cdiv(d, split), block_k) * block_k if use_dot else d   # a chunk past d leaves zero partials
    block_t = max(16, pow2(T)) if use_dot else pow2(T)
    # The up kernel's partial sums over the split K-chunks (one chunk in decode).
    h = _empty(split, T, n * de, device=dev, dtype=f32)
    hs = _empty(split, T, 2 * ds, device=dev, dtype=f32)  # the shared expert's gate and up columns
    # max_active needs every logit of a token at once: then the router kernel runs first (gates and mu).
    gates_given = max_active is not None
    if gates_given or not use_dot:
        r, mu = g, _empty(T, device=dev, dtype=f32)   # decode's up kernel writes g and mu itself
    else:
        r, mu = _empty(split, T, n, device=dev, dtype=f32), _empty(split, T, device=dev, dtype=f32)
    if gates_given:
        _router(x, w["w_router"], mean, bias_s, bias_v, threshold, max_active, g, mu)
    bias_ptr = bias_v if bias_v is not None else g
    pdl = not use_dot and pdl_launch(dev)   # the decode kernels only (see small_batch.py)
    programs = (cdiv(ds, rows) + n * (de // rows)) * split + (split if use_dot and not gates_given else 0)
    # presum (tuned): the up kernel's last arriver per expert row block sums the split partial h tiles, one
    # int32 arrival counter per row block.
    presum = bool(cfg.get("presum")) and split > 1
    counters = _zeroed(dev, torch.int32, n * (de // rows)) if presum else mu
    launch(
        _up_kernel, (programs,), x, w["w_router"], w["w_up"], w["ws_gate"], w["ws_up"], mean.wbar, bias_ptr, g, h,
        hs, r, mu, counters, T, n, d, ds, x.stride(0), k_chunk, bias_s, float(threshold),
        DE=de, GATES_GIVEN=gates_given, HAS_BIAS_VEC=bias_v is not None, USE_DOT=use_dot, SPLIT_K=split,
        PREC=_precision(x.dtype), BLOCK_T=block_t, ROWS=rows, BLOCK_K=block_k,
        BLOCK_KR=min(block_k, max(64, FMA_SLAB // block_t)), PDL=pdl, PRESUM=presum, num_warps=cfg["up_warps"],
        num_stages=cfg.get("up_stages", 1))
    weights = (w["router_scale"], w["gamma"], w["w_down"], w["ws_down"])
    meta = dict(DE=de, BLOCK_T=block_t, BLOCK_D=cfg["block_d"], num_warps=cfg["down_warps"])
    if not use_dot:
        launch(_decode_down_kernel, (cdiv(d, cfg["block_d"]),), h, hs, mu, g, *weights, y, T, n, d, ds,
               y.stride(0), NORM_EPS, BLOCK_N=max(16, pow2(n)), SLOTS=cfg["slots"], BLOCK_DS=max(16, pow2(ds)),
               PDL=pdl, **meta, **(dict(launch_pdl=True) if pdl else {}))
        return
    group = int(cfg["group"])
    grid = (cdiv(d, cfg["block_d"]), 1 + cdiv(n, group))   # the shared expert, then the groups of experts
    launch(_union_down_kernel, grid, h, hs, r, mu, bias_ptr, g, *weights, _zeroed(dev, f32, T * d),
           _zeroed(dev, torch.int32, grid[0]), y, T, n, d, ds, y.stride(0), bias_s, float(threshold), NORM_EPS,
           GATES_GIVEN=gates_given, HAS_BIAS_VEC=bias_v is not None, SPLIT_K=split, GROUP=group,
           BLOCK_G=max(2, pow2(group)), PREC=_precision(x.dtype), BLOCK_S=16, H_SPLIT=1 if presum else split,
           num_stages=cfg["down_stages"], **meta)


def grouped_config(T: int) -> dict:
    """Default tile config of the prefill path (a tuned cache, deco_kernels.autotune, wins).

    router_block_t: tokens per router program; block_m: tokens of one expert per up/down program;
    block_k: K step of the up-projection; down: the down projection, "gemm" or "atomics" (see DOWN_GEMM);
    block_d, down_warps, down_stages: the atomic down kernel's output features per step, warps and stages."""
    # Best of benchmarks/sweep_tiles.py on the H100: 0.1b at T=512 (results/h100/sweep_tiles_0.1b.json) and 1.2b
    # at T=4096 (results/h100/sweep_tiles_1.2b_prefill.json). The router's 64-token blocks of that sweep are
    # 32 since router_stages (H200, whole layer at T=4096: 1.2b 353.2 -> 348.6 µs, 0.1b 112.5 -> 109.5,
    # results/h200/sweep_router_split.json).
    if T <= 1024:
        return dict(down="gemm", router_block_t=16, block_m=64, block_k=128, up_warps=4, up_stages=4, block_d=64,
                    down_warps=8, down_stages=3)
    return dict(down="gemm", router_block_t=32, block_m=128, block_k=64, up_warps=8, up_stages=3, block_d=64,
                down_warps=8, down_stages=3)


def deterministic() -> bool:
    """Whether the layer must be bit-for-bit repeatable: torch.use_deterministic_algorithms(True)."""
    return torch.are_deterministic_algorithms_enabled()


def down_gemm(cfg: dict | None = None) -> bool:
    """Whether the down projection is the GEMM (no atomics): always when deterministic(); else DOWN_GEMM when
    set; else the prefill config's "down" (absent, and for training: the GEMM)."""
    if deterministic():
        return True
    if DOWN_GEMM is not None:
        return bool(DOWN_GEMM)
    return (cfg or {}).get("down", "gemm") == "gemm"


def _grouped(x, w, mean, bias_s, bias_v, threshold, max_active, g, y, cfg=None):
    out = grouped_stages(x, w, mean, bias_s, bias_v, threshold, max_active, g, cfg, y=y)[-1]
    if out is not y:
        y.copy_(out)   # the fp32 accumulator of the atomics, rounded once


def grouped_stages(x, w, mean, bias_s, bias_v, threshold, max_active, g, cfg=None, y=None):
    """The prefill path's launches (router, grouping, up with the shared expert's hidden activation, the shared
    expert's down projection, down), returning what each leaves:
    (mu, tokens, counts, act, hs, out); g is written in place, hs is the shared expert's hidden activation
    [T, ds]. With the atomics, act is [N, T, de] (expert e's i-th token at act[e, i]) and out the fp32 output
    before the cast into y; with down_gemm(), act is token-major [T, N*de] (zero where a gate is off) and out is
    the output itself, in x's dtype (written into ``y`` when given).
    benchmarks/check_grouped.py checks the stages one by one."""
    T, d = x.shape
    n, de, ds = w["w_router"].shape[0], w["gamma"].shape[0], w["ws_gate"].shape[0]
    cfg = cfg or config_for("grouped", x.device, T, x.dtype, d, n, de, ds) or grouped_config(T)
    prec = _precision(x.dtype)
    dev = x.device
    mu = _empty(T, device=dev, dtype=torch.float32)
    tokens, counts = _group_by_expert(x, w["w_router"], mean, bias_s, bias_v, threshold, max_active, g, mu,
                                      cfg["router_block_t"])
    gemm = down_gemm(cfg)
    act = _token_major(T, n, de, x) if gemm else _empty(n, T, de, device=dev, dtype=x.dtype)
    hs = _empty(T, ds, device=dev, dtype=x.dtype)   # the shared expert's hidden activation
    block_m = cfg["block_m"]
    tiles = cdiv(T, block_m)
    # The shared expert's programs (cdiv(ds, de) per token block), then the routed experts' (grouped.py). Its
    # hidden activation in this kernel against five torch launches, H200, whole layer under CUDA graphs
    # (results/h200/probe_ab_shared_in_up.json): 1.2b T=128 72.0 -> 64.0 µs, T=512 91.5 -> 83.9; 0.1b T=128
    # 43.5 -> 34.2, T=512 47.5 -> 37.9; at T=4096 within +-4% (1.2b 344.4 -> 348.9, 0.1b 99.6 -> 95.6).
    launch(_grouped_up_kernel, ((n + cdiv(ds, de)) * tiles,), x, w["w_up"], w["ws_gate"], w["ws_up"], tokens,
           counts, g, mu, w["router_scale"], w["gamma"], act, hs, T, n, d, ds, x.stride(0), NORM_EPS, DE=de,
           PREC=prec, BLOCK_M=block_m, BLOCK_K=cfg["block_k"], TOKEN_MAJOR=gemm, num_warps=cfg["up_warps"],
           num_stages=cfg["up_stages"])
    if gemm:
        # y = shared + act @ w_down^T in one cuBLAS GEMM (fp32 sums, one rounding; the shared expert's output
        # enters as its C operand in x's dtype). The shared expert's GEMM writes y itself and the routed GEMM
        # adds into it in place: addmm(shared, ..., out=y) would first copy shared into y (a device copy of
        # [T, d], 6.9 µs per call at 1.2b T=4096 on the H100, results/h100/profile.log of 2026-12-06).
        if y is None:
            y = torch.nn.functional.linear(hs, w["ws_down"])
        else:
            torch.matmul(hs, w["ws_down"].t(), out=y)
        return mu, tokens, counts, act, hs, y.addmm_(act, w["w_down"].t())
    # The shared expert's down projection (cuBLAS) seeds the fp32 accumulator the routed experts add into.
    acc = linear_fp32(hs, w["ws_down"])
    launch(_grouped_down_kernel, (n, tiles), act, w["w_down"], tokens, counts, acc, T, n, d, DE=de, PREC=prec,
           BLOCK_M=block_m, BLOCK_D=cfg["block_d"], num_warps=cfg["down_warps"], num_stages=cfg["down_stages"])
    return mu, tokens, counts, act, hs, acc


def check_expert_width(de: int) -> None:
    if de < 16 or de & (de - 1):
        raise ValueError(f"gamma: backend 'triton' needs an expert width de that is a power of two >= 16, got {de}")


def unit_stride_rows(x):
    """x [..., d] as rows [T, d] with unit column stride (a copy only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def deco_ffn(x, w_router, router_scale, w_up, gamma, w_down, ws_gate, ws_up, ws_down, *,
             bias=0.0, threshold=0.0, max_active=None, return_gates=False, activation="norm_silu"):
    """Forward of one DECO layer on Triton; same contract as deco_kernels.ops.deco_ffn. Calls that need
    autograd take the sparse training path of training.py (it saves what its backward kernels need)."""
    w = dict(w_router=w_router, router_scale=router_scale, w_up=w_up, gamma=gamma, w_down=w_down,
             ws_gate=ws_gate, ws_up=ws_up, ws_down=ws_down)
    check_expert_width(gamma.shape[0])
    n = w_router.shape[0]
    if max_active is not None and max_active >= n:
        max_active = None
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = unit_stride_rows(x)
    w = {k: v.contiguous() for k, v in w.items()}
    T = x2.shape[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *w.values())):
        from .training import deco_ffn_train  # imported here: training.py builds on this module
        y, g = deco_ffn_train(x2, w, bias, threshold, max_active)
    else:
        y = _empty(T, d, device=x.device, dtype=x.dtype)
        g = _empty(T, n, device=x.device, dtype=torch.float32)
        if T > 0:
            mean = means.cached_expert_mean(w["w_up"])
            path, cfg = (_small_batch if T <= SMALL_BATCH_MAX else _grouped), None
            if deterministic():
                # The tensor-core small-batch kernels add partial sums with fp32 atomics: a deterministic call
                # takes the register-FMA decode kernels (no cross-program sums) up to FMA_MAX_T tokens, whatever
                # a tuned config says, and the grouped path with its GEMM down projection above.
                path = _small_batch if T <= FMA_MAX_T else _grouped
                cfg = small_batch_config(T, x.dtype, use_dot=False) if path is _small_batch else None
            path(x2, w, mean, *_bias_args(bias, n, x.device), threshold, max_active, g, y, cfg)
    y = y.reshape(*lead, d)
    return (y, g.reshape(*lead, n)) if return_gates else y
