"""Analytic cost model of a kernel path's config on a device profile (µs), used where we cannot measure.

Each recorded launch (launches.py) becomes a `Work`: programs that do work, per program the bytes it moves,
the bytes it keeps in flight, its tensor-core and CUDA-core FLOPs, fp32 atomic bytes, dependent memory round
trips and block-wide synchronisations (barriers, cross-warp reductions, pipeline waits), its warps and an
estimate of its registers and shared memory. Its time on a profile is

    launch cost + the largest of five terms + OVERLAP x the sum of the other four

- DRAM: the launch's unique bytes over the achievable bandwidth (DRAM_EFFICIENCY x peak);
- atomics: the fp32 atomic-add bytes of the busiest SM's programs over its share (1 / the SMs that run
  programs) of ATOMIC_EFFICIENCY x the L2's rate (ATOMIC_BYTES_PER_SM_CLOCK per SM and clock, not the DRAM's:
  read-modify-write at the L2, where the accumulator stays; where it does not fit the L2, as the prefill's
  [T, d] fp32 accumulator on a 4 MB Jetson Orin L2 from ~1k tokens, at most half the DRAM rate, a read and a
  write per add;
  each SM sends its own reductions, so a last partial wave of programs paces them as it does the math: 133
  programs on 132 SMs take two rounds; 42 programs on 132 SMs share the bandwidth 42 ways);
- busiest SM: it runs ceil(programs / SMs) programs (wave quantisation), `resident` of them at once
  (occupancy: warps, registers, shared memory). Its three terms are
    chain   = waves x (round trips x memory latency + syncs x SYNC_CYCLES / clock + fill): the dependent part
              of a program, which other resident programs cannot shorten, plus a launch's tail (round trips and
              syncs once, not per wave: the excess of a longer kind of program, an epilogue after the last
              arrival). fill: the resident programs' first pipeline stage (Work.first_load: the small-batch
              tensor-core kernels) streams in at the SM's share of the bandwidth before any MMA runs; nothing
              hides it, and a 256-wide K tile's is four 64-wide ones'. Without it the fit picked 256-wide K and
              feature tiles at 3-16 tokens that measure 10-19% slower on the H200 (with it, held out: 58 of 72
              entries against 52, 2026-12-05);
    math    = its programs' tensor-core FLOPs at TC_EFFICIENCY x peak plus CUDA-core FLOPs at FMA_EFFICIENCY x
              peak (both shared by its resident programs); the CUDA-core rate scales down with fewer than
              ISSUE_WARPS resident warps, whose dependent FMAs and shuffles then leave issue slots empty (the
              H100's decode down kernel, one program per SM: 8 warps beat 4 by 6-10% on average in 87 measured
              pairs at 0.2b-1.2b);
    feed    = its programs' bytes over what the SM keeps in flight (Little's law: resident programs' bytes in
              flight over the latency);
  (OVERLAP = 0: every term hides behind the largest, as in a roofline; 1: none overlaps).
  The register-FMA (decode) kernels loop over the batch's tokens inside each K step: every token is one more
  dependent round trip (its loads wait for the previous token's barrier) and one cross-warp sum, whose shuffle
  trees (one per row a thread holds) cost SHUFFLE_COST FMA issue slots per shuffle (an SM shuffles 32 lanes
  per clock and issues 128 FMA lanes: a hardware ratio, not fitted). So at T=2-4, ROWS=16 (BLOCK_K=1024 under
  the FMA_SLAB cap: two K steps at d > 1024) pays twice the per-token rounds of ROWS=4-8 (one step) and,
  with warps along K, more shuffles per row.
  A small-batch tensor-core loop's per-step syncs grow with the warps beyond one per 4 rows of BLOCK_T: those
  warps split the output columns instead, and each re-reads the whole row tile and joins every barrier (on the
  H100's earlier up kernel 4 warps beat 8 at 5-16 tokens, not at 64).
- Shared memory: the compiled size when given, else the kernel's pipelined tiles: num_stages - 1 buffers of a
  K loop's operands, one more on sm_90 where the dot has a multiple of 64 rows and runs as an asynchronous
  warpgroup MMA (wgmma) that reads its operands from shared memory (the compiled sm_90 kernels show both). The
  small-batch estimates equal Triton 3.9's compiled sizes for 232 of 240 sm_90 and 127 of 131 sm_87 sampled
  launches (the rest: 2 KB more for groups of 16 on 8 warps; the unpipelined down kernel's scratch at 17-32
  rows, half as large on sm_90). Occupancy counts each resident block's shared memory plus the 1 KB the driver
  reserves per block (sm_80 and later; why a block may use 227 of an SM's 228 KB): two programs of 114 KB, as
  the split-K down kernel compiles at BLOCK_D=256 and 3 stages, do not share an SM. Without the reservation the
  model had the H200's 3-16-token picks at BLOCK_D=256 run two such programs per SM, one wave instead of two.
- Registers: the compiled count when given (compile.py), else REG_BASE plus the fp32 values of the kernel's
  largest register tile per thread (for the grouped kernels the dot's accumulator, as compiled sm_90 counts show;
  for the small-batch ones also the MMA operands held in registers). The register-FMA (decode) kernels keep no
  MMA fragments or pipeline state: their estimate is the whole count, matched to Triton 3.9's sm_90 counts
  (32-192), not REG_BASE plus a tile. With REG_BASE added they were estimated at 2-4x their compiled registers (a
  4-warp up program at 160 instead of 32-56), which cost the up kernel's ~1000-3000 programs waves they do not
  run and the down kernel spills it does not have. Held out on the H200 (H100): 23 (14) with REG_BASE added, 27
  (13) with this estimate, 32 (14) with the decode kernels' compiled counts, so what is left there is mostly the
  estimate (ROWS=16 up programs compile to 102-155 registers, estimated 40-64). Spilled bytes (compiled, else the
  excess over the 255-register limit) move through local memory and back once per loop iteration, or once per
  token per iteration in the decode kernels that reuse the tile for every token: one more round trip each, and in
  the feed term at a thread's own rate (ILP 16-byte loads in flight per thread), not at the rate of the program's
  bulk tile loads.

Work per kernel follows the kernels in deco_kernels/triton (small_batch.py, grouped.py, router.py); ~20% of
the experts are active per token (SPEC §1), independently, so a batch of T tokens touches n * (1 - 0.8^T)
experts. Kernels the model does not know count all their programs with their tensors' bytes spread evenly.
A launch whose programs come in kinds is one Work of their mean bytes, FLOPs and atomics per program (so the
throughput terms see the launch's totals), bytes in flight such that the feed term sees their mean, and the
chain of its most numerous kind, the longer ones' excess as its tail. The small-batch tensor-core kernels
(5-64 tokens, split K):
- `_up_kernel`: (shared-expert row block, K-chunk) programs with two K loops (gate, up), (expert row block,
  K-chunk) programs whose loop carries the router's [16, BLOCK_K] operand, and one mu program per chunk (CUDA
  cores); the chain is one chunk's loop, the shared programs' second loop the tail. The fp32 partial sums,
  SPLIT_K x [T, N*DE + 2*DS + N + 1], are DRAM bytes written here, and DRAM bytes again for every feature
  block of the down kernel that re-reads them: on the H200 each further K-chunk cost the down kernel about
  that at the DRAM rate (benchmarks/results/h200/sweep_tiles_*.json), not the L2's.
- `_union_down_kernel`: per feature block a shared-expert program (DS / BLOCK_S steps) and one program per
  group of GROUP experts: the partial logits and mu summed (one round), a loop of GROUP steps (four barriers
  each, as compiled for sm_90) whose loads (the w_down block, SPLIT_K partial h tiles) are issued only for
  active experts, num_stages - 1 steps ahead, one fp32 atomic add of [T, BLOCK_D] per program (the atomics
  term) and the acq_rel arrival (two rounds); the last arriver's read of the accumulator and write of y is the
  tail.

Global constants (one set for every device; fitted by autotune/calibrate.py jointly on the measured caches
calibrate.FIT_CACHES, each entry on its own device's profile, which reports the fit's in-sample and
leave-one-geometry-out results, a geometry leaving on every device at once). `python -m
deco_kernels.autotune.calibrate --ship` refits them, writes them below, regenerates the validation tables and
the modelled Orin caches, and rewrites this paragraph:

Current fit (`python -m deco_kernels.autotune.calibrate --ship`): the constants below are the fit on the 72 entries
with at least two measured candidates (nvidia-h100-80gb-hbm3_sm90_132sm.json: 36 of its 36;
nvidia-h200_sm90_132sm.json: 36 of its 36), with the estimated registers. Model picks within 10% of the measured
best, in-sample and held out (leave-one-geometry-out): NVIDIA H100 80GB HBM3 31/36 (worst 1.202), held out 29/36
(worst 1.320); NVIDIA H200 34/36 (worst 1.126), held out 30/36 (worst 1.354).

Since the H100 tune of 2026-12-05 (every bucket of the four presets, the prefill entries with both down
projections) both caches hold the split-K small-batch kernels and the fit sees the atomics' level: the
atomics' efficiency fell from 2.0 to 0.70 (the model's 1.2b T=4096 atomic layer moved from 310 to 446 µs
against 401.7 measured), and the H200's held-out count from 30 to 25 until the CUDA-core issue rate
(ISSUE_WARPS, not fitted; 16 gave 25, 32 gave 25) brought it back to 30 and the H100's from 25 to 27.
Left, in-sample: the 0.1b and 0.2b small batches of 17-64 tokens (4-7 measured candidates: 32-row expert
blocks in groups of 2 beat 64-row ones by 1.24-1.32x, which the model ranks the other way) and decode (T=1)
at 0.5b and 1.2b, where most candidates run one wave and the model ranks within a few % (on the H200, 4 up
warps beat 2 by 3 µs at ROWS=4 before any term modelled the issue rate). Earlier fits: the H100-only
fit had left the H200 at 10/12 in-sample: its grouped kernels charged 8 warps on a 32-row tile nothing (now
every warp beyond one per 16 rows of BLOCK_M multiplies the K loop's waits), and its high REG_BASE halved the
residency of 8-warp grouped programs, which the 401-candidate H200 entries show costs nothing. With every
measured candidate's compiled registers, shared memory and spills (sm_90, Triton 3.9; the caches were measured
with Triton 3.6; `calibrate --compiled-usage`) the earlier H100-only refit got 29/31 in-sample and 26/31 held
out, so the shipped constants and the default validation use the estimates:

    TC_EFFICIENCY     fraction of the tensor-core peak a Triton tile reaches
    FMA_EFFICIENCY    fraction of the CUDA-core FMA peak the register kernels reach (converts, masks; the
                      reductions' shuffles are counted as work, SHUFFLE_COST each)
    ATOMIC_EFFICIENCY fraction of ATOMIC_BYTES_PER_SM_CLOCK x SMs x clock that fp32 atomic adds reach at the L2
    SYNC_CYCLES       SM cycles of one block-wide synchronisation (barrier, cross-warp reduction, pipeline wait)
    OVERLAP           share of the four non-dominant terms that does not hide behind the dominant one
    REG_BASE          registers per thread besides the register tiles (addresses, masks, loop state)

DRAM_EFFICIENCY is measured, not fitted: 2.97 TB/s copy bandwidth of 3.35 TB/s peak on the H100.
Every term grows with bytes, FLOPs, round trips and programs and shrinks with bandwidth and clock, so more
bytes are never predicted faster (tests/test_autotune.py checks both). Every term but the first stage's fill
shrinks with SMs (the atomics too, since their rate is the L2's, which grows with the SMs: 48 programs take 6
rounds of adds on 8 SMs and 6 on 9, each round faster); the fill shares the DRAM bandwidth among the SMs that run
programs, so its wave quantisation can add at most what its own term grows, and the tests check that bound.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

ACTIVE_RATIO = 0.2
DRAM_EFFICIENCY = 0.89      # measured: H100 copy bandwidth 2.97 TB/s of 3.35 TB/s
REG_LIMIT = 255             # 32-bit registers a thread may hold
SHUFFLE_COST = 4            # FMA issue slots per warp shuffle (an SM shuffles 32 lanes per clock, FMAs 128)
# 8-byte loads a thread keeps in flight in the split router's last-arriver sum. The H200's router alone
# (results/h200/probe_router_warps.json; 32-token blocks, 7 chunks at 1.2b T=512: 17.5 µs at 4 warps, 13.2 at 8)
# suggests 8; with 8 the H100's 0.1b T=128 atomic layer leaves the anchors' 30% and the refit drops to 61 of 72
# entries, so 16 (64 of 72; tests/test_autotune.py checks the router ordering it gives).
TAIL_LOADS = 16
# fp32 atomic adds run at the L2 (read-modify-write beside the data), whose rate follows the SMs and their clock,
# not the DRAM: the H200 has the H100's L2 and clock and 1.43x its DRAM bandwidth, yet its measured atomic
# prefill layers are only 5-10% faster (tune caches, 2026-12-05), like its GEMM ones. A scale, not a measured
# rate: ATOMIC_EFFICIENCY (fitted) is relative to it; 12 B x 132 SMs x 1.83 GHz is 2.9 TB/s, the H100's achievable
# DRAM rate that scaled the atomics before.
ATOMIC_BYTES_PER_SM_CLOCK = 12.0
ISSUE_WARPS = 8             # resident warps an SM needs to issue CUDA-core work at its full rate (2 per scheduler)


@dataclass(frozen=True)
class Constants:
    """The model's fitted global constants (see the module docstring)."""
    tc_efficiency: float = 0.4142
    fma_efficiency: float = 0.1487
    atomic_efficiency: float = 0.9829
    sync_cycles: float = 140.0
    overlap: float = 0.15
    reg_base: float = 78.4

    def to_json(self) -> dict:
        return asdict(self)


CONSTANTS = Constants()

# Library launches (cuBLAS) run at a measured share of the tensor-core peak, not the fitted Triton one: the
# bench's bf16 matmul (benchmark.device_ceilings, an 8192^3 torch.mm) reached 750 TFLOP/s on the H100 and 687 on
# the H200 (benchmarks/results/*/bench.json "bf16_matmul_flops"), of the profiles' 989 (tc_tflops): 0.76, 0.69.
LIBRARY_TC_EFFICIENCY = 0.72


@dataclass
class Work:
    name: str
    programs: float          # programs that do work
    bytes: float             # per program, loads and stores through the SM
    flops: float             # per program, on tensor cores (or all FLOPs when tensor_cores is False)
    rounds: float            # dependent global round trips per program
    warps: int
    ilp: float = 2.0         # 16-byte loads in flight per thread (when `inflight` is not given)
    tensor_cores: bool = True
    smem: int = 0            # bytes per program (occupancy)
    wgmma_smem: int = 0      # one more pipeline stage's bytes, held where the dot runs as a Hopper wgmma
    regs: int | None = None  # per thread (occupancy)
    grid: int = 0            # programs launched (exiting ones cost a little each)
    fma_flops: float = 0.0   # per program, on CUDA cores (besides `flops` when tensor_cores is True)
    syncs: float = 0.0       # block-wide synchronisations per program
    atomics: float = 0.0     # fp32 atomic-add bytes per program
    dram: float | None = None   # unique bytes of the whole launch (None: programs x bytes)
    inflight: float = 0.0    # bytes one program keeps in flight (0: warps x 32 x 16 B x ilp)
    tile_regs: float = 0.0   # fp32 values per thread of the largest register tile (estimate without `regs`)
    iters: float = 1.0       # loop iterations per program (a spill moves once per iteration)
    spills: float = 0.0      # compiled local-memory bytes per thread (with `regs`; else estimated from tile_regs)
    tail_rounds: float = 0.0  # dependent round trips once per launch, not per wave (a longer program, an epilogue)
    tail_syncs: float = 0.0   # block-wide synchronisations likewise
    base_regs: bool = True    # False: tile_regs is the thread's whole count (the register-FMA kernels, no REG_BASE)
    library: bool = False     # a torch / cuBLAS launch: `flops` (whole launch) at LIBRARY_TC_EFFICIENCY, `dram`
    first_load: float = 0.0   # bytes a program loads before its first MMA can start (the pipeline's first stage)
    atomic_target: float = 0.0   # bytes of the buffer the atomics add into (beyond the L2 they go through DRAM)


def _elem(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else int(dtype)


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _wgmma(rows: int, warps: int) -> bool:
    """Whether Triton lowers a tl.dot with `rows` output rows to an sm_90 warpgroup MMA (rows a multiple of 64,
    whole warpgroups); it reads its operands from shared memory while it runs, so the K loop's pipeliner keeps
    num_stages buffers instead of num_stages - 1 (compiled sm_90 kernels in validation/*.usage.json show both)."""
    return rows % 64 == 0 and warps % 4 == 0


def union_fraction(T: int, ratio: float = ACTIVE_RATIO) -> float:
    return 1.0 - (1.0 - ratio) ** T


def _average(kinds: list[tuple]) -> tuple:
    """(programs, bytes, inflight, flops, fma_flops, atomics) per program of a launch whose programs come in
    kinds, each (count, bytes, inflight, flops, fma_flops, atomics): the means, so every throughput term sees the
    launch's totals, and inflight such that bytes / inflight is the programs' mean (the feed term)."""
    kinds = [k for k in kinds if k[0] > 0]
    P = sum(k[0] for k in kinds)
    mean = [sum(k[0] * k[i] for k in kinds) / P for i in range(1, 6)]
    feed = sum(k[0] * k[1] / k[2] for k in kinds) / P
    mean[1] = mean[0] / feed
    return (P, *mean)


def _split_k_up(ln, T: int, d: int, n: int, de: int, ds: int, eb: int, f: float) -> Work:
    """small_batch.py's tensor-core `_up_kernel`: (row block, K-chunk) programs of the shared expert (two K loops,
    gate and up) and of the experts, and one mu program per chunk, each a pipelined K loop over its chunk only
    that stores fp32 partial sums (h [SPLIT_K, T, N*DE], hs, the first row block's logits r, mu)."""
    c, o = ln.args, ln.options
    warps, stages = o.get("num_warps", 4), o.get("num_stages", 3)
    pipe = max(stages - 1, 1)
    rows, bk, bt, split, kc = c["ROWS"], c["BLOCK_K"], c["BLOCK_T"], c["SPLIT_K"], c["k_chunk"]
    given = bool(c["GATES_GIVEN"])               # the router kernel wrote g and mu: no logits, no mu programs
    router = 0 if given else 1                   # the expert programs' [16, BLOCK_K] router operand (row 0 loaded)
    live = f if given else 1.0                   # share of expert programs that read their slab
    rb = de // rows
    steps = max(1, math.ceil(min(kc, d) / bk))   # K steps of a whole chunk (the last may be shorter or empty)
    cols = d / split                             # columns per chunk, on average over the chunks
    expert = (n * rb * split,
              live * ((rows + T + router) * cols * eb + T * rows * 4) + router * T * 4 / rb + (1 - router) * T * 4,
              pipe * (rows + T + router) * bk * eb, live * 2 * bt * (rows + 16 * router) * cols, 0.0, 0.0)
    shared = (math.ceil(ds / rows) * split, 2 * ((rows + T) * cols * eb + T * rows * 4), pipe * (rows + T) * bk * eb,
              4 * bt * rows * cols, 0.0, 0.0)
    mu = (router * split, T * cols * eb + cols * 4 + T * 4, pipe * (T * eb + 4) * bk, 0.0, 2 * bt * cols, 0.0)
    P, byts, inflight, flops, fma, _ = _average([expert, shared, mu])
    # Per K step a stage's wait and the barrier before its buffer is refilled. Warps beyond one per 4 rows of
    # BLOCK_T (4 on a 16-row tile) split the ROWS columns instead, each reading all of x and joining every wait.
    along = max(1.0, warps * 4 / bt)
    loop_rounds, loop_syncs = math.ceil(steps / pipe), (2 * steps + 2) * along
    # The tail: the shared expert's programs (launched first) run a second K loop; the mu programs' loop is not
    # pipelined (plain loads, no dot: one round trip per step).
    tail_rounds = max(loop_rounds, router * (steps - loop_rounds))
    # With PRESUM the last arriver of each expert row block (arrival, then its read of every chunk's partial)
    # sums the partials into chunk 0's tile: two more rounds at the end and those bytes read once more.
    presum = bool(c.get("PRESUM")) and split > 1
    tail_rounds += 2 * presum
    presum_bytes = presum * live * n * de * T * (split + 1) * 4
    stage = (bt + rows + 16 * router) * bk * eb
    return Work(ln.name, P, byts, flops, 2 + loop_rounds, warps, tensor_cores=True, grid=ln.programs, fma_flops=fma,
                syncs=loop_syncs, inflight=inflight, smem=pipe * stage,
                wgmma_smem=stage if _wgmma(bt, warps) else 0, iters=steps,
                # the K step's MMA operand fragments (fitted to Triton 3.9's sm_90 register counts)
                tile_regs=0.3 * eb * (rows + bt) * bk / (32 * warps),
                tail_rounds=tail_rounds, tail_syncs=loop_syncs, first_load=stage * min(1.0, cols / bk),
                dram=((live * n * de + 2 * ds + router * n) * d + T * d) * eb + router * d * 4
                + split * T * (live * n * de + 2 * ds + router * (n + 1)) * 4 + presum_bytes)


def _group_down(ln, T: int, d: int, n: int, de: int, ds: int, eb: int, f: float) -> Work:
    """small_batch.py's `_union_down_kernel`: per feature block one shared-expert program (a loop over BLOCK_S
    hidden columns) and one program per group of GROUP experts (the gates from the partial logits, then a
    pipelined loop over the group: its split partial h tiles, NormSiLU, gate, a dot with its w_down block), each
    ending in ONE fp32 atomic add of its [T, BLOCK_D] tile and the arrival counter; the last arriver writes y."""
    c, o = ln.args, ln.options
    warps, stages = o.get("num_warps", 4), o.get("num_stages", 3)
    # Unpipelined (num_stages 1), a step's loads issue when it starts and nothing hides them: two round trips'
    # worth per step (the H200 sweeps: 1.5-2.4 µs more per loop step than with 2 stages at 8 tokens).
    pipe = max(stages - 1, 0.5)
    bd, bt, group, split, bs = c["BLOCK_D"], c["BLOCK_T"], c["GROUP"], c["SPLIT_K"], c["BLOCK_S"]
    hsplit = c.get("H_SPLIT", split)       # partial h tiles an expert step reads (1 when the up kernel summed them)
    given = bool(c["GATES_GIVEN"])
    nd, ngroups = ln.grid[0], ln.grid[1] - 1
    per = n / ngroups                     # experts of a group program (the last group may be short)
    live = f * per                        # ... that some token activates (only their loads are issued)
    hit = 1.0 - (1.0 - f) ** per          # chance that a group program adds anything
    steps_s = math.ceil(ds / bs)          # the shared program's loop over its hidden columns
    stage_g = bd * de * eb + hsplit * bt * de * 4      # one expert: its w_down block and partial h tiles
    stage_s = bd * bs * eb + 2 * split * bt * bs * 4
    gates = (1 if given else split) * T * 4 * (group + 1)   # partial logits and mu (the router's g and mu)
    grp = (nd * ngroups, gates + group * eb + de * eb + live * (bd * de * eb + hsplit * T * de * 4) + 4,
           pipe * stage_g, live * 2 * bt * bd * de, live * (hsplit + 12) * bt * de, hit * T * bd * 4)
    shr = (nd, steps_s * (bd * bs * eb + 2 * split * T * bs * 4) + 4, pipe * stage_s, 2 * bt * bd * steps_s * bs,
           (2 * split + 6) * bt * steps_s * bs, T * bd * 4)
    P, byts, inflight, flops, fma, atomics = _average([grp, shr])
    # A group program: the gates' loads, the loop's waits over its active experts, the release of its atomic add
    # (acq_rel arrival) and the counter. Its loop step holds four barriers (the compiled sm_90 loop: a stage's
    # wait, NormSiLU's row sums, the activation staged for the dot), the shared program's two. The shared
    # programs (launched first) may run longer, and the last arriver of each feature block reads the accumulator
    # and writes y after everyone: both once, not per wave.
    along = max(1.0, warps * 4 / bt)
    rounds, syncs = 3 + math.ceil(live / pipe), (4 * group + 3) * along
    rounds_s, syncs_s = 2 + math.ceil(steps_s / pipe), (2 * steps_s + 3) * along
    # The fp32 accumulator (twice: its copy in the atomics' layout), the w_down block's fragments and the split
    # partial h tiles (weights fitted to Triton 3.9's sm_90 register counts).
    tile = 2 * bt * bd + 0.25 * eb * bd * max(de, bs) + 0.25 * bt * max(hsplit * de, split * 2 * bs)
    # Shared memory: the pipelined stages and the activation tile staged for the dot, or (more, without
    # stages) the scratch through which the accumulator changes layout for the atomics, at most 8192 and at
    # least 8 values a thread (as compiled for sm_87; sm_90 takes half of it at 17-32 rows), and on sm_90 one
    # more stage of w_down for the wgmma.
    smem = max((stages - 1) * max(stage_g, stage_s) + bt * de * eb, 4 * max(min(bt * bd, 8192), 8 * 32 * warps))
    wgmma = (bd * de * eb if stages > 1 else max(0, bt * bd * 4 - smem)) if _wgmma(bt, warps) else 0
    return Work(ln.name, P, byts, flops, rounds, warps, tensor_cores=True, grid=ln.programs, fma_flops=fma,
                syncs=syncs, atomics=atomics, atomic_target=T * d * 4, inflight=inflight,
                tile_regs=tile / (32 * warps), smem=smem,
                wgmma_smem=wgmma, iters=group, first_load=stage_g,
                tail_rounds=1 + max(0, rounds_s - rounds), tail_syncs=max(0.0, syncs_s - syncs),
                # Every feature block re-reads its experts' partial tiles: on the H200 each further K-chunk cost
                # about those bytes at the DRAM rate (sweep_tiles results), so they count as DRAM bytes.
                dram=(f * n * de + ds) * d * eb + T * d * eb
                + nd * T * (hsplit * f * n * de + split * (2 * ds + (0 if given else n + 1))) * 4)


def works_of(launches, T: int, d: int, n: int, de: int, ds: int, dtype, usage: dict | None = None) -> list[Work]:
    """One Work per recorded launch. usage: optional {kernel name: compile.compile_launch result}."""
    eb = _elem(dtype)
    usage = usage or {}
    out = []
    f = union_fraction(T)
    act = n * f                                  # experts some token of the batch activates
    for ln in launches:
        c, o, P = ln.args, ln.options, ln.programs
        warps, stages = o.get("num_warps", 4), o.get("num_stages", 3)
        threads = 32 * warps
        pipe = max(stages - 1, 1)
        name = ln.name
        if name == "_up_kernel":
            rows, bk, bt = c["ROWS"], c["BLOCK_K"], c["BLOCK_T"]
            if c["USE_DOT"]:
                w = _split_k_up(ln, T, d, n, de, ds, eb, f)
            else:
                # Decode: the logit (and mu) first over [BLOCK_T, BLOCK_KR] register tiles, then, for the active
                # experts only, the [rows, BLOCK_K] slab and one cross-warp sum per token per K step. Each token
                # is a dependent round: its x row loads after the previous token's sum (loads do not cross its
                # barrier). A sum is a 5-level shuffle tree per row a thread holds: 16-byte vectors put 256
                # columns on a warp, so min(warps, BLOCK_K / 256) warps lie along K and each thread holds ROWS /
                # (the other warps) rows. The fp32 slab serves every token, so a spilled part reloads per token.
                bkr = c.get("BLOCK_KR", bk)
                it_r, it_s = math.ceil(d / bkr), math.ceil(d / bk)
                steps = it_s * bt
                wk = min(warps, max(1, bk // 256))
                shuffles = warps * max(1.0, rows * wk / warps) * 5 * steps   # warp instructions per program
                byts = T * d * eb + d * eb + d * 4 + f * (rows * d * eb + T * rows * 4)
                fma = 4 * bt * d + f * (2 * bt * rows * d + rows * d + shuffles * 64 * SHUFFLE_COST)
                rounds = 1 + it_r + f * (steps + 1)
                syncs = 2 * it_r + 1 + f * steps
                inflight = max(2 * bt * bkr * eb, f * rows * bk * eb)
                # Registers, the whole count (no REG_BASE): the logit pass's [BLOCK_T, BLOCK_KR] x tile and its
                # products in fp32, a quarter of the slab's values (weights fitted to Triton 3.9's sm_90 counts
                # of the 19 measured decode configs, 32-155 registers; 16 for addresses and loop state).
                tile = 16 + (2 * bt * bkr + rows * bk * eb / 8) / threads
                w = Work(name, P, byts, 0, rounds, warps, tensor_cores=False, grid=P, fma_flops=fma, syncs=syncs,
                         inflight=inflight, tile_regs=tile, iters=it_r + f * steps, base_regs=False,
                         dram=(act * de + 2 * ds + n) * d * eb + T * d * eb)
            out.append(w)
        elif name == "_decode_down_kernel":
            bd, slots, bt = c["BLOCK_D"], c["SLOTS"], c["BLOCK_T"]
            bds = c.get("BLOCK_DS", _pow2(ds))
            r = math.ceil(max(act, 1) / slots)          # rounds of the loop over the active experts
            per_round = bd * slots * de * eb + T * (slots * de * 4 + 8 * slots)
            byts = T * 2 * ds * 4 + bd * ds * eb + T * n * 4 + r * per_round + T * bd * eb
            fma = 2 * bt * bd * bds + r * (bt * (2 * bd * slots * de + 12 * slots * de) + bd * slots * de)
            rounds = 3 + r * (1 + bt)                  # per round the w gather, then each token's h, g, mu
            syncs = 3 + bt + r * 3 * bt                # compaction; shared sum; per token: norm, two sums
            inflight = max(bd * slots * de * eb, bd * bds * eb)
            # Registers, the whole count (no REG_BASE): the gathered w block or the shared expert's tile, and the
            # accumulator (weights fitted to Triton 3.9's sm_90 counts of the 26 measured configs, 56-192).
            tile = 48 + 0.6 * (max(1.5 * bd * slots * de, bd * bds + bt * bds) + bt * bd) / threads
            out.append(Work(name, P, byts, 0, rounds, warps, tensor_cores=False, grid=P, fma_flops=fma,
                            syncs=syncs, inflight=inflight, tile_regs=tile, iters=r * bt, base_regs=False,
                            dram=(act * de + ds) * d * eb + T * (n * de + 2 * ds + n) * 4 + T * d * eb))
        elif name == "_union_down_kernel":
            out.append(_group_down(ln, T, d, n, de, ds, eb, f))
        elif name == "_router_kernel":
            bt, bn, bk = c["BLOCK_T"], c["BLOCK_N"], c["BLOCK_K"]
            # With SPLIT_K (few token blocks) a program sums a K-chunk, stores its partial logits and mu and
            # arrives; the last of its token block re-reads every chunk's partials and finishes the gates.
            split = c.get("SPLIT_K", 1)
            kc = min(c.get("k_chunk", d), d)
            iters = math.ceil(kc / bk)
            part = 2 * bt * (bn + 1) * 4 if split > 1 else 0
            # The last arriver of a split block reads every chunk's partial [BLOCK_T, BLOCK_N + 1] fp32 tile in the
            # accumulator's layout (8-byte pairs per thread, the chunks unrolled): TAIL_LOADS of them in flight
            # per thread, one round trip per such batch.
            tail_reads = math.ceil(split * bt * (bn + 1) * 4 / (threads * 8 * TAIL_LOADS)) if split > 1 else 0
            byts = bt * kc * eb + n * kc * eb + kc * 4 + bt * n * 8 + part
            out.append(Work(name, P, byts, 2 * bt * bn * kc, 2 + math.ceil(iters / pipe), warps, tensor_cores=True,
                            grid=P, fma_flops=2 * bt * kc, syncs=2 * iters + 4, inflight=pipe * (bt + bn) * bk * eb,
                            tile_regs=(bt * bn + 1.5 * bt * bk) / threads, smem=pipe * (bt + bn) * bk * eb,
                            wgmma_smem=(bt + bn) * bk * eb if _wgmma(bt, warps) else 0, iters=iters,
                            tail_rounds=1 + tail_reads if split > 1 else 0, tail_syncs=1 if split > 1 else 0,
                            dram=T * d * eb + n * d * eb + T * n * 8 + (split * T * (bn + 1) * 8 if split > 1 else 0)))
        elif name == "_group_kernel":
            iters = math.ceil(T / c["BLOCK"])
            out.append(Work(name, P, T * 8, 0, 2 + 2 * iters, warps, 2, False, grid=P, syncs=2 * iters,
                            fma_flops=4 * T))
        elif name in ("_grouped_up_kernel", "_grouped_down_kernel"):
            bm = c["BLOCK_M"]
            count = ACTIVE_RATIO * T
            tiles = n * max(1, math.ceil(count / bm))
            rows = count * n / tiles                   # real tokens per tile (the rest of BLOCK_M is padding)
            if name == "_grouped_up_kernel":
                bk = c["BLOCK_K"]
                iters = math.ceil(d / bk)
                byts = rows * d * eb + de * d * eb + rows * (de * eb + 8) + bm * 4
                flops = 2 * bm * de * d
                fma = 14 * bm * de
                rounds = 4 + math.ceil(iters / pipe)
                inflight = pipe * (rows + de) * bk * eb
                tile = bm * de / threads
                smem = pipe * (bm + de) * bk * eb
                stage = (bm + de) * bk * eb
                atomics = 0.0
                dram = T * d * eb + n * de * d * eb + count * n * (de * eb + 8)
                # Not charged: the shared expert's programs (in this kernel since 2026-12-05, the grid's first
                # programs since 2026-12-06, two full tiles' work each). Most measured caches predate them;
                # charging them against those measurements dropped the fit (H100 14 -> 13 of 15 in-sample,
                # 12 -> 9 held out; H200 32 and 31 -> 30 of 36).
            else:
                bd = c["BLOCK_D"]
                iters = math.ceil(d / bd)
                byts = rows * de * eb + d * de * eb + bm * 4
                flops = 2 * bm * de * d
                fma = 0.0
                rounds = 3 + math.ceil(iters / pipe)
                inflight = pipe * bd * de * eb
                tile = (bm * de * 0.5 + bm * bd) / threads
                # Besides the w_down stages: the activation tile, and the scratch through which the fp32
                # product changes from the MMA's layout to the atomics' one (the rows the warps' MMA tiles cover).
                smem = pipe * bd * de * eb + bm * de * eb + min(bm, 16 * warps) * bd * 4
                stage = bd * de * eb
                atomics = rows * d * 4
                dram = n * de * d * eb + count * n * de * eb
            # An MMA warp covers 16 rows (a wgmma warpgroup 64); warps beyond BLOCK_M / 16 split the output
            # columns instead, each reading the whole row tile from shared memory and joining every K step's waits.
            along_n = max(1.0, warps * 16 / bm)
            out.append(Work(name, tiles, byts, flops, rounds, warps, tensor_cores=True, grid=P, fma_flops=fma,
                            syncs=(2 * iters + 2) * along_n, atomics=atomics, inflight=inflight, tile_regs=tile,
                            atomic_target=T * d * 4 if atomics else 0.0,
                            smem=smem, wgmma_smem=stage if _wgmma(bm, warps) else 0, iters=iters, dram=dram))
        else:
            tensors = [v for v in c.values() if isinstance(v, torch.Tensor)]
            total = sum(t.numel() * t.element_size() for t in tensors)
            out.append(Work(name, P, total / max(P, 1), 0, 4, warps, 2, False, grid=P))
        u = usage.get(name)
        if u is not None:
            out[-1].smem, out[-1].regs, out[-1].spills = u.get("shared", 0), u.get("regs"), u.get("spills") or 0
            out[-1].wgmma_smem = 0
        if name == "_grouped_up_kernel" and c.get("TOKEN_MAJOR"):
            out += _dense_down_works(T, d, n, de, eb)
    return out


def _dense_down_works(T: int, d: int, n: int, de: int, eb: int) -> list[Work]:
    """The GEMM down projection's two torch launches (ffn.down_gemm; the up kernel then writes token-major): the
    zero fill of the activations [T, N*de] and one cuBLAS GEMM act [T, N*de] @ w_down^T over every expert's
    columns, whatever the active ratio (5x the active FLOPs at 20% active). Library launches (see kernel_us)."""
    k = n * de
    return [Work("zero_fill (torch)", 1, 0, 0, 0, 4, library=True, dram=T * k * eb),
            Work("down_gemm (cuBLAS)", 1, 0, 2 * T * k * d, 0, 4, library=True,
                 dram=(T + d) * k * eb + 2 * T * d * eb)]


def _regs(w: Work, k: Constants) -> float:
    return w.regs if w.regs else (k.reg_base if w.base_regs else 0.0) + w.tile_regs


def _occupancy(w: Work, profile, k: Constants = CONSTANTS) -> int:
    occ = min(profile.max_blocks_per_sm, profile.max_warps_per_sm // max(w.warps, 1))
    smem = w.smem + (w.wgmma_smem if tuple(profile.capability) >= (9, 0) else 0)
    if smem:   # every resident block also holds the driver's reserved shared memory
        occ = min(occ, profile.smem_per_sm // (smem + profile.smem_reserved_per_block))
    if w.regs or w.tile_regs:
        regs = min(_regs(w, k), REG_LIMIT)
        occ = min(occ, int(profile.regs_per_sm // (math.ceil(regs / 8) * 8 * 32 * w.warps)))
    return max(occ, 1)


def kernel_us(w: Work, profile, constants: Constants | None = None) -> float:
    """Predicted µs of one launch on `profile` (see the module docstring)."""
    k = constants or CONSTANTS
    if w.library:
        return profile.launch_us + max(w.flops / (profile.tc_tflops * 1e6 * LIBRARY_TC_EFFICIENCY),
                                       (w.dram or 0.0) / (profile.dram_gbps * 1e3 * DRAM_EFFICIENCY))
    sms, lat = profile.sms, profile.mem_latency_us
    per_sm = math.ceil(w.programs / sms) if w.programs > 0 else 0
    if per_sm == 0:
        return profile.launch_us
    rounds = w.rounds
    spill = w.spills if w.regs else 4 * max(0.0, _regs(w, k) - REG_LIMIT)     # bytes per thread
    if spill:   # the excess goes to local memory and back once per loop iteration
        rounds += w.iters
    resident = min(_occupancy(w, profile, k), per_sm)
    waves = math.ceil(per_sm / resident)
    bw = profile.dram_gbps * 1e3 * DRAM_EFFICIENCY                        # bytes per µs
    dram = w.dram if w.dram is not None else w.programs * w.bytes
    t_dram = max(dram, 0.0) / bw
    # the busiest SM's, at its share of the bandwidth among the SMs that run programs
    atomic_bw = ATOMIC_BYTES_PER_SM_CLOCK * sms * profile.clock_ghz * 1e3 * k.atomic_efficiency
    if w.atomic_target > profile.l2_bytes > 0:   # the accumulator spills the L2: each add reads and writes DRAM
        atomic_bw = min(atomic_bw, bw / 2)
    t_atomic = per_sm * min(sms, w.programs) * w.atomics / atomic_bw
    clk = profile.clock_ghz * 1e3                                         # cycles per µs
    # The first stage of every resident program streams in before any MMA runs: at the SM's share of the bandwidth
    fill = resident * w.first_load / (bw / min(sms, w.programs))
    chain = (waves * (rounds * lat + w.syncs * k.sync_cycles / clk + fill)
             + w.tail_rounds * lat + w.tail_syncs * k.sync_cycles / clk)
    tc_rate = profile.tc_flops_per_clk_sm * k.tc_efficiency * clk
    fma_rate = profile.fma_flops_per_clk_sm * k.fma_efficiency * clk
    fma_rate *= min(1.0, resident * w.warps / ISSUE_WARPS)
    if w.tensor_cores:
        math_t = per_sm * (w.flops / tc_rate + w.fma_flops / fma_rate)
    else:
        math_t = per_sm * (w.flops + w.fma_flops) / fma_rate
    inflight = w.inflight or w.warps * 32 * 16 * w.ilp
    # Spilled registers are per-thread loads and stores, a few 16-byte ones in flight per thread, not the
    # program's bulk tile loads: they feed at the thread's own rate.
    spilled = 2 * spill * 32 * w.warps * w.iters
    feed = per_sm * (w.bytes / inflight + spilled / (w.warps * 32 * 16 * w.ilp)) * lat / resident
    terms = (t_dram, t_atomic, chain, math_t, feed)
    top = max(terms)
    return profile.launch_us + top + k.overlap * (sum(terms) - top)


def shared_expert_us(path: str, T: int, d: int, ds: int, dtype, profile, constants: Constants | None = None) -> float:
    """The grouped path's shared expert: three cuBLAS GEMMs, an elementwise SwiGLU and two copies (torch)."""
    if path != "grouped":
        return 0.0
    k = constants or CONSTANTS
    eb = _elem(dtype)
    flops = 6 * T * d * ds
    byts = 3 * d * ds * eb + T * d * (eb * 2 + 4 * 3) + T * ds * eb * 4
    peak = profile.tc_flops_per_clk_sm * k.tc_efficiency * profile.clock_ghz * 1e3 * profile.sms
    return 6 * profile.launch_us + max(flops / peak, byts / (profile.dram_gbps * 1e3 * DRAM_EFFICIENCY))


def predict(path: str, cfg: dict, T: int, d: int, n: int, de: int, ds: int, dtype, profile,
            usage: dict | None = None, launches=None, constants: Constants | None = None) -> float:
    """Predicted µs of the whole `path` launcher for `cfg` on `profile` (launches: a recorded list, to skip
    recording it again; constants: other than the shipped CONSTANTS, e.g. while fitting them)."""
    from .launches import record

    launches = launches if launches is not None else record(path, cfg, T, d, n, de, ds, dtype)
    return path_us(works_of(launches, T, d, n, de, ds, dtype, usage), path, T, d, ds, dtype, profile, constants)


def path_us(works: list[Work], path: str, T: int, d: int, ds: int, dtype, profile,
            constants: Constants | None = None) -> float:
    """Predicted µs of a whole launcher from its Works (predict without recording them again)."""
    return (profile.graph_start_us + sum(kernel_us(w, profile, constants) for w in works)
            + shared_expert_us(path, T, d, ds, dtype, profile, constants))


def with_constants(**values) -> Constants:
    return replace(CONSTANTS, **values)
