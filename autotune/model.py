"""Analytic cost model of a kernel path's config on a device profile (µs), used where we cannot measure.

Each recorded launch (launches.py) becomes a `Work`: programs that do work, bytes and FLOPs per program,
dependent memory round trips per program, and its warps / stages. Its time on a profile is

    launch cost + max(memory time, math time, latency time)

- memory: the larger of all bytes over DRAM bandwidth and the busiest SM's bytes over what that SM can keep in
  flight (resident warps x 32 threads x 16 B x loads in flight per thread, over the memory latency);
- math: the larger of all FLOPs over the chip's peak and the busiest SM's FLOPs over one SM's rate (tensor
  cores for tl.dot kernels, fp32 FMA for the register kernels);
- latency: waves of resident programs on the busiest SM x dependent round trips per program x latency;
- the busiest SM runs ceil(programs / SMs) programs (wave quantisation); occupancy (programs resident at once
  per SM) comes from the compiled resource usage when given (shared memory, registers), else from the
  estimates of space.py, and from the warp limit.

Each term grows with bytes and FLOPs and shrinks with SMs, bandwidth and clock, so more bytes are never
predicted faster and more SMs never slower (tests/test_autotune.py checks both). Work per kernel follows the
kernels in deco_kernels/triton (small_batch.py, grouped.py, router.py); ~20% of the experts are active per
token (SPEC §1), independently, so a batch of T tokens touches n * (1 - 0.8^T) experts. Kernels the model
does not know count all their programs with their tensors' bytes spread evenly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACTIVE_RATIO = 0.2
TC_EFFICIENCY = 0.7     # fraction of the tensor-core peak a Triton tile reaches
ATOMIC_COST = 2.0       # an fp32 atomic add moves its bytes about twice (read-modify-write at L2)


@dataclass
class Work:
    name: str
    programs: float          # programs that do work
    bytes: float             # per program
    flops: float             # per program
    rounds: float            # dependent global round trips per program
    warps: int
    ilp: float = 2.0         # 16-byte loads in flight per thread
    tensor_cores: bool = True
    smem: int = 0            # bytes per program (occupancy)
    regs: int | None = None  # per thread (occupancy)
    grid: int = 0            # programs launched (exiting ones cost a little each)


def _elem(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else int(dtype)


def union_fraction(T: int, ratio: float = ACTIVE_RATIO) -> float:
    return 1.0 - (1.0 - ratio) ** T


def works_of(launches, T: int, d: int, n: int, de: int, ds: int, dtype, usage: dict | None = None) -> list[Work]:
    """One Work per recorded launch. usage: optional {kernel name: compile.compile_launch result}."""
    eb = _elem(dtype)
    usage = usage or {}
    out = []
    for ln in launches:
        c, o, P = ln.args, ln.options, ln.programs
        warps, stages = o.get("num_warps", 4), o.get("num_stages", 3)
        pipe = max(stages - 1, 1)
        name = ln.name
        if name == "_up_kernel":
            rows, bk = c["ROWS"], c["BLOCK_K"]
            kk = d
            rb = de // rows
            expert_p = n * rb
            shared_p = P - expert_p
            active = expert_p * union_fraction(T) + shared_p
            w_bytes = rows * kk * eb
            router = (T + 1) * d * eb + d * 4        # every program: its logit over the whole d, and mu
            byts = (w_bytes + T * kk * eb + T * rows * 4) * active / P + router
            flops = 2 * T * rows * kk * (active / P)
            if c["USE_DOT"]:   # the logit and mu ride along in the pipelined K loop
                rounds = 2 + math.ceil(kk / bk) / pipe
                ilp = pipe * 2
            else:   # one unpipelined round of slab loads per BLOCK_K step of the K range
                rounds = 2 + math.ceil(kk / bk) + math.ceil(d / c.get("BLOCK_KR", bk))
                ilp = max(1.0, rows * min(bk, d) * eb / (warps * 32 * 16))
            out.append(Work(name, P, byts, flops, rounds, warps, min(ilp, 16), c["USE_DOT"], grid=P))
        elif name == "_decode_down_kernel":
            act = n * union_fraction(T)
            bd, slots = c["BLOCK_D"], c["SLOTS"]
            byts = bd * act * de * eb + T * act * de * 4 + bd * ds * eb + T * 2 * ds * 4 + T * n * 4
            flops = 2 * T * bd * (act * de + ds)
            rounds = 3 + 2 * math.ceil(act / slots)
            ilp = max(1.0, bd * slots * de * eb / (warps * 32 * 16))
            out.append(Work(name, P, byts, flops, rounds, warps, min(ilp, 16), False, grid=P))
        elif name == "_union_down_kernel":
            nd = ln.grid[0]
            act = n * union_fraction(T)
            bd = c["BLOCK_D"]
            programs = nd * max(act, 1)
            byts = (bd * de * eb + T * de * 4 + T * bd * 4 * ATOMIC_COST + T * n * 4
                    + (bd * ds * eb + T * 2 * ds * 4 + T * bd * 8) / max(act, 1))
            flops = 2 * T * bd * de + 2 * T * bd * ds / max(act, 1)
            out.append(Work(name, programs, byts, flops, 6, warps, 2, True, grid=P))
        elif name == "_router_kernel":
            bt, bn = c["BLOCK_T"], c["BLOCK_N"]
            byts = bt * d * eb + n * d * eb + d * 4 + bt * n * 8
            out.append(Work(name, P, byts, 2 * bt * bn * d, 2 + math.ceil(d / c["BLOCK_K"]) / pipe, warps,
                            pipe * 2, True, grid=P))
        elif name == "_group_kernel":
            out.append(Work(name, P, T * 8, 0, 2 + math.ceil(T / c["BLOCK"]), warps, 2, False, grid=P))
        elif name in ("_grouped_up_kernel", "_grouped_down_kernel"):
            bm = c["BLOCK_M"]
            count = ACTIVE_RATIO * T
            tiles = n * max(1, math.ceil(count / bm))
            fill = count / (bm * max(1, math.ceil(count / bm)))    # share of a tile's rows that are real tokens
            rows = bm * fill
            if name == "_grouped_up_kernel":
                bk = c["BLOCK_K"]
                byts = rows * d * eb + de * d * eb + rows * de * eb + rows * 8
                flops = 2 * bm * de * d
                rounds = 3 + math.ceil(d / bk) / pipe
            else:
                bd = c["BLOCK_D"]
                byts = rows * de * eb + d * de * eb + rows * d * 4 * ATOMIC_COST
                flops = 2 * bm * de * d
                rounds = 2 + math.ceil(d / bd) / pipe
            out.append(Work(name, tiles, byts, flops, rounds, warps, pipe * 2, True, grid=P))
        else:
            tensors = [v for v in c.values() if isinstance(v, torch.Tensor)]
            total = sum(t.numel() * t.element_size() for t in tensors)
            out.append(Work(name, P, total / max(P, 1), 0, 4, warps, 2, False, grid=P))
        u = usage.get(name)
        if u is not None:
            out[-1].smem, out[-1].regs = u.get("shared", 0), u.get("regs")
    return out


def _occupancy(w: Work, profile) -> int:
    occ = min(profile.max_blocks_per_sm, profile.max_warps_per_sm // max(w.warps, 1))
    if w.smem:
        occ = min(occ, profile.smem_per_sm // w.smem)
    if w.regs:
        occ = min(occ, profile.regs_per_sm // (w.regs * 32 * w.warps))
    return max(occ, 1)


def kernel_us(w: Work, profile) -> float:
    """Predicted µs of one launch on `profile` (see the module docstring)."""
    sms, lat = profile.sms, profile.mem_latency_us
    per_sm = math.ceil(w.programs / sms) if w.programs > 0 else 0
    if per_sm == 0:
        return profile.launch_us
    resident = min(_occupancy(w, profile), per_sm)
    inflight = resident * w.warps * 32 * 16 * w.ilp                       # bytes in flight per SM
    t_mem = max(w.programs * w.bytes / (profile.dram_gbps * 1e3), per_sm * w.bytes / (inflight / lat))
    rate = profile.tc_flops_per_clk_sm * TC_EFFICIENCY if w.tensor_cores else profile.fma_flops_per_clk_sm
    sm_flops_per_us = rate * profile.clock_ghz * 1e3
    t_math = max(w.programs * w.flops / (sm_flops_per_us * sms), per_sm * w.flops / sm_flops_per_us)
    t_lat = math.ceil(per_sm / resident) * w.rounds * lat
    return profile.launch_us + max(t_mem, t_math, t_lat)


def shared_expert_us(path: str, T: int, d: int, ds: int, dtype, profile) -> float:
    """The grouped path's shared expert: three cuBLAS GEMMs, an elementwise SwiGLU and two copies (torch)."""
    if path != "grouped":
        return 0.0
    eb = _elem(dtype)
    flops = 6 * T * d * ds
    byts = 3 * d * ds * eb + T * d * (eb * 2 + 4 * 3) + T * ds * eb * 4
    peak = profile.tc_flops_per_clk_sm * TC_EFFICIENCY * profile.clock_ghz * 1e3 * profile.sms
    return 6 * profile.launch_us + max(flops / peak, byts / (profile.dram_gbps * 1e3))


def predict(path: str, cfg: dict, T: int, d: int, n: int, de: int, ds: int, dtype, profile,
            usage: dict | None = None, launches=None) -> float:
    """Predicted µs of the whole `path` launcher for `cfg` on `profile`."""
    from .launches import record

    launches = launches if launches is not None else record(path, cfg, T, d, n, de, ds, dtype)
    works = works_of(launches, T, d, n, de, ds, dtype, usage)
    return sum(kernel_us(w, profile) for w in works) + shared_expert_us(path, T, d, ds, dtype, profile)
