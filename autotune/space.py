"""Search spaces of the kernel paths and their pruning by a device's shared memory and registers.

Regimes (kept in step with ffn.small_batch_config): small_batch multiplies in registers by default for T <= 4
(use_dot False: rows, up_warps, block_d, slots, down_warps) and on tensor cores for 5 <= T <= 64 (use_dot True:
rows, block_k, split_k, up_warps, up_stages, block_d, group, down_warps, down_stages, presum); from 2 to 8
tokens the tune measures both regimes; grouped is the prefill path, with its two down projections as regimes
too ("down": "gemm", the default, searches the router and up tiles; "atomics" also the atomic down kernel's). Keys are
treated generically: a config is a dict, the launcher reads what it knows (and fills the small-batch keys a
partial config lacks from its regime's defaults).

The estimates are conservative first cuts that need no compiler; the exact check is compile.py (modelled
devices) or the runner catching an out-of-resources error (measured devices). Triton's pipeliner keeps
(num_stages - 1) copies of each loop's tiles in shared memory; every pipelined loop of a kernel keeps its own.
"""
from __future__ import annotations

import itertools
import random

FMA_SLAB = 16384      # ffn.FMA_SLAB: elements of the largest [rows, d] slab an FMA program loads at once
REGS_BUDGET = 255     # 32-bit registers a thread may hold: one tile estimated above this surely spills

SMALL_FMA = dict(use_dot=[False], rows=[2, 4, 8, 16], up_warps=[2, 4, 8], block_d=[8, 16, 32],
                 slots=[8, 16, 32], down_warps=[4, 8])
SMALL_DOT = dict(use_dot=[True], rows=[16, 32, 64], block_k=[64, 128, 256], split_k=[1, 2, 3, 4, 6],
                 up_warps=[4, 8], up_stages=[2, 3, 4], block_d=[64, 128, 256], group=[2, 4, 8, 16],
                 down_warps=[4, 8], down_stages=[1, 2, 3], presum=[False, True])
# Keys only the tensor-core regime reads: dropped from FMA candidates built on a tensor-core default.
DOT_ONLY = ("block_k", "up_stages", "split_k", "group", "down_stages", "presum")
# The prefill's two down projections (ffn.down_gemm): with the GEMM the atomic kernel's tiles
# (GROUPED_DOWN_KEYS) keep their defaults and are not searched.
GROUPED_DOWN_KEYS = ("block_d", "down_warps", "down_stages")
GROUPED_ATOMICS = dict(down=["atomics"], router_block_t=[16, 32, 64], block_m=[32, 64, 128], block_k=[32, 64, 128],
                       up_warps=[4, 8], up_stages=[2, 3, 4], block_d=[32, 64, 128], down_warps=[4, 8],
                       down_stages=[2, 3, 4])
GROUPED_GEMM = dict({k: v for k, v in GROUPED_ATOMICS.items() if k not in GROUPED_DOWN_KEYS}, down=["gemm"])
# Keys a cached config may lack: grouped entries from before the "down" key run with the GEMM (as_measured),
# small-batch ones from before "presum" without it (its default).
OPTIONAL_KEYS = ("down", "presum")


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# From 2 up to this many tokens the register-FMA kernels and the tensor-core ones compete (the default
# switches at ffn.FMA_MAX_T = 2): the tune measures both and keeps the faster (H200, 1.2b: both ~29 µs at T=2;
# at T=4 tensor cores 29.7 µs, register FMAs 55.1 µs).
FMA_CANDIDATE_MAX_T = 8


def spaces_for(path: str, T: int) -> list[dict]:
    """The search spaces (each a dict of key -> values, searched as a product) of a path at T tokens."""
    if path == "grouped":
        return [GROUPED_GEMM, GROUPED_ATOMICS]
    if T == 1:
        return [SMALL_FMA]
    return [SMALL_DOT, SMALL_FMA] if T <= FMA_CANDIDATE_MAX_T else [SMALL_DOT]


def default_config(path: str, T: int, dtype, use_dot: bool | None = None) -> dict:
    """The launcher's default config of `path` at T tokens; use_dot picks a small-batch regime (None: by T;
    the grouped path has one)."""
    from deco_kernels.triton import ffn

    return dict(ffn.small_batch_config(T, dtype, use_dot) if path == "small_batch" else ffn.grouped_config(T))


def missing_keys(path: str, cfg: dict, T: int, dtype) -> set:
    """The keys the current kernels of cfg's regime read that `cfg` lacks: a cached config without them was
    tuned for an earlier kernel (e.g. before split_k existed), so its other values are not a tuned choice."""
    return set(default_config(path, T, dtype, cfg.get("use_dot"))) - set(cfg) - set(OPTIONAL_KEYS)


def as_measured(path: str, cfg: dict) -> dict:
    """`cfg` as a cache entry's timing ran it: grouped configs without a "down" key predate it (2026-12-05) and
    were all measured with the atomic down kernel (at run time they take the GEMM, ffn.down_gemm)."""
    return {**cfg, "down": "atomics"} if path == "grouped" and "down" not in cfg else cfg


def estimate(path: str, cfg: dict, T: int, d: int, n: int, de: int, ds: int, elem_bytes: int) -> dict:
    """{"smem": bytes of the largest kernel, "regs": fp32 values per thread of the largest register tile}; the
    grouped path's down kernel counts only with the atomics (cfg's "down")."""
    smem, regs = 0, 0
    if path == "small_batch":
        rows = min(cfg["rows"], de)
        if cfg["use_dot"]:
            bt = max(16, _pow2(T))
            bk = cfg["block_k"]
            bkr = min(bk, max(64, FMA_SLAB // bt))
            stages = max(cfg.get("up_stages", 1) - 1, 1)
            smem = stages * ((bt + rows) * bk + (bt + 16) * bkr) * elem_bytes
            regs = max(bt * rows, bt * 16 + bt * bkr // 8) // (32 * cfg["up_warps"])
            # Down: fp32 accumulator [bt, block_d], the [block_d, de] and [bt, de] operands in elem_bytes and the
            # expert's split_k partial h tiles [bt, de] fp32; the pipelined loop over the group buffers the
            # w_down block and the partial h tiles (counted for every stage: the compiled kernels on sm_90 hold
            # up to num_stages copies plus scratch).
            split, bd = cfg.get("split_k", 1), cfg["block_d"]
            hsplit = 1 if cfg.get("presum") else split      # presum: the up kernel summed them
            down_regs = (bt * bd + (bd + bt) * de * elem_bytes // 4 + hsplit * bt * de) // (32 * cfg["down_warps"])
            regs = max(regs, down_regs)
            smem = max(smem, max(cfg.get("down_stages", 1), 1) * (bd * de * elem_bytes + hsplit * bt * de * 4))
        else:
            bk = min(_pow2(d), max(16, FMA_SLAB // rows))
            regs = rows * bk // (32 * cfg["up_warps"])
            regs = max(regs, cfg["block_d"] * cfg["slots"] * de // (32 * cfg["down_warps"]))
            smem = 0
    else:
        bm, bk, bd = cfg["block_m"], cfg["block_k"], cfg["block_d"]
        smem = max(cfg["up_stages"] - 1, 1) * (bm * bk + de * bk) * elem_bytes
        regs = bm * de // (32 * cfg["up_warps"])
        if cfg.get("down", "gemm") == "atomics":
            smem = max(smem, max(cfg["down_stages"] - 1, 1) * bd * de * elem_bytes + bm * de * elem_bytes)
            regs = max(regs, bm * bd // (32 * cfg["down_warps"]))
    return dict(smem=smem, regs=regs)


def fits(path, cfg, T, d, n, de, ds, elem_bytes, profile) -> str | None:
    """Why `cfg` cannot fit `profile` by the estimate (None when it may)."""
    if cfg.get("rows", 1) > de or de % min(cfg.get("rows", 1), de):
        return "rows do not divide the expert width"
    est = estimate(path, cfg, T, d, n, de, ds, elem_bytes)
    if est["smem"] > profile.smem_per_block:
        return f"~{est['smem']} B of shared memory > {profile.smem_per_block} B per block"
    if est["regs"] > REGS_BUDGET:
        return f"~{est['regs']} registers per thread for one tile: would spill"
    return None


def candidates(path: str, T: int, d: int, n: int, de: int, ds: int, dtype, profile, limit: int | None = None,
               seed: int = 0) -> list[dict]:
    """The default config first, then every config of the space that fits `profile` (seeded order), at most
    `limit` in all. Duplicates of the default are dropped."""
    from .buckets import dtype_name

    elem = 4 if dtype_name(dtype) == "fp32" else 2
    base = default_config(path, T, dtype)
    out, seen = [base], {_freeze(base)}
    combos = [dict(zip(space, vals)) for space in spaces_for(path, T) for vals in itertools.product(*space.values())]
    random.Random(seed).shuffle(combos)
    for combo in combos:
        cfg = {**base, **combo}
        if not cfg.get("use_dot", True):
            for k in DOT_ONLY:
                cfg.pop(k, None)
        elif cfg.get("split_k", 1) == 1 and cfg.get("presum"):
            cfg["presum"] = False     # nothing to sum: the same kernels as without
        f = _freeze(cfg)
        if f in seen or fits(path, cfg, T, d, n, de, ds, elem, profile) is not None:
            continue
        seen.add(f)
        out.append(cfg)
        if limit is not None and len(out) >= limit:
            break
    return out


def _freeze(cfg: dict) -> tuple:
    return tuple(sorted(cfg.items()))
