"""Host-side plan of the CuPy backend: which path, launch grids, tile sizes, compile options and the CUDA source.

Pure Python (no cupy import), so CI tests it without a GPU. The tunable tile constants (ROUTER_EXPERTS,
UP_STAGES, M_TILES) reach the kernels as -D options from here; the shared-memory formulas mirror the constexpr ones in
prefill.cu / common.cuh (tests compare them with ptxas' figures; prefill_up and prefill_down trap when launched
with less dynamic shared memory than their tile needs).
"""
from __future__ import annotations

import math
from importlib import resources

import torch

# Up to this many tokens the decode kernels (register FMAs, two launches; three with max_active) run; above,
# tokens are grouped by expert and multiplied on tensor cores, which wins as soon as several tokens share an expert.
DECODE_MAX_T = 8
DECODE_THREADS = 256  # 8 warps: one router row / up row / output feature per warp
DECODE_WARPS = DECODE_THREADS // 32
ROUTER_TOKENS = 64     # tokens per block of the prefill router (ROUTER_BM in prefill.cu): 16 per warp
ROUTER_EXPERTS = 32    # experts per block of the prefill router (-DROUTER_EXPERTS): 4 chunks + mu at N = 102
ROUTER_THREADS = 128
ROUTER_SMEM_LIMIT = 48 * 1024 - 8 * ROUTER_TOKENS  # static shared memory less the row offsets
K_STEP_BYTES = 128     # PF_UP_BK, ROUTER_BK: bytes of x per row and K step of the prefill GEMMs
# prefill_up's pipeline depth (-DPF_UP_STAGES): 2 x 27 KB of dynamic smem at 16-bit de=64. With the gathered rows
# resolved once per block, 2 stages beat 3 at every preset on the H200 (results/h200/sweep_cupy_prefill_quick.json:
# 1.2b 386 vs 395 µs, 0.1b 121 vs 133 at T=4096).
UP_STAGES = 2
LONG_PREFILL_WARPS = 4  # warps per prefill_up / prefill_down block from 1024 tokens on (1, 2, 4 or 8)
M_TILES = {16: 2, 32: 2, 64: 2, 128: 1}  # 16-token m-tiles per warp of those blocks, by expert width (-DPF_MT),
MAX_BLOCK_TOKENS = 128                   # ... fewer where the block would hold more tokens than this
GROUP_THREADS = 256
DYN_SMEM_LIMIT = 96 * 1024      # PF_DYN_SMEM_LIMIT: prefill_up / prefill_down dynamic shared memory (Orin: 163 KB)
DOWN_BD = 64                    # PF_BD: output features per step of prefill_down
DOWN_FEATURES = 512             # about this many output features per prefill_down block (grid z splits d)
EXPERT_WIDTHS = (16, 32, 64, 128)
SOURCES = ("common.cuh", "decode.cu", "prefill.cu")

# Storage type of each torch dtype in the CUDA source.
CTYPE = {torch.bfloat16: "bf16_t", torch.float16: "f16_t", torch.float32: "float", torch.float64: "double"}
X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_supported(x_dtype: torch.dtype, de: int) -> None:
    """ValueErrors for what the kernels do not cover (the dispatch point validated everything else)."""
    if x_dtype not in X_DTYPES:
        raise ValueError(f"x: backend 'cupy' runs bfloat16, float16 and float32, got {x_dtype} "
                         f"(float64 runs on backend='torch')")
    if de not in EXPERT_WIDTHS:
        raise ValueError(f"gamma: backend 'cupy' needs an expert width de in {EXPERT_WIDTHS}, got {de}")


def router_dtype(w_router_dtype: torch.dtype) -> torch.dtype:
    """The router is read in its own 16- or 32-bit dtype; a float64 router is rounded to fp32 first (the
    reference computes the logits of non-float64 layers in fp32 anyway)."""
    return torch.float32 if w_router_dtype == torch.float64 else w_router_dtype


DECODE_KERNELS = ("deco_decode_router", "deco_decode_up", "deco_decode_down")
PREFILL_KERNELS = ("deco_prefill_router", "deco_group_tokens", "deco_prefill_up", "deco_prefill_down")


def compile_options(x_dtype, w_router_dtype, scale_dtype, gamma_dtype, de: int, *, decode_tt: int | None = None,
                    prefill_warps: int | None = None, ldmatrix: bool = True) -> tuple:
    """NVRTC / nvcc options of one module: the storage types, the expert width, and which kernels it holds:
    the decode kernels for ``decode_tt`` tokens per pass and/or the prefill kernels with ``prefill_warps`` warps
    per expert tile (with M_TILES, ROUTER_EXPERTS and UP_STAGES as they are now). One module per distinct tuple,
    compiled once (the launcher caches it); small modules keep each NVRTC compile to a few seconds."""
    opts = ["-std=c++17", f"-DELEM_T={CTYPE[x_dtype]}", f"-DROUTER_T={CTYPE[router_dtype(w_router_dtype)]}",
            f"-DSCALE_T={CTYPE[scale_dtype]}", f"-DGAMMA_T={CTYPE[gamma_dtype]}", f"-DDE={de}",
            f"-DUSE_LDMATRIX={int(ldmatrix)}"]
    if decode_tt is not None:
        opts.append(f"-DDECODE_TT={decode_tt}")
    if prefill_warps is not None:
        opts += [f"-DPREFILL_WARPS={prefill_warps}", f"-DPF_MT={m_tiles(de, prefill_warps)}",
                 f"-DROUTER_EXPERTS={ROUTER_EXPERTS}", f"-DPF_UP_STAGES={UP_STAGES}"]
    return tuple(opts)


def source() -> str:
    """The CUDA source of every kernel: common.cuh, decode.cu and prefill.cu, shipped as package data."""
    root = resources.files("deco_kernels.cupy")
    return "\n".join(root.joinpath(name).read_text() for name in SOURCES)


# ---------------------------------------------------------------------------------------------------------
# Decode (T <= DECODE_MAX_T)
# ---------------------------------------------------------------------------------------------------------
def tokens_per_pass(T: int) -> int:
    """TT of the decode kernels: the next power of two >= T (instantiated for 1, 2, 4, 8)."""
    if not 1 <= T <= DECODE_MAX_T:
        raise ValueError(f"T: the decode path takes 1..{DECODE_MAX_T} tokens, got {T}")
    return 1 << (T - 1).bit_length()


def decode_kernels(max_active) -> tuple:
    """The decode launches in order: the router kernel runs first only for max_active (a top-k needs all of a
    token's logits at once); otherwise each up block computes its own expert's gates."""
    return DECODE_KERNELS if max_active is not None else DECODE_KERNELS[1:]


def decode_grids(n: int, de: int, ds: int, d: int) -> dict:
    """Blocks of the decode launches (DECODE_THREADS threads each): router rows (+1 for wbar); up: the shared
    expert's 8-row blocks, one block for mu = x.wbar, then a block per (expert, 8 rows) (``up_shared``: the
    index of the mu block); down: one warp per output feature."""
    shared = math.ceil(ds / DECODE_WARPS)
    return dict(router=math.ceil((n + 1) / DECODE_WARPS),
                up=shared + 1 + n * (de // DECODE_WARPS), up_shared=shared,
                down=math.ceil(d / DECODE_WARPS))


# ---------------------------------------------------------------------------------------------------------
# Prefill (T > DECODE_MAX_T)
# ---------------------------------------------------------------------------------------------------------
def _stage_bytes(a_size: int, b_size: int, rows: int, cols: int, bk: int) -> int:
    """One pipeline stage of gemm_global: an A tile [rows][bk + pad] and a B tile [cols][bk + pad]."""
    return rows * (bk + 16 // a_size) * a_size + cols * (bk + 16 // b_size) * b_size


def _stages(stage: int, limit: int) -> int:
    """gemm_stages: the deepest pipeline (4, 3 or 2 stages) that fits."""
    return next((s for s in (4, 3) if s * stage <= limit), 2)


def m_tiles(de: int, warps: int) -> int:
    """16-token m-tiles per warp of prefill_up / prefill_down: M_TILES[de], at most MAX_BLOCK_TOKENS per block."""
    return max(1, min(M_TILES[de], MAX_BLOCK_TOKENS // (16 * warps)))


def _threads_tile(rows: int, cols: int, element_size: int, threads: int) -> bool:
    """load_tile's static_assert: the threads copy whole 16-byte chunks of a [rows, cols] tile, each thread the
    same chunk of every (threads / chunks per row)-th row."""
    chunks = cols * element_size // 16
    return cols * element_size % 16 == 0 and threads % chunks == 0 and rows % (threads // chunks) == 0


def expert_tile(x_dtype: torch.dtype, de: int, warps: int) -> dict:
    """Tiles of prefill_up and prefill_down with ``warps`` warps: bm tokens (16 * mt per warp, mt = m_tiles);
    up: bk K step (K_STEP_BYTES of x), UP_STAGES pipeline stages in up_smem dynamic bytes; down: bd output
    features per step, down_stages chunks of w_down in flight and down_smem dynamic bytes (act tile, w_down
    chunks, each warp's [16, bd + 8] fp32 staging tile); whether both fit in shared memory and the block's
    threads tile every copy."""
    es = torch.empty((), dtype=x_dtype).element_size()
    pad, bk = 16 // es, K_STEP_BYTES // es
    mt = m_tiles(de, warps)
    bm = warps * mt * 16
    up_smem = UP_STAGES * _stage_bytes(es, es, bm, de, bk)

    def down_bytes(s):
        return (bm + s * DOWN_BD) * (de + pad) * es + warps * 16 * (DOWN_BD + 8) * 4

    down_stages = 3 if down_bytes(3) <= DYN_SMEM_LIMIT else 2
    down_smem = down_bytes(down_stages)
    threads = 32 * warps
    copies = all(_threads_tile(rows, cols, es, threads)
                 for rows, cols in ((bm, bk), (de, bk), (bm, de), (DOWN_BD, de)))
    return dict(warps=warps, mt=mt, bm=bm, bk=bk, stages=UP_STAGES, up_smem=up_smem, bd=DOWN_BD,
                down_stages=down_stages, down_smem=down_smem,
                fits=up_smem <= DYN_SMEM_LIMIT and down_smem <= DYN_SMEM_LIMIT and copies)


def router_tile(x_dtype: torch.dtype, w_router_dtype: torch.dtype) -> dict:
    """Tile of prefill_router: ROUTER_TOKENS tokens x ROUTER_EXPERTS experts, a K_STEP_BYTES K step of x, the
    stages that fit in static shared memory (smem bytes)."""
    es = torch.empty((), dtype=x_dtype).element_size()
    rs = torch.empty((), dtype=router_dtype(w_router_dtype)).element_size()
    bk = K_STEP_BYTES // es
    stage = _stage_bytes(es, rs, ROUTER_TOKENS, ROUTER_EXPERTS, bk)
    stages = _stages(stage, ROUTER_SMEM_LIMIT)
    return dict(bk=bk, stages=stages, smem=stages * stage, fits=stages * stage <= ROUTER_SMEM_LIMIT)


def prefill_warps(T: int, x_dtype: torch.dtype, de: int) -> int:
    """Warps per prefill_up / prefill_down block (1, 2, 4 or 8): LONG_PREFILL_WARPS for long prefills (each
    expert sees ~20% of the tokens), one warp below 1024 tokens (fewer empty rows); the largest that fits."""
    want = LONG_PREFILL_WARPS if T >= 1024 else 1
    for warps in (8, 4, 2, 1):
        if warps <= want and expert_tile(x_dtype, de, warps)["fits"]:
            return warps
    raise ValueError(f"gamma: no prefill tile fits de={de} with {x_dtype}")  # not reached for EXPERT_WIDTHS


def down_features(d: int) -> int:
    """Output features per prefill_down block: d split into ceil(d / DOWN_FEATURES) near-equal whole chunks."""
    chunks = math.ceil(d / DOWN_BD)
    return DOWN_BD * math.ceil(chunks / math.ceil(d / DOWN_FEATURES))


def router_grid(T: int, n: int) -> tuple:
    """prefill_router's grid: (expert chunks of ROUTER_EXPERTS, then the mu block; token blocks of
    ROUTER_TOKENS). Chunks of one token block are adjacent in launch order, so its x rows are read from DRAM once."""
    return math.ceil(n / ROUTER_EXPERTS) + 1, math.ceil(T / ROUTER_TOKENS)


def prefill_grids(T: int, n: int, d: int, x_dtype: torch.dtype, de: int) -> dict:
    """Grids and block sizes of the four prefill launches; router: router_grid, with an arrival counter per token
    block (``router_counters``) for max_active; up: (expert, token tile) with ``up_smem`` bytes of dynamic shared
    memory; down: (expert, token tile, block of ``fb`` output features) with ``down_smem``."""
    tile = expert_tile(x_dtype, de, prefill_warps(T, x_dtype, de))
    fb = down_features(d)
    tiles = math.ceil(T / tile["bm"])
    router = router_grid(T, n)
    return dict(router=router, router_threads=ROUTER_THREADS, router_counters=router[1],
                group=(n,), group_threads=GROUP_THREADS,
                up=(n, tiles), down=(n, tiles, math.ceil(d / fb)), expert_threads=32 * tile["warps"], fb=fb,
                up_smem=tile["up_smem"], down_smem=tile["down_smem"], tile=tile)


# ---------------------------------------------------------------------------------------------------------
# Vector loads
# ---------------------------------------------------------------------------------------------------------
def vector_loads_ok(d: int, x_row_stride: int, x_element_size: int, pointers) -> bool:
    """The kernels read rows 16 bytes at a time (8 elements per lane, cp.async chunks) when every row of x and of
    the weights starts on a 16-byte boundary: d a multiple of 8, the row stride of x a whole number of 16-byte
    chunks, every base address aligned. Otherwise they fall back to element loads."""
    return (d % 8 == 0 and (x_row_stride * x_element_size) % 16 == 0
            and all(int(p) % 16 == 0 for p in pointers))
