"""CuPy backend: the host-side plan and the launcher's kernel arguments (CPU, no cupy needed), a compile of every
kernel with nvcc for sm_87 and sm_90 (skipped without nvcc), and on a GPU (with cupy) correctness against the
float64 reference on adversarial shapes with NaN-poisoned outputs, CUDA-graph capture, and an NVRTC compile for
Jetson Orin (sm_87).
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, assert_rel_close, backend_and_reference, far_apart_rows, make_layer, poison_outputs

from deco_kernels import layout, ops, reference
from deco_kernels.cupy import geometry as geo

HAS_CUPY = importlib.util.find_spec("cupy") is not None
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {BF16: 1e-2, FP16: 1e-2, FP32: 1e-5}


# ---------------------------------------------------------------------------------------------------------
# Host-side plan (no GPU, no cupy)
# ---------------------------------------------------------------------------------------------------------
def test_tokens_per_pass():
    assert [geo.tokens_per_pass(t) for t in range(1, geo.DECODE_MAX_T + 1)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for bad in (0, geo.DECODE_MAX_T + 1):
        with pytest.raises(ValueError, match="T"):
            geo.tokens_per_pass(bad)


@pytest.mark.parametrize("n, de, ds, d", [(102, 64, 128, 1792), (13, 16, 24, 40), (1, 128, 7, 9)])
def test_decode_grids_cover_every_row_and_feature(n, de, ds, d):
    grids = geo.decode_grids(n, de, ds, d)
    w = geo.DECODE_WARPS
    assert (grids["router"] - 1) * w < n + 1 <= grids["router"] * w      # every router row + the wbar row
    # up: the shared expert's 8-row blocks, the mu block, then 8-row blocks that never straddle experts
    assert (grids["up_shared"] - 1) * w < ds <= grids["up_shared"] * w
    assert grids["up"] == grids["up_shared"] + 1 + n * de // w and de % w == 0
    assert (grids["down"] - 1) * w < d <= grids["down"] * w


@pytest.mark.parametrize("dtype", geo.X_DTYPES, ids=str)
@pytest.mark.parametrize("de", geo.EXPERT_WIDTHS)
def test_prefill_tiles_fit_shared_memory(dtype, de):
    for T in (9, 65, 300, 4096):
        warps = geo.prefill_warps(T, dtype, de)
        tile = geo.expert_tile(dtype, de, warps)
        assert tile["fits"] and max(tile["up_smem"], tile["down_smem"]) <= geo.DYN_SMEM_LIMIT <= 163 * 1024  # Orin
        assert tile["bd"] == 64 and tile["bk"] * torch.empty((), dtype=dtype).element_size() == 128
        for d in (40, 77, 768, 1792):
            grids = geo.prefill_grids(T, 13, d, dtype, de)
            assert grids["up"] == grids["down"][:2] and grids["up"][0] == 13 and grids["up"][1] * tile["bm"] >= T
            fb, splits = grids["fb"], grids["down"][2]
            assert fb % tile["bd"] == 0 and splits * fb >= d > (splits - 1) * fb  # every feature, no empty block
            assert grids["up_smem"] == tile["up_smem"] and grids["down_smem"] == tile["down_smem"]
        assert tile["stages"] == geo.UP_STAGES >= 2
        for router in (FP32, BF16):
            rt = geo.router_tile(dtype, router)
            assert rt["fits"] and rt["stages"] >= 2 and rt["bk"] == tile["bk"]
    assert geo.prefill_warps(4096, BF16, 64) == 4 and geo.prefill_warps(300, BF16, 64) == 1
    # 1.2b, 4096 tokens: UP_STAGES 128-byte K steps of 128 tokens and the expert's 64 rows (55296 bytes for 2)
    assert geo.expert_tile(BF16, 64, 4)["up_smem"] == geo.UP_STAGES * (128 + 64) * (64 + 8) * 2


@pytest.mark.parametrize("T", [9, 63, 64, 65, 4096, 100_001])
@pytest.mark.parametrize("n", [1, 13, 32, 33, 102, 128])
def test_router_grid_covers_every_token_and_expert_once(T, n):
    chunks, blocks = geo.router_grid(T, n)
    e, t = geo.ROUTER_EXPERTS, geo.ROUTER_TOKENS
    # chunk blocks c < chunks own experts [c*e, min(n, (c+1)*e)), none empty; the block after them computes mu
    assert (chunks - 2) * e < n <= (chunks - 1) * e
    assert (blocks - 1) * t < T <= blocks * t and blocks <= 65535  # token blocks on grid y
    grids = geo.prefill_grids(T, n, 1792, BF16, 64)
    assert grids["router"] == (chunks, blocks) and grids["router_counters"] == blocks
    assert grids["router_threads"] == geo.ROUTER_THREADS == 32 * (geo.ROUTER_TOKENS // 16)
    assert geo.ROUTER_EXPERTS % 16 == 0  # whole pairs of 8-expert mma n-tiles
    # 1.2b at 4096 tokens: hundreds of blocks (64 tokens x 4 chunks + a mu block each), not 64
    assert geo.router_grid(4096, 102) == (5, 64)


def test_prefill_tile_is_the_widest_that_fits():
    # fp32 with de=128 does not fit four warps in prefill_down's budget: the plan must fall back to two
    assert not geo.expert_tile(FP32, 128, 4)["fits"] and geo.expert_tile(FP32, 128, 4)["up_smem"] <= geo.DYN_SMEM_LIMIT
    assert geo.prefill_warps(4096, FP32, 128) == 2
    assert geo.expert_tile(BF16, 64, 4)["down_stages"] == 3 and geo.expert_tile(FP32, 64, 4)["down_stages"] == 2
    # d split into blocks of whole 64-feature chunks, about DOWN_FEATURES each
    assert geo.down_features(1792) == 448 and geo.down_features(768) == 384 and geo.down_features(40) == 64


def test_long_prefill_warps_fall_back_where_the_copies_do_not_tile(monkeypatch):
    monkeypatch.setattr(geo, "LONG_PREFILL_WARPS", 8)
    # one m-tile per warp: blocks of MAX_BLOCK_TOKENS = 128 tokens, as with four warps of two m-tiles
    assert geo.prefill_warps(4096, BF16, 64) == 8 and geo.expert_tile(BF16, 64, 8)["bm"] == 128
    assert geo.m_tiles(64, 8) == 1 and geo.m_tiles(64, 4) == 2 and geo.m_tiles(128, 4) == 1
    assert geo.prefill_warps(300, BF16, 64) == 1  # short prefills keep one warp
    # de=16 with 8 warps: 256 threads copy 32 rows of 128-byte K steps at a time, but the expert has 16 rows
    assert not geo.expert_tile(BF16, 16, 8)["fits"] and geo.prefill_warps(4096, BF16, 16) == 4
    assert "-DPF_MT=1" in geo.compile_options(BF16, BF16, BF16, BF16, 64, prefill_warps=8)


def test_check_supported():
    geo.check_supported(BF16, 64)
    with pytest.raises(ValueError, match="x"):
        geo.check_supported(torch.float64, 64)
    for de in (8, 48, 256):
        with pytest.raises(ValueError, match="gamma"):
            geo.check_supported(FP32, de)


def test_vector_loads_need_aligned_rows():
    assert geo.vector_loads_ok(64, 64, 2, [0, 256, 4096])
    assert not geo.vector_loads_ok(60, 64, 2, [0])          # d not a multiple of 8
    assert not geo.vector_loads_ok(64, 68, 2, [0])          # x rows 136 bytes apart
    assert not geo.vector_loads_ok(64, 64, 2, [0, 8])       # a base address off 16 bytes
    assert geo.vector_loads_ok(64, 68, 4, [0])              # 272-byte fp32 rows are fine


def test_compile_options():
    opts = geo.compile_options(BF16, torch.float64, torch.float32, BF16, 64, decode_tt=4)
    assert "-DELEM_T=bf16_t" in opts and "-DROUTER_T=float" in opts and "-DSCALE_T=float" in opts
    assert "-DDE=64" in opts and "-DDECODE_TT=4" in opts and not any("PREFILL" in o or "STAGES" in o for o in opts)
    assert geo.compile_options(FP16, FP16, FP16, FP16, 32, prefill_warps=2, ldmatrix=False)[-5:] == \
        ("-DUSE_LDMATRIX=0", "-DPREFILL_WARPS=2", f"-DPF_MT={geo.m_tiles(32, 2)}",
         f"-DROUTER_EXPERTS={geo.ROUTER_EXPERTS}", f"-DPF_UP_STAGES={geo.UP_STAGES}")


def kernel_signatures() -> dict:
    """{kernel name: [C parameter types]} of every extern "C" kernel in the shipped source."""
    src = geo.source().replace("\\\n", " ")
    bounds = r'(?:__launch_bounds__\([^)]*\)|DECODE_BOUNDS_\w+)'
    found = re.findall(r'extern "C" __global__ void ' + bounds + r'\s*(deco_\w+)\(([^)]*)\)', src)
    sigs = {}
    for name, params in found:
        sigs[name] = [" ".join(p.split()[:-1]) for p in params.split(",")]
    return sigs


def test_source_defines_every_kernel_the_launcher_uses():
    sigs = kernel_signatures()
    assert set(sigs) == set(geo.DECODE_KERNELS) | set(geo.PREFILL_KERNELS)
    # NVRTC must not need the CUDA headers
    assert not re.search(r"^\s*#\s*include", geo.source(), flags=re.MULTILINE)


def test_cuda_source_ships_as_package_data():
    tool = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "deco_kernels.cupy" in tool["packages"]
    patterns = tool["package-data"]["deco_kernels.cupy"]
    assert all(any(fnmatch.fnmatch(name, p) for p in patterns) for name in geo.SOURCES)


@pytest.fixture
def ffn_without_gpu(monkeypatch):
    """deco_kernels.cupy.ffn imported against a stand-in cupy module (the launcher only touches cupy when it
    launches), removed again afterwards."""
    import deco_kernels.cupy as pkg
    saved, saved_attr = sys.modules.pop("deco_kernels.cupy.ffn", None), pkg.__dict__.pop("ffn", None)
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    yield importlib.import_module("deco_kernels.cupy.ffn")
    sys.modules.pop("deco_kernels.cupy.ffn", None)
    pkg.__dict__.pop("ffn", None)
    if saved is not None:
        sys.modules["deco_kernels.cupy.ffn"] = saved
    if saved_attr is not None:
        pkg.ffn = saved_attr


class RecordingLaunch:
    def __init__(self, spec=None):
        self.spec, self.calls = spec or {}, []

    def specialise(self, **more):
        child = RecordingLaunch({**self.spec, **more})
        child.calls = self.calls
        return child

    def __call__(self, name, grid, threads, *args, smem=0):
        self.calls.append((name, tuple(grid), threads, args, self.spec, smem))


C_TO_NUMPY = {"long long": "int64", "int": "int32", "float": "float32"}


@pytest.mark.parametrize("T", [1, 3, 8, 9, 300, 5000])
@pytest.mark.parametrize("knobs", [dict(bias_s=0.0, bias_v=None, max_active=None),
                                   dict(bias_s=0.0, bias_v="vector", max_active=3)], ids=["plain", "knobs"])
def test_launch_arguments_match_the_kernel_signatures(ffn_without_gpu, T, knobs):
    # Meta tensors: shapes and strides without memory (data_ptr() is 0), so the launcher runs on the CPU.
    n, d, de, ds = 13, 40, 16, 24
    meta = dict(device="meta", dtype=BF16)
    x = torch.empty(T, d, **meta)
    w = dict(w_router=torch.empty(n, d, **meta), router_scale=torch.empty(n, **meta),
             w_up=torch.empty(n * de, d, **meta), gamma=torch.empty(de, **meta),
             w_down=torch.empty(d, n * de, **meta), ws_gate=torch.empty(ds, d, **meta),
             ws_up=torch.empty(ds, d, **meta), ws_down=torch.empty(d, ds, **meta))
    wbar = torch.empty(d, device="meta", dtype=FP32)
    bias_v = torch.empty(n, device="meta", dtype=FP32) if knobs["bias_v"] else None
    g, y = torch.empty(T, n, device="meta", dtype=FP32), torch.empty(T, d, **meta)
    launch = RecordingLaunch()
    path = ffn_without_gpu._decode if T <= geo.DECODE_MAX_T else ffn_without_gpu._prefill
    path(launch, x, w, wbar, knobs["bias_s"], bias_v, 0.1, knobs["max_active"], g, y, True)
    sigs = kernel_signatures()
    expected = geo.decode_kernels(knobs["max_active"]) if T <= geo.DECODE_MAX_T else geo.PREFILL_KERNELS
    assert [c[0] for c in launch.calls] == list(expected)
    if T <= geo.DECODE_MAX_T:  # the router runs only for max_active; the up kernel then reads the gates
        assert (expected[0] == "deco_decode_router") == (knobs["max_active"] is not None)
        up_args = next(c[3] for c in launch.calls if c[0] == "deco_decode_up")
        gates_given = sigs["deco_decode_up"].index("int")  # the first int parameter
        assert int(up_args[gates_given]) == int(knobs["max_active"] is not None)
    elif knobs["max_active"] is not None:  # an arrival counter per token block, left at zero by the kernel
        counters = ffn_without_gpu._zeroed(torch.device("meta"), torch.int32, 1)
        assert counters.numel() >= geo.prefill_grids(T, n, d, BF16, de)["router_counters"]
    for name, grid, threads, args, spec, smem in launch.calls:
        params = sigs[name]
        assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
        for i, (arg, ctype) in enumerate(zip(args, params)):
            want = "uint64" if ctype.endswith("*") else C_TO_NUMPY[ctype]
            assert type(arg).__name__ == want, f"{name} argument {i} ({ctype}): got {type(arg).__name__}"
        assert len(grid) in (1, 2, 3) and all(isinstance(v, int) and v >= 1 for v in grid) and threads % 32 == 0
        # dynamic shared memory: prefill_up's pipeline and prefill_down's tiles
        plan = geo.prefill_grids(T, n, d, BF16, de)
        assert smem == {"deco_prefill_up": plan["up_smem"], "deco_prefill_down": plan["down_smem"]}.get(name, 0), name
        if T <= geo.DECODE_MAX_T:
            assert spec == dict(decode_tt=geo.tokens_per_pass(T))
        else:
            assert spec == dict(prefill_warps=geo.prefill_warps(T, BF16, de))


# ---------------------------------------------------------------------------------------------------------
# nvcc: every kernel compiles for Jetson Orin (sm_87) and the H100 (sm_90), each dtype (a syntax check for CI)
# ---------------------------------------------------------------------------------------------------------
NVCC_CASES = [  # (arch, x, router, scale, gamma, de, decode_tt, prefill_warps)
    *[(arch, dt, dt, dt, dt, 64, 8, 4) for arch in ("sm_87", "sm_90") for dt in geo.X_DTYPES],
    ("sm_87", BF16, FP32, torch.float64, FP32, 16, 1, 1),   # mixed storage types, the narrowest experts
    ("sm_90", FP32, FP16, BF16, FP16, 128, 2, 2),           # fp32 with the widest experts
    ("sm_90", BF16, BF16, BF16, BF16, 64, 1, 8),            # eight warps (LONG_PREFILL_WARPS = 8)
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_nvcc_compiles_every_kernel(tmp_path):
    src = tmp_path / "deco.cu"
    src.write_text(geo.source())

    def compile_one(case):
        arch, x, router, scale, gamma, de, tt, warps = case
        opts = geo.compile_options(x, router, scale, gamma, de, decode_tt=tt, prefill_warps=warps)
        out = tmp_path / f"{arch}-{len(str(case))}-{hash(case) & 0xffff}.cubin"
        # -O0: this checks syntax, types, PTX and the static_asserts, not the optimiser (fast on CI).
        cmd = ["nvcc", *opts, f"-arch={arch}", "-cubin", "-Xcicc", "-O0", "-Xptxas", "-O0,-v", "-o", str(out),
               str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return case, proc, out

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(compile_one, NVCC_CASES))
    for case, proc, out in results:
        assert proc.returncode == 0, f"{case}:\n{proc.stderr[-3000:]}"
        binary = out.read_bytes()
        assert binary[:4] == b"\x7fELF"
        for name in (*geo.DECODE_KERNELS, *geo.PREFILL_KERNELS):
            assert name.encode() in binary, f"{case}: kernel {name} missing from the cubin"
        # The host-side plan's shared-memory sizes are the compiled kernels' (plus their per-row arrays).
        smem = ptxas_smem(proc.stderr)
        _, x, router, _, _, de, _, warps = case
        tile = geo.expert_tile(x, de, warps)
        assert smem["deco_prefill_up"] == 16 * tile["bm"], case  # static part; the pipeline is dynamic
        assert smem["deco_prefill_down"] == 4 * tile["bm"], case  # static part; the tiles are dynamic
        assert smem["deco_prefill_router"] == geo.router_tile(x, router)["smem"] + 8 * geo.ROUTER_TOKENS, case


SPILL_CASES = [  # (arch, x dtype, decode_tt, de, prefill_warps): decode's T=1 and T=8 extremes, the long-prefill
    # tiles (1.2b's bf16 de=64 among them) and a one-warp one, optimised as NVRTC does
    ("sm_90", BF16, 1, 64, 4), ("sm_90", FP16, 2, 128, 4), ("sm_87", FP32, 8, 16, 1), ("sm_87", BF16, 4, 32, 4),
    ("sm_90", BF16, 1, 64, 8),
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernels_do_not_spill(tmp_path):
    src = tmp_path / "deco.cu"
    src.write_text(geo.source())

    def compile_one(case):
        arch, x, tt, de, warps = case
        opts = geo.compile_options(x, x, x, x, de, decode_tt=tt, prefill_warps=warps)
        cmd = ["nvcc", *opts, f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / f"{hash(case)}.cubin"),
               str(src)]
        return case, subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(compile_one, SPILL_CASES))
    kernels = (*geo.DECODE_KERNELS, *geo.PREFILL_KERNELS)
    for case, proc in results:
        assert proc.returncode == 0, f"{case}:\n{proc.stderr[-3000:]}"
        frames = ptxas_stack(proc.stderr)
        assert set(kernels) <= set(frames)
        assert all(frames[name] == (0, 0, 0) for name in kernels), (case, frames)


def ptxas_per_kernel(log: str, pattern: str) -> dict:
    """{kernel: the integers ``pattern`` captures} from the lines ptxas -v prints for each kernel."""
    found, name = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(pattern, line)
        if m and name:
            found[name] = tuple(int(v) for v in m.groups())
    return found


def ptxas_stack(log: str) -> dict:
    """{kernel: (stack frame, spill store, spill load bytes)}."""
    return ptxas_per_kernel(log, r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_smem(log: str) -> dict:
    """{kernel: static shared memory bytes}."""
    return {k: v[0] for k, v in ptxas_per_kernel(log, r"(\d+) bytes smem").items()}


# ---------------------------------------------------------------------------------------------------------
# GPU (and cupy): correctness against the float64 reference
# ---------------------------------------------------------------------------------------------------------
needs_cupy = pytest.mark.skipif(not HAS_CUPY, reason="cupy is not installed")


@pytest.fixture
def poison(monkeypatch):
    """Fill every kernel-written buffer with NaN (floats) or -1 (indices) before the kernels run."""
    ffn = importlib.import_module("deco_kernels.cupy.ffn")
    poison_outputs(monkeypatch, ffn)
    return ffn


def run_both(x, w, **knobs):
    return backend_and_reference(x, w, "cupy", **knobs)


def check(x, w, tol=None, **knobs):
    """y within tol of the float64 reference, the same active set as the fp32 reference router on the same GPU
    inputs, and gates close to the reference's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    y, g, y_ref, g_ref = run_both(x, w, **knobs)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert g.dtype == torch.float32 and g.shape == (*x.shape[:-1], w["w_router"].shape[0])
    with torch.no_grad():
        _, g32 = reference.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()}, return_gates=True,
                                    **knobs)
    assert torch.equal(g > 0, g32 > 0), "active sets differ from the fp32 reference router"
    assert_rel_close(g.cpu(), g_ref.float(), 1e-5 if x.dtype == FP32 else 1e-4, "gates")
    assert_rel_close(y, y_ref.to(y.dtype), tol or TOL[x.dtype], "y")
    return g_ref


DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(FP16, id="fp16"), pytest.param(FP32, id="fp32")]
TOKENS = [0, 1, 3, 17, 65, 300]     # empty, decode, decode with several tokens, prefill small and larger


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("de", [16, 32, 64])
def test_token_counts_and_expert_widths(poison, dtype, T, de):
    # N = 13 is a multiple of no block size; d = 40 and ds = 24 leave tails in every loop.
    x, w = make_layer(T, 40, 13, de, 24, dtype=dtype, device="cuda", seed=T * 100 + de, active=0.3)
    check(x, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")])
@pytest.mark.parametrize("T", [1, 17, 300])
@pytest.mark.parametrize("active", ["none", "all", "one"])
def test_active_patterns(poison, dtype, T, active):
    x, w = make_layer(T, 48, 11, 16, 32, dtype=dtype, device="cuda", seed=7, active=active)
    g_ref = check(x, w)
    per_token = (g_ref > 0).sum(-1)
    assert bool((per_token == {"none": 0, "all": 11, "one": 1}[active]).all())


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")])
@pytest.mark.parametrize("T", [1, 5, 65])
@pytest.mark.parametrize("knobs", [
    dict(bias=0.3), dict(bias=-0.4), dict(threshold=0.5), dict(max_active=1), dict(max_active=3),
    dict(bias=0.2, threshold=0.2, max_active=2), "bias-vector",
], ids=["bias+", "bias-", "threshold", "max1", "max3", "all-knobs", "bias-vector"])
def test_knobs(poison, dtype, T, knobs):
    x, w = make_layer(T, 40, 13, 16, 24, dtype=dtype, device="cuda", seed=3, active=0.4)
    if knobs == "bias-vector":
        knobs = dict(bias=torch.linspace(-0.5, 0.5, 13, device="cuda"))
    check(x, w, **knobs)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("T", [4, 20])
def test_max_active_ties_go_to_lower_index(poison, T):
    x, w = make_layer(T, 32, 9, 16, 16, device="cuda", seed=11, active="all")
    w["w_router"][:] = w["w_router"][0]
    g_ref = check(x, w, max_active=4)
    assert bool(((g_ref > 0).sum(-1) == 4).all()) and bool((g_ref[:, :4] > 0).all())


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("T", [3, 65])
def test_non_contiguous_and_batched_x(poison, T):
    x, w = make_layer((2, T), 40, 13, 16, 24, dtype=BF16, device="cuda", seed=5, active=0.3)
    x_strided = torch.cat([x, x], dim=-1)[..., ::2]          # last-dim stride 2
    assert not x_strided.is_contiguous()
    check(x_strided, w)
    check(x.transpose(0, 1), w)                              # leading dims permuted
    x_offset = torch.cat([x, x], dim=-1)[..., 1:41]          # rows start 2 bytes off 16: element loads
    assert x_offset.data_ptr() % 16 != 0
    check(x_offset, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("T", [2, 65])
def test_router_scale_and_gamma_in_other_dtypes(poison, T):
    # An fp32 router next to bf16 experts (logits in fp32 FMAs), float64 scale, bf16 gamma.
    x, w = make_layer(T, 64, 13, 32, 32, dtype=BF16, device="cuda", seed=6, active=0.3)
    w["w_router"] = w["w_router"].float()
    w["router_scale"] = w["router_scale"].double()
    check(x, w)
    w["w_router"] = w["w_router"].double()                   # a float64 router is read as fp32
    check(x, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 300])
def test_odd_d_uses_element_loads(poison, dtype, T):
    x, w = make_layer(T, 33, 7, 16, 16, dtype=dtype, device="cuda", seed=12, active=0.4)
    check(x, w)


@pytest.mark.gpu
@needs_cupy
def test_ldmatrix_switch_gives_the_same_result(poison):
    from deco_kernels.cupy.ffn import deco_ffn as cupy_ffn
    x, w = make_layer(300, 96, 13, 64, 32, dtype=BF16, device="cuda", seed=13, active=0.3)
    with torch.no_grad():
        ref = cupy_ffn(x, **w)
        alt = cupy_ffn(x, **w, ldmatrix=False)
    torch.testing.assert_close(alt, ref, rtol=2**-7, atol=1e-3)


@pytest.mark.gpu
@needs_cupy
def test_autograd_is_refused():
    x, w = make_layer(2, 32, 5, 16, 16, dtype=BF16, device="cuda", requires_grad=True)
    with pytest.raises(NotImplementedError, match="inference only"):
        ops.deco_ffn(x, **w, backend="cupy")
    from deco_kernels.cupy.ffn import deco_ffn as cupy_ffn
    with pytest.raises(NotImplementedError, match="inference only"):
        cupy_ffn(x, **w)


@pytest.mark.gpu
@needs_cupy
def test_rejects_unsupported_dtype_and_width():
    x, w = make_layer(2, 32, 5, 48, 16, dtype=BF16, device="cuda")
    with torch.no_grad(), pytest.raises(ValueError, match="gamma"):
        ops.deco_ffn(x, **w, backend="cupy")
    x, w = make_layer(2, 32, 5, 16, 16, dtype=torch.float64, device="cuda")
    with torch.no_grad(), pytest.raises(ValueError, match="x"):
        ops.deco_ffn(x, **w, backend="cupy")


PRESET_LAYERS = {"0.1b": (768, 42, 64, 128), "1.2b": (1792, 102, 64, 128)}


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("preset", sorted(PRESET_LAYERS))
@pytest.mark.parametrize("T", [1, 8, 64, 512])
@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(FP32, id="fp32")])
def test_presets(poison, preset, T, dtype):
    d, n, de, ds = PRESET_LAYERS[preset]
    x, w = make_layer(T, d, n, de, ds, dtype=dtype, device="cuda", seed=T, active=0.2)
    check(x, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("dtype, d, de", [
    (BF16, 768, 64),     # four-warp tiles, three w_down stages, d split over two feature blocks
    (FP16, 1000, 128),   # one m-tile per warp; the last feature block ends inside a 64-feature chunk
    (FP32, 256, 128),    # fp32 falls back to two-warp tiles; FMAs instead of tensor cores
    (BF16, 77, 32),      # odd d: element loads and scalar atomics with four-warp tiles
], ids=["bf16-768-64", "fp16-1000-128", "fp32-256-128", "bf16-77-32"])
def test_long_prefill_tiles(poison, dtype, d, de):
    # T >= 1024 takes the largest tiles (geometry.prefill_warps); 1100 tokens leave partial tiles everywhere
    T = 1100
    assert geo.prefill_warps(T, dtype, de) == (2 if dtype == FP32 and de == 128 else 4)
    x, w = make_layer(T, d, 23, de, 32, dtype=dtype, device="cuda", seed=5, active=0.3)
    check(x, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("m_tiles", [1, 2])
@pytest.mark.parametrize("stages", [2, 3])
def test_long_prefill_tile_constants(poison, monkeypatch, m_tiles, stages):
    # what benchmarks/sweep_cupy_prefill.py varies: eight warps of one m-tile, and four of m_tiles; up stages
    T, d, de = 1100, 768, 64
    monkeypatch.setitem(geo.M_TILES, de, m_tiles)
    monkeypatch.setattr(geo, "LONG_PREFILL_WARPS", 8 if m_tiles == 1 else 4)
    monkeypatch.setattr(geo, "UP_STAGES", stages)
    tile = geo.expert_tile(BF16, de, geo.prefill_warps(T, BF16, de))
    assert (tile["warps"], tile["mt"], tile["stages"]) == (8 if m_tiles == 1 else 4, m_tiles, stages)
    x, w = make_layer(T, d, 23, de, 32, dtype=BF16, device="cuda", seed=6, active=0.3)
    check(x, w)


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("T", [1, 8])
def test_cuda_graph_capture_and_replay(T):
    x, w = make_layer(T, 768, 42, 64, 128, dtype=BF16, device="cuda", seed=1, active=0.2)
    static_x = x.clone()
    with torch.no_grad():
        for _ in range(2):  # warm up: compile and load the module outside the capture
            ops.deco_ffn(static_x, **w, backend="cupy")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = ops.deco_ffn(static_x, **w, backend="cupy")
        for seed in (10, 11, 12):
            fresh, _ = make_layer(T, 768, 42, 64, 128, dtype=BF16, device="cuda", seed=seed, active=0.2)
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            eager = ops.deco_ffn(fresh, **w, backend="cupy")
            # the decode kernels sum every output in a fixed order: bit-identical
            assert torch.equal(static_y, eager)
            _, _, y_ref, _ = run_both(fresh, w)
            assert_rel_close(static_y, y_ref.to(BF16), 1e-2, "replayed y")


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("n", [32, 77, 102])
@pytest.mark.parametrize("knobs", [dict(), dict(max_active=5), dict(bias=0.1, threshold=0.05, max_active=1)],
                         ids=["plain", "max5", "all-knobs"])
def test_prefill_router_expert_chunks(poison, n, knobs):
    # 300 tokens: five token blocks of the router, the last partial; 77 and 102 experts end in a partial chunk,
    # 32 in a whole one. With max_active the last chunk block of each token block finishes it (arrival counters).
    x, w = make_layer(300, 64, n, 16, 16, dtype=BF16, device="cuda", seed=n, active=0.3)
    check(x, w, **knobs)
    check(x, w, **knobs)  # the counters were left at zero for the next call


@pytest.mark.gpu
@needs_cupy
def test_prefill_graph_replay_with_max_active():
    # The prefill router's arrival counters must be back at zero after every replay.
    T, knobs = 300, dict(max_active=4)
    x, w = make_layer(T, 256, 77, 64, 32, dtype=BF16, device="cuda", seed=2, active=0.3)
    static_x = x.clone()
    with torch.no_grad():
        for _ in range(2):
            ops.deco_ffn(static_x, **w, backend="cupy", **knobs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y, static_g = ops.deco_ffn(static_x, **w, backend="cupy", return_gates=True, **knobs)
        for seed in (20, 21, 22):
            fresh, _ = make_layer(T, 256, 77, 64, 32, dtype=BF16, device="cuda", seed=seed, active=0.3)
            static_x.copy_(fresh)
            graph.replay()
            torch.cuda.synchronize()
            y, g = ops.deco_ffn(fresh, **w, backend="cupy", return_gates=True, **knobs)
            assert torch.equal(static_g, g)  # the router sums in a fixed order
            assert_rel_close(static_y, y, 1e-2, "replayed y")


@pytest.mark.gpu
@needs_cupy
@pytest.mark.parametrize("T", [4, 65])
def test_int64_offsets(T):
    x, w = far_apart_rows(T)
    y, _, y_ref, _ = run_both(x, w)
    assert_rel_close(y, y_ref.to(y.dtype), 1e-2, "y")


@pytest.mark.gpu
@needs_cupy
def test_prefill_atomics_are_stable():
    x, w = make_layer(2048, 768, 42, 64, 128, dtype=FP32, device="cuda", seed=9, active=0.2)
    with torch.no_grad():
        ys = [ops.deco_ffn(x, **w, backend="cupy") for _ in range(5)]
    spread = max((y - ys[0]).abs().max().item() for y in ys)
    assert spread <= 1e-5 * ys[0].abs().max().item()


@pytest.mark.gpu
@needs_cupy
def test_prefill_refuses_deterministic_mode(monkeypatch):
    # Its fp32 atomics vary between runs: under torch.use_deterministic_algorithms(True) it raises, as torch's
    # own nondeterministic ops do; decode (no atomics) still runs.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: False)
    x, w = make_layer(65, 64, 7, 16, 16, dtype=BF16, device="cuda", seed=4, active=0.5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="backend 'cupy' at 65 tokens"):
        ops.deco_ffn(x, **w, backend="cupy")
    with torch.no_grad():
        ops.deco_ffn(x[:2], **w, backend="cupy")


@pytest.mark.gpu
@needs_cupy
def test_wbar_cache_is_reused():
    x, w = make_layer(3, 32, 7, 16, 16, dtype=BF16, device="cuda", seed=4, active=0.5)
    check(x, w)
    wbar = layout.expert_mean(w["w_up"])
    with torch.no_grad():
        ops.deco_ffn(x, **w, backend="cupy")
    assert layout.expert_mean(w["w_up"]) is wbar


@pytest.mark.gpu
@needs_cupy
def test_nvrtc_compiles_for_jetson_orin():
    """NVRTC (the compiler cupy uses at run time, also on Jetson) builds every kernel for sm_87 without running
    them: a cubin per module, with every kernel in it. cupy's RawModule compiles for the present GPU only, so
    this calls cupy's NVRTC with the architecture given."""
    from cupy.cuda import compiler
    for x_dtype in geo.X_DTYPES:
        for spec in (dict(decode_tt=8), dict(prefill_warps=4)):
            opts = geo.compile_options(x_dtype, x_dtype, x_dtype, x_dtype, 64, **spec)
            binary, _ = compiler.compile_using_nvrtc(geo.source(), options=opts, arch="87")
            assert bytes(binary[:4]) == b"\x7fELF", "expected a cubin for sm_87"
            names = geo.DECODE_KERNELS if "decode_tt" in spec else geo.PREFILL_KERNELS
            for name in names:
                assert name.encode() in bytes(binary), f"{name} missing from the sm_87 cubin"


@pytest.mark.gpu
@needs_cupy
def test_auto_takes_cupy_only_without_triton():
    from deco_kernels import backends
    expected = "triton" if importlib.util.find_spec("triton") else "cupy"
    assert backends.resolve("auto", torch.device("cuda")) == expected
    assert HAS_CUDA
