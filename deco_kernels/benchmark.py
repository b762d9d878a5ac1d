"""Benchmarks on the present GPU (``deco-kernels bench``): one DECO layer against its dense twin, the whole model
against the dense-twin model, and batch-1 decode latency against the active ratio.

Three parts, each writing its figures and their floors into one JSON (plots: ``deco_kernels.benchplot``):

- ``layer``: every backend and the torch reference vs the dense twin (SwiGLU of width d_ff through cuBLAS) at
  T in TOKENS, bf16, ~20% of the experts active (the tests' weight factory, ``deco_kernels.testing``).
- ``model``: DecoForCausalLM vs DecoForCausalLM(dense_twin=True) at MODEL_PRESETS, routers calibrated to ~20%
  active: batch-1 decode tokens/s (the whole decode step captured in a CUDA graph), prefill tokens/s, training
  step tokens/s (forward + backward + AdamW), peak memory, and the whole-model floor ratio.
- ``ratio``: decode latency of the 1.2b layer at T=1 and T=8 (CUDA graphs) as the router bias moves the active
  ratio from ~5% to ~60%, against the dense twin's constant time.

Floors: at small T the bytes that must be read over the measured copy bandwidth, at large T the FLOPs over the
measured bf16 matmul rate. Times come from ``triton.testing.do_bench`` (which flushes L2 between repetitions;
GpuTimer: the median under CUDA graphs, the least of five medians eagerly); T <= GRAPH_MAX_T runs under CUDA
graphs; larger T runs eagerly (``us``, what a caller without graphs sees, host launch cost included) and again
under a CUDA graph (``graph_us``, the kernels' own time; the torch reference, which synchronises with the
host, only eagerly). The training figures, which cannot be captured (one host synchronisation per layer
forward), also carry their GPU-busy time (``gpu_us``, ``train_step_gpu_us``: the kernels' time from
torch.profiler, without the host's share). Every case that fails is recorded with its error text and the run
goes on. The floor arithmetic and the case selection are plain functions, tested on the CPU.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

from . import backends, ops
from .config import DecoConfig
from .elastic import calibrate
from .modules import DecoForCausalLM
from .reference import ops as ref
from .testing import GPU_REL_TOL, make_dense_twin, make_layer, rel_err

PARTS = ("layer", "model", "ratio", "train")
PRESETS = ("0.1b", "0.2b", "0.5b", "1.2b")
QUICK_PRESETS = ("0.1b", "1.2b")
TOKENS = (1, 8, 64, 512, 4096)
GRAPH_MAX_T = 8                   # token counts up to this run under CUDA graphs (decode and small batches)
TARGET_RATIO = 0.2                # the paper's active ratio
MODEL_PRESETS = ("0.1b", "0.5b")
RATIO_PRESET, RATIO_TOKENS = "1.2b", (1, 8)
RATIO_TARGETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)
QUICK_RATIO_TARGETS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6)
QUICK_ENV = "DECO_BENCH_QUICK"     # "1": the quick mode of `deco-kernels bench` and of benchmarks/test_bench_ops.py
RESULT_FILE = "bench.json"
KERNEL_BACKENDS = ("triton", "cupy")


# ---------------------------------------------------------------------------------------------------------
# Case selection
# ---------------------------------------------------------------------------------------------------------
def quick_from_env() -> bool:
    """True when DECO_BENCH_QUICK is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def layer_presets(quick: bool) -> tuple[str, ...]:
    """The presets of the layer benchmarks: all four, or 0.1b and 1.2b (the smallest and largest) when quick."""
    return QUICK_PRESETS if quick else PRESETS


def ratio_targets(quick: bool) -> tuple[float, ...]:
    return QUICK_RATIO_TARGETS if quick else RATIO_TARGETS


def uses_graph(T: int) -> bool:
    """Whether a call on T tokens is timed under a CUDA graph (decode and small batches, where launch overhead
    is what a deployment removes with graphs)."""
    return T <= GRAPH_MAX_T


def parse_parts(text: str) -> list[str]:
    """"layer,model" -> ["layer", "model"] in PARTS order; "all" -> every part; unknown names raise ValueError."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return list(PARTS)
    bad = [p for p in names if p not in PARTS]
    if bad or not names:
        raise ValueError(f"parts: expected a comma-separated subset of {PARTS} (or 'all'), got {text!r}")
    return [p for p in PARTS if p in names]


# The ops of the pytest-benchmark microbenchmarks (benchmarks/test_bench_ops.py): the dense twin, the router,
# NormSiLU, the routed MLP (all experts, the dense formula), the scaled combine and the whole layer.
MICRO_OPS = ("dense_twin", "route", "norm_silu", "routed_experts", "scaled_combine", "deco_ffn")


def micro_cases(quick: bool, kernel_ops: dict[str, set[str]] | None = None) -> list[tuple[str, int, str, str]]:
    """(preset, T, op, backend) of every microbenchmark: each op of MICRO_OPS on "torch" (the reference),
    and each op a kernel backend implements (``kernel_ops``: {backend: op names}) on that backend, at
    layer_presets(quick) and every T in TOKENS."""
    ops_backends = [(op, "torch") for op in MICRO_OPS]
    for backend, names in (kernel_ops or {}).items():
        ops_backends += [(op, backend) for op in MICRO_OPS if op in names and op != "dense_twin"]
    return [(preset, T, op, backend) for preset in layer_presets(quick) for T in TOKENS
            for op, backend in ops_backends]


def device_slug(gpu_name: str) -> str:
    """A folder name for a GPU: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA GeForce RTX 4090" -> "rtx-4090",
    "Orin (nvgpu)" -> "orin"."""
    words = [w for w in re.sub(r"[^a-z0-9]+", " ", gpu_name.lower()).split()
             if w not in ("nvidia", "geforce", "tesla", "nvgpu")]
    for w in words:
        if re.fullmatch(r"[a-z]{1,2}\d{2,4}[a-z]?", w):  # h100, a100, l40s, b200, gh200
            return w
    keep = [w for w in words if not re.fullmatch(r"\d+gb|hbm\d*e?|sxm\d*|pcie|nvl", w)]
    return "-".join(keep) or "gpu"


# ---------------------------------------------------------------------------------------------------------
# Floors (plain arithmetic)
# ---------------------------------------------------------------------------------------------------------
def layer_floor(cfg: DecoConfig, T: int, pairs: int, union: int, esize: int, bw: float, flops: float) -> dict:
    """Floors of one DECO layer and of its dense twin on T tokens with ``pairs`` active (token, expert) pairs
    and ``union`` distinct active experts, weights of ``esize`` bytes, at ``bw`` bytes/s and ``flops`` FLOP/s.

    Bytes: the union's expert weights (up rows and down columns) + the shared expert + the router; FLOPs: the
    active pairs' two matmuls + the shared expert + the router. The dense twin reads 3 d d_ff weights and does
    2 T 3 d d_ff FLOPs. Each floor is the larger of its byte time and its FLOP time."""
    d, n, de, ds = cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim
    floor_bytes = (union * 2 * de * d + 3 * ds * d + n * d) * esize
    floor_flops = 2 * pairs * 2 * de * d + 2 * T * 3 * ds * d + 2 * T * n * d
    dense_bytes = 3 * cfg.d_ff * d * esize
    dense_flops = 2 * T * 3 * cfg.d_ff * d
    return dict(floor_bytes=floor_bytes, floor_flops=floor_flops, dense_bytes=dense_bytes, dense_flops=dense_flops,
                floor_us=max(floor_bytes / bw, floor_flops / flops) * 1e6,
                dense_floor_us=max(dense_bytes / bw, dense_flops / flops) * 1e6)


def decode_weight_params(cfg: DecoConfig, active_ratio: float | None) -> dict[str, float]:
    """Parameters read from memory to decode one token at batch 1, by part: the token's embedding row,
    attention (q, k, v, o) and both RMSNorms of every layer, the FFNs, the final norm and the LM head.
    ``active_ratio`` None is the dense twin (SwiGLU of width d_ff in every layer); a number is the DECO model
    (layer 0 dense; in layers 1..L-1 the router, router_scale, gamma, the shared expert and ``active_ratio``
    * N experts' up rows and down columns). Attention, the embedding row and the LM head do not shrink."""
    d, L, inner = cfg.d_model, cfg.num_layers, cfg.num_heads * cfg.head_dim
    dense_ffn = 3 * d * cfg.d_ff
    if active_ratio is None:
        ffn = L * dense_ffn
    else:
        n, de, ds = cfg.num_experts, cfg.expert_dim, cfg.shared_dim
        deco = n * d + n + de + 3 * ds * d + active_ratio * n * 2 * de * d
        ffn = dense_ffn + (L - 1) * deco
    parts = dict(embedding_row=d, attention=L * 4 * d * inner, norms=L * 2 * d + d, ffn=ffn,
                 lm_head=cfg.vocab_size * d)
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes(cfg: DecoConfig, context: int, esize: int) -> int:
    """Bytes of the KV cache one decode step reads at ``context`` cached tokens (k and v of every layer)."""
    return 2 * cfg.num_layers * context * cfg.num_heads * cfg.head_dim * esize


def model_floor(cfg: DecoConfig, active_ratio: float, context: int, esize: int, bw: float) -> dict:
    """Whole-model decode floors: weights read per token (DECO at ``active_ratio`` vs the dense twin), their
    ratio (the most a batch-1 decode can gain from DECO), the same with the KV cache of ``context`` tokens
    added, and each model's floor in µs at ``bw`` bytes/s."""
    deco = decode_weight_params(cfg, active_ratio)["total"] * esize
    dense = decode_weight_params(cfg, None)["total"] * esize
    kv = kv_cache_bytes(cfg, context, esize)
    return dict(deco_weight_bytes=deco, dense_weight_bytes=dense, kv_bytes=kv, floor_ratio=dense / deco,
                floor_ratio_with_kv=(dense + kv) / (deco + kv), deco_floor_us=(deco + kv) / bw * 1e6,
                dense_floor_us=(dense + kv) / bw * 1e6)


def bias_for_ratio(r: torch.Tensor, ratio: float) -> float:
    """A router bias with which round(ratio * r.numel()) of the logits r + bias are > 0 (at least one), set
    half-way between two neighbouring logits so a kernel's rounding of r cannot flip a gate at the edge."""
    v = r.detach().double().flatten().sort().values
    k = min(v.numel(), max(1, round(ratio * v.numel())))  # gates to keep on
    if k == v.numel():
        return float(1.0 - v[0])
    return float(-(v[-k - 1] + v[-k]) / 2)


# ---------------------------------------------------------------------------------------------------------
# Timing and the device
# ---------------------------------------------------------------------------------------------------------
def cuda_graph(fn):
    """(graph, output): ``fn`` warmed up on a side stream (lazy init, Triton compilation, caches) and then
    captured; replaying the graph reruns fn's kernels on the same buffers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


class GpuTimer:
    """µs of a call: ``timer(fn, graph)``. Under a CUDA graph (``graph``) the median of do_bench over
    ``rep_ms``. Eagerly, the least of ``eager_repeats`` such medians over ``rep_ms / eager_repeats`` each: an
    eager call's time includes the host's launch work, and other load on the host only ever adds to it, so
    the minimum is the figure that repeats (timeit's rule; one median moved by up to 2x between runs)."""

    def __init__(self, rep_ms: int = 200, warmup_ms: int = 25, eager_repeats: int = 5):
        self.rep_ms, self.warmup_ms, self.eager_repeats = rep_ms, warmup_ms, eager_repeats

    def describe(self) -> str:
        return (f"CUDA graphs: median of do_bench over {self.rep_ms} ms; eager: least of {self.eager_repeats} "
                f"medians over {self.rep_ms / self.eager_repeats:g} ms each")

    def __call__(self, fn, graph: bool) -> float:
        from triton.testing import do_bench
        if graph:
            g, _ = cuda_graph(fn)
            return do_bench(g.replay, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median") * 1e3
        fn()  # compile and warm before do_bench's own estimate
        torch.cuda.synchronize()
        rep = max(1, round(self.rep_ms / self.eager_repeats))
        return min(do_bench(fn, warmup=self.warmup_ms, rep=rep, return_mode="median")
                   for _ in range(self.eager_repeats)) * 1e3


def device_kernels(events, reps: int) -> list[tuple[str, float]]:
    """(name, µs per call) of the device-side events (kernels, memcpy, memset) of a torch.profiler
    ``key_averages()`` over ``reps`` calls, longest first. Only events on the GPU count: a host operator's
    self device time repeats the time of the kernels it launched, so summing every event counts them twice."""
    from torch.autograd import DeviceType
    rows = [(e.key, e.self_device_time_total / reps) for e in events
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    return sorted(rows, key=lambda kv: -kv[1])


def kernel_times(fn, reps: int = 5) -> dict[str, float]:
    """{kernel name: µs per call} of fn's GPU work (torch.profiler over ``reps`` calls after a warm-up call),
    longest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return dict(device_kernels(prof.key_averages(), reps))


def step_peak_bytes(fn, device="cuda") -> int:
    """Peak GPU memory of one call of fn above what was allocated before it (weights, inputs, earlier grads)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def device_busy_us(fn, reps: int = 5) -> float:
    """µs per call that the GPU spends executing fn's kernels (the sum of kernel_times): the eager time without
    the host's share, so host load does not move it. It is what the call would take if the host always kept
    ahead of the GPU (a lower bound on the eager time, and on a CUDA graph's for one stream): the
    host-independent figure of eager calls (the eager training step synchronises once per layer)."""
    return sum(kernel_times(fn, reps).values())


def write_result(path, **content) -> None:
    """A script's results as JSON at ``path``, stamped with environment() (GPU, versions, date, source)."""
    with open(path, "w") as f:
        json.dump(dict(environment=environment(), **content), f, indent=1)


def device_ceilings() -> tuple[float, float]:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    from triton.testing import do_bench
    n = 1 << 28  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, return_mode="median")
    return bw, 2 * m**3 / (ms * 1e-3)


def launch_floor_us(kernels: int, timer) -> float:
    """µs of a CUDA graph of ``kernels`` back-to-back empty Triton launches: the part of any layer's time that
    no kernel design removes (the fewest launches a DECO layer takes is two)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _empty_kernel(ptr):
        if tl.program_id(0) < 0:  # never true: the launch does nothing
            tl.store(ptr, 0)

    buf = torch.zeros(1, device="cuda")

    def run():
        for _ in range(kernels):
            _empty_kernel[(132,)](buf)
    return timer(run, True)


def source_digest(root=None) -> str:
    """sha256 over the library's Python sources (deco_kernels/, with reference/ and autotune/ inside the
    installed package or beside it in a checkout): relative path and bytes of every *.py, in path order. It names
    the code that produced a result even where no up-to-date git checkout exists (a device's copy of the tree);
    compare it with this function run on a checkout of the commit in question."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    installed = (root / "deco_kernels" / "reference").is_dir()  # a wheel: the three live inside the package
    folders = ("deco_kernels",) if installed else ("deco_kernels", "reference", "autotune")
    files = sorted(p for folder in folders if (root / folder).is_dir()
                   for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment() -> dict:
    """GPU name, compute capability, SMs, library versions, the sources' digest and the UTC date."""
    env = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(), source_sha256=source_digest())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_bytes=props.total_memory)
    for name in ("triton", "cupy"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (absent, or a broken CUDA install: the version is then unknown)
            pass
    return env


def kernel_backends(device) -> list[str]:
    """The kernel backends (beyond the torch reference) that can run on ``device`` here."""
    device = torch.device(device)
    return [b for b in KERNEL_BACKENDS if backends.available(b, device)
            and not (device.type == "cpu" and b == "triton")]  # the interpreter is for tests, not timing


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


# ---------------------------------------------------------------------------------------------------------
# Part 1: one layer
# ---------------------------------------------------------------------------------------------------------
def layer_inputs(cfg: DecoConfig, max_tokens: int, device, dtype=torch.bfloat16, seed: int = 0):
    """(x [max_tokens, d], DECO weights, dense-twin weights) from the tests' factory, ~TARGET_RATIO active;
    a case on T tokens takes x[:T], so every T of a preset sees the same weights."""
    x, w = make_layer(max_tokens, cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim, dtype=dtype,
                      device=device, seed=seed, active=TARGET_RATIO)
    return x, w, make_dense_twin(cfg.d_model, cfg.d_ff, dtype=dtype, device=device, seed=seed + 1)


def preset_inputs(presets, tokens, device="cuda"):
    """(preset, cfg, T, x, w, dense) for every preset and token count: one layer_inputs per preset, x[:T] per T
    (the probes' loop)."""
    for preset in presets:
        cfg = DecoConfig.preset(preset)
        x_all, w, dense = layer_inputs(cfg, max(tokens), device)
        for T in tokens:
            yield preset, cfg, T, x_all[:T], w, dense


def output_off(rel: float, dtype: torch.dtype) -> str | None:
    """The error text of an output whose rel_err against the reference is beyond testing.GPU_REL_TOL[dtype]
    (a figure timed on it is recorded as an error of its row), else None."""
    bound = GPU_REL_TOL[dtype]
    return f"output off the reference: rel_err {rel:.3g} > {bound:g}" if rel > bound else None


def layer_case(cfg: DecoConfig, preset: str, x, w, dense, timer, bw: float, flops: float, names: list[str],
               with_reference: bool = True, bias: float = 0.0, dense_us: float | None = None) -> dict:
    """One (preset, T) row: µs of the dense twin (measured here unless ``dense_us`` is given), the torch
    reference and each backend in ``names``, their speed-ups over the dense twin, fractions of the floor and
    errors against the reference (``rel_err``)."""
    T = x.shape[0]
    graph = uses_graph(T)
    with torch.no_grad():
        y_ref, g = ref.deco_ffn(x, **w, bias=bias, return_gates=True)
    active = g > 0
    pairs, union = int(active.sum()), int(active.any(0).sum())
    floors = layer_floor(cfg, T, pairs, union, x.element_size(), bw, flops)
    row = dict(preset=preset, T=T, active_ratio=pairs / max(1, T * cfg.num_experts), union_experts=union,
               num_experts=cfg.num_experts, bias=bias, floor_us=floors["floor_us"],
               dense_floor_us=floors["dense_floor_us"], floor_bytes=floors["floor_bytes"],
               floor_flops=floors["floor_flops"], graph=graph, us={}, rel_err={}, errors={})
    calls = {} if dense_us is not None else {"dense_twin": (lambda: ops.dense_swiglu(x, **dense), graph)}
    if with_reference:
        calls["torch"] = (lambda: ref.deco_ffn(x, **w, bias=bias), False)  # the authors' all-experts path, eager
    for name in names:
        calls[name] = ((lambda name=name: ops.deco_ffn(x, **w, bias=bias, backend=name)), graph)
    with torch.no_grad():
        for name, (fn, use_graph) in calls.items():
            try:
                if name not in ("dense_twin", "torch"):
                    row["rel_err"][name] = rel_err(fn(), y_ref)
                    off = output_off(row["rel_err"][name], x.dtype)
                    if off:
                        row["errors"][name] = off
                row["us"][name] = timer(fn, use_graph)
                if not graph and name != "torch":  # the kernels' own time, without the host's launch cost
                    row.setdefault("graph_us", {})[name] = timer(fn, True)
            except Exception as exc:  # noqa: BLE001  (recorded; the other cases still run)
                row["errors"][name] = _error(exc)
    dense_us = row["us"].get("dense_twin", dense_us)
    for name, us in row["us"].items():
        if dense_us:
            row.setdefault("speedup_vs_dense", {})[name] = dense_us / us
        floor = row["dense_floor_us"] if name == "dense_twin" else row["floor_us"]
        row.setdefault("fraction_of_floor", {})[name] = floor / us
    dense_graph = row.get("graph_us", {}).get("dense_twin")
    for name, us in row.get("graph_us", {}).items():
        if dense_graph:
            row.setdefault("graph_speedup_vs_dense", {})[name] = dense_graph / us
        floor = row["dense_floor_us"] if name == "dense_twin" else row["floor_us"]
        row.setdefault("graph_fraction_of_floor", {})[name] = floor / us
    if not row["errors"]:
        del row["errors"]
    return row


def run_layer(presets, tokens, timer, bw, flops, names, device="cuda", with_reference=True, log=print) -> list:
    rows = []
    for preset in presets:
        cfg = DecoConfig.preset(preset)
        try:
            x_all, w, dense = layer_inputs(cfg, max(tokens), device)
        except Exception as exc:  # noqa: BLE001
            rows += [dict(preset=preset, T=T, us={}, errors={"setup": _error(exc)}) for T in tokens]
            continue
        for T in tokens:
            try:
                rows.append(layer_case(cfg, preset, x_all[:T], w, dense, timer, bw, flops, names, with_reference))
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(preset=preset, T=T, us={}, errors={"case": _error(exc)}))
            log(json.dumps(rows[-1]))
        del x_all, w, dense
    return rows


# ---------------------------------------------------------------------------------------------------------
# Part 4: one layer's forward + backward (training)
# ---------------------------------------------------------------------------------------------------------
TRAIN_TOKENS = 4096


def train_inputs(cfg: DecoConfig, T: int, device="cuda", dtype=torch.bfloat16):
    """(x, DECO weights, dense-twin weights, dy) of one layer's training step on T tokens, ~TARGET_RATIO
    active: x and every weight are leaves that require grad, dy a fixed upstream gradient."""
    x, w = make_layer(T, cfg.d_model, cfg.num_experts, cfg.expert_dim, cfg.shared_dim, dtype=dtype,
                      device=device, seed=1, active=TARGET_RATIO, requires_grad=True)
    dense = {k: v.requires_grad_() for k, v in
             make_dense_twin(cfg.d_model, cfg.d_ff, dtype=dtype, device=device, seed=2).items()}
    return x, w, dense, torch.randn_like(x)


def train_case(cfg: DecoConfig, preset: str, T: int, timer, names: list[str], device="cuda",
               with_reference: bool = True, dtype=torch.bfloat16) -> dict:
    """µs and peak memory of forward + backward of one layer on T tokens (bf16, every weight and x requiring
    grad, one fixed upstream gradient) for the dense twin, the torch reference and each backend in ``names``
    that has a backward, measured side by side: eagerly (us), GPU-busy (gpu_us) and on a GPU also replayed
    from a CUDA graph (graph_us; not the torch reference, whose dense activations only cost memory there)."""
    x, w, dense, dy = train_inputs(cfg, T, device, dtype)
    calls = {"dense_twin": lambda: ops.dense_swiglu(x, **dense).backward(dy)}
    if with_reference:
        calls["torch"] = lambda: ops.deco_ffn(x, **w, backend="torch").backward(dy)
    for name in names:
        if name in backends.DIFFERENTIABLE:
            calls[name] = lambda name=name: ops.deco_ffn(x, **w, backend=name).backward(dy)
    row = dict(preset=preset, T=T, us={}, gpu_us={}, graph_us={}, peak_bytes={}, errors={})
    cuda = torch.device(device).type == "cuda"
    for name, fn in calls.items():
        try:
            fn()  # compile and warm up
            if cuda:  # the step's memory above what is allocated before it (weights, x, grads of the warm-up)
                row["peak_bytes"][name] = step_peak_bytes(fn, device)
            row["us"][name] = timer(fn, False)
            if cuda:
                row["gpu_us"][name] = device_busy_us(fn)
        except Exception as exc:  # noqa: BLE001  (recorded; the other cases still run)
            row["errors"][name] = _error(exc)
        if cuda and name != "torch":
            # Replayed from a CUDA graph (the gradients accumulate into the same buffers every replay). The
            # Triton training forward then sizes its pair buffers from shapes, without a host synchronisation.
            try:
                row["graph_us"][name] = timer(fn, True)
            except Exception as exc:  # noqa: BLE001
                row["errors"][f"{name}_graph"] = _error(exc)
    for times, speedup in (("us", "speedup_vs_dense"), ("gpu_us", "gpu_speedup_vs_dense"),
                           ("graph_us", "graph_speedup_vs_dense")):
        dense_us = row[times].get("dense_twin")
        row[speedup] = {k: dense_us / v for k, v in row[times].items()} if dense_us else {}
    if not row["errors"]:
        del row["errors"]
    return row


def run_train(presets, timer, names, tokens=TRAIN_TOKENS, device="cuda", with_reference=True, log=print) -> list:
    rows = []
    for preset in presets:
        try:
            rows.append(train_case(DecoConfig.preset(preset), preset, tokens, timer, names, device, with_reference))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(preset=preset, T=tokens, us={}, errors={"case": _error(exc)}))
        log(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Part 3: decode latency vs active ratio
# ---------------------------------------------------------------------------------------------------------
def run_ratio(timer, bw, flops, names, preset=RATIO_PRESET, tokens=RATIO_TOKENS, targets=RATIO_TARGETS,
              device="cuda", log=print) -> list:
    """For each T and target ratio: the router bias that activates that fraction of this batch's gates, and
    the µs of every backend in ``names`` with that bias (CUDA graphs), beside the dense twin's constant µs."""
    cfg = DecoConfig.preset(preset)
    x_all, w, dense = layer_inputs(cfg, max(tokens), device)
    rows = []
    for T in tokens:
        x = x_all[:T]
        graph = uses_graph(T)
        dense_us, dense_error = None, None
        try:
            with torch.no_grad():
                dense_us = timer(lambda: ops.dense_swiglu(x, **dense), graph)
        except Exception as exc:  # noqa: BLE001
            dense_error = _error(exc)
        r = ref.router_logits(x, w["w_router"])
        for target in targets:
            try:
                row = layer_case(cfg, preset, x, w, dense, timer, bw, flops, names, with_reference=False,
                                 bias=bias_for_ratio(r, target), dense_us=dense_us)
            except Exception as exc:  # noqa: BLE001
                row = dict(preset=preset, T=T, us={}, errors={"case": _error(exc)})
            row.update(target_ratio=target, dense_twin_us=dense_us)
            if dense_error:
                row.setdefault("errors", {})["dense_twin"] = dense_error
            rows.append(row)
            log(json.dumps(row))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Part 2: the whole model
# ---------------------------------------------------------------------------------------------------------
def _memory_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory_peak(device) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def bench_model(cfg: DecoConfig, dense_twin: bool, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """(model, ids): the benchmark's DecoForCausalLM (or its dense twin) from ``seed`` in ``dtype`` on
    ``device``, and ids(n), the next n random token ids [1, n] of a generator seeded the same way."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DecoForCausalLM(cfg, dense_twin=dense_twin)
    model.to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (1, n), generator=gen, device=device)

    return model, ids


def model_figures(cfg: DecoConfig, dense_twin: bool, timer, device="cuda", dtype=torch.bfloat16, *,
                  context: int = 128, prefill_tokens: int = 4096, train_tokens: int = 4096,
                  calib_tokens: int = 1024, target: float = TARGET_RATIO, graphs: bool = True,
                  seed: int = 0) -> dict:
    """Decode, prefill and training figures of one model (DECO, or its dense twin).

    Decode: the model's whole forward for one token after a KV cache of ``context`` tokens, captured as one
    CUDA graph (``graphs``); a replay re-decodes position ``context`` (the model's cache is concatenated, not
    preallocated, so the graph keeps the cache length fixed), and tokens/s = 1 / median replay time. Prefill:
    one forward of ``prefill_tokens`` tokens without a cache, also under a CUDA graph when ``graphs`` (its
    eager time, host launches included, is kept as prefill_eager_us). Training: zero_grad, forward with labels
    (CE plus the entropy regulariser), backward and an AdamW step on ``train_tokens`` tokens; DECO layers take
    backend "auto" (the Triton sparse training path on a GPU); eagerly (train_step_us) and, with ``graphs`` on
    a GPU, captured as one CUDA graph (train_graph_us). Each figure that fails is recorded with its error."""
    figures: dict = {"errors": {}}
    model, ids = bench_model(cfg, dense_twin, device, dtype, seed)
    if not dense_twin:
        try:
            report = calibrate(model, ids(calib_tokens), target, strict=False)
            ratios = [c.active_ratio for c in report.layers]
            figures["calibration"] = dict(target=target, reached=report.reached, tokens=calib_tokens,
                                          min_ratio=min(ratios), max_ratio=max(ratios),
                                          mean_ratio=sum(ratios) / len(ratios),
                                          bias=[c.value for c in report.layers])
        except Exception as exc:  # noqa: BLE001
            figures["errors"]["calibration"] = _error(exc)
    model.eval()
    with torch.no_grad():
        try:
            _memory_reset(device)
            past = model(ids(context), use_cache=True).past_key_values
            step_ids = ids(1)

            def step():
                return model(step_ids, past_key_values=past, use_cache=True)
            figures["decode_context"] = context
            figures["decode_eager_us"] = timer(step, False)
            method = "cuda_graph"
            if graphs:
                try:
                    figures["decode_us"] = timer(step, True)
                except Exception as exc:  # noqa: BLE001  (report the eager time, and why)
                    figures["errors"]["decode_graph"] = _error(exc)
                    method = "eager"
            else:
                method = "eager"
            if method == "eager":
                figures["decode_us"] = figures["decode_eager_us"]
            figures["decode_method"] = method
            figures["decode_tokens_per_s"] = 1e6 / figures["decode_us"]
            out = step()
            if out.active_ratio is not None:
                figures["decode_active_ratio"] = out.active_ratio.item()
            figures["decode_peak_bytes"] = _memory_peak(device)
        except Exception as exc:  # noqa: BLE001
            figures["errors"]["decode"] = _error(exc)
        try:
            _memory_reset(device)
            prompt = ids(prefill_tokens)
            figures["prefill_tokens"] = prefill_tokens
            figures["prefill_eager_us"] = timer(lambda: model(prompt), False)
            figures["prefill_method"] = "eager"
            figures["prefill_us"] = figures["prefill_eager_us"]
            if graphs:  # the prefill path has no host synchronisation: a graph times the kernels, not the host
                try:
                    figures["prefill_us"] = timer(lambda: model(prompt), True)
                    figures["prefill_method"] = "cuda_graph"
                except Exception as exc:  # noqa: BLE001  (keep the eager time, and say why)
                    figures["errors"]["prefill_graph"] = _error(exc)
            figures["prefill_tokens_per_s"] = prefill_tokens / (figures["prefill_us"] * 1e-6)
            figures["prefill_peak_bytes"] = _memory_peak(device)
        except Exception as exc:  # noqa: BLE001
            figures["errors"]["prefill"] = _error(exc)
    try:
        _memory_reset(device)
        model.train()
        # A small learning rate keeps the calibrated routers near 20% active over the timed steps.
        opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-6)
        batch = ids(train_tokens)
        last = {}

        def train_step():
            opt.zero_grad(set_to_none=True)
            out = model(batch, labels=batch)
            out.loss.backward()
            opt.step()
            last["ratio"] = out.active_ratio
        figures["train_tokens"] = train_tokens
        figures["train_step_us"] = timer(train_step, False)
        figures["train_tokens_per_s"] = train_tokens / (figures["train_step_us"] * 1e-6)
        figures["train_peak_bytes"] = _memory_peak(device)
        if last.get("ratio") is not None:
            figures["train_active_ratio"] = last["ratio"].item()
        if torch.device(device).type == "cuda":  # after the figures of the timed steps: it takes six more
            figures["train_step_gpu_us"] = device_busy_us(train_step)
    except Exception as exc:  # noqa: BLE001
        figures["errors"]["train"] = _error(exc)
    if graphs and torch.device(device).type == "cuda":
        # The same step captured into one CUDA graph (AdamW with capturable state): what a training loop that
        # replays its step pays, without the host's launches. DECO's training forward sizes its pair buffers
        # without a host synchronisation while a graph is being captured (triton/training.py).
        try:
            _memory_reset(device)
            graph_opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-6, capturable=True)

            def graph_step():
                graph_opt.zero_grad(set_to_none=True)
                model(batch, labels=batch).loss.backward()
                graph_opt.step()
            figures["train_graph_us"] = timer(graph_step, True)
            figures["train_graph_tokens_per_s"] = train_tokens / (figures["train_graph_us"] * 1e-6)
            figures["train_graph_peak_bytes"] = _memory_peak(device)
        except Exception as exc:  # noqa: BLE001
            figures["errors"]["train_graph"] = _error(exc)
    if not figures["errors"]:
        del figures["errors"]
    return figures


def model_row(preset: str, cfg: DecoConfig, timer, bw: float, device="cuda", **kw) -> dict:
    """DECO vs dense twin at one preset: both models' figures, the speed-ups, the whole-model decode floor
    ratio and the fraction of it achieved (measured decode speed-up / floor ratio)."""
    row = dict(preset=preset)
    for name, dense in (("deco", False), ("dense_twin", True)):
        try:
            row[name] = model_figures(cfg, dense, timer, device, **kw)
        except Exception as exc:  # noqa: BLE001
            row[name] = {"errors": {"model": _error(exc) + "\n" + traceback.format_exc(limit=3)}}
    deco, dense = row["deco"], row["dense_twin"]
    for figure in ("decode_us", "prefill_us", "train_step_us", "train_step_gpu_us", "train_graph_us"):
        if figure in deco and figure in dense:
            row[figure.replace("_us", "_speedup")] = dense[figure] / deco[figure]
    # The floor at the ratio the decode step measured (mean over DECO layers), else the calibrated one.
    ratio = deco.get("decode_active_ratio", deco.get("calibration", {}).get("mean_ratio"))
    if ratio is not None:
        esize = torch.finfo(kw.get("dtype", torch.bfloat16)).bits // 8
        floors = model_floor(cfg, ratio, kw.get("context", 128), esize, bw)
        row["floor"] = floors
        if "decode_speedup" in row:
            row["fraction_of_floor_ratio"] = row["decode_speedup"] / floors["floor_ratio"]
        for name, key in (("deco", "deco_floor_us"), ("dense_twin", "dense_floor_us")):
            if "decode_us" in row[name]:
                row[name]["decode_fraction_of_floor"] = floors[key] / row[name]["decode_us"]
    return row


def run_model(presets, timer, bw, device="cuda", log=print, **kw) -> list:
    rows = []
    for preset in presets:
        rows.append(model_row(preset, DecoConfig.preset(preset), timer, bw, device, **kw))
        log(json.dumps(rows[-1]))
    return rows


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    """Register ``bench`` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="benchmark layer, model and active-ratio sweep on this GPU; JSON + plots",
                       description="One DECO layer vs its dense twin, the whole model vs the dense-twin model and "
                                   "decode latency vs active ratio on this GPU: JSON and plots under --out.")
    p.add_argument("--out", help="result folder (default benchmarks/results/<gpu>, e.g. .../h100)")
    p.add_argument("--parts", default="all", help=f"comma-separated subset of {','.join(PARTS)} (default all)")
    p.add_argument("--quick", action="store_true",
                   help=f"layer at {' and '.join(QUICK_PRESETS)} only, fewer sweep points, shorter timing "
                        f"(also {QUICK_ENV}=1)")
    p.add_argument("--presets", nargs="+", choices=PRESETS, help="layer presets (default: by --quick)")
    p.add_argument("--tokens", nargs="+", type=int, help=f"layer token counts (default {list(TOKENS)})")
    p.add_argument("--model-presets", nargs="+", choices=PRESETS, help=f"default {list(MODEL_PRESETS)}")
    p.add_argument("--no-reference", action="store_true", help="skip the slow torch reference in the layer part")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots of OUT/bench.json (no GPU needed)")


def _write(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def main(args) -> int:
    """``deco-kernels bench``: runs the selected parts on the GPU, writes OUT/bench.json after each part (a
    crash keeps what was measured) and the plots at the end. Parts not run keep their previous results."""
    from . import benchplot
    try:
        parts = parse_parts(args.parts)
    except ValueError as exc:
        print(f"deco-kernels bench: {exc}", file=sys.stderr)
        return 2
    if args.plot_only:
        if not args.out or not (Path(args.out) / RESULT_FILE).exists():
            print(f"deco-kernels bench --plot-only: expected --out DIR holding a {RESULT_FILE}, got {args.out!r}",
                  file=sys.stderr)
            return 1
        out = Path(args.out)
        result = json.loads((out / RESULT_FILE).read_text())
        for path in benchplot.plot_all(result, out):
            print(path)
        return 0
    if not torch.cuda.is_available():
        print("deco-kernels bench: needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False); "
              "--plot-only redraws the plots of an existing JSON without one", file=sys.stderr)
        return 1
    quick = args.quick or quick_from_env()
    env = environment()
    out = Path(args.out or Path("benchmarks", "results", device_slug(env["gpu"])))
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULT_FILE
    result = json.loads(path.read_text()) if path.exists() else {}
    torch.backends.cuda.matmul.allow_tf32 = False
    names = kernel_backends("cuda")
    timer = GpuTimer(rep_ms=100 if quick else 200)
    result.update(environment=env, dtype="bfloat16", graph_max_tokens=GRAPH_MAX_T, timing=timer.describe())
    result.setdefault("errors", [])
    started = time.perf_counter()
    try:
        bw, flops = device_ceilings()
        torch.cuda.empty_cache()
        result.update(copy_bandwidth_Bps=bw, bf16_matmul_flops=flops, one_empty_launch_us=launch_floor_us(1, timer),
                      two_empty_launches_us=launch_floor_us(2, timer))
    except Exception as exc:  # noqa: BLE001  (no floors without the ceilings: stop here)
        print(f"deco-kernels bench: measuring the device failed: {_error(exc)}", file=sys.stderr)
        return 1
    for part in parts:
        t0 = time.perf_counter()
        print(f"== {part} ({'quick' if quick else 'full'})", flush=True)
        try:
            if part == "layer":
                presets = tuple(args.presets or layer_presets(quick))
                tokens = tuple(args.tokens or TOKENS)
                result["rows"] = run_layer(presets, tokens, timer, bw, flops, names,
                                           with_reference=not args.no_reference)
                result["layer"] = dict(presets=presets, tokens=tokens, backends=names, quick=quick,
                                       date=env["date"])
            elif part == "model":
                presets = tuple(args.model_presets or MODEL_PRESETS)
                result["model"] = dict(presets=presets, quick=quick, date=env["date"], dtype="bfloat16",
                                       target_ratio=TARGET_RATIO,
                                       rows=run_model(presets, GpuTimer(rep_ms=300 if quick else 1000), bw))
            elif part == "train":
                presets = tuple(args.presets or layer_presets(quick))
                result["train"] = dict(presets=presets, tokens=TRAIN_TOKENS, backends=names, date=env["date"],
                                       rows=run_train(presets, timer, names, with_reference=not args.no_reference))
            elif part == "ratio":
                result["ratio"] = dict(preset=RATIO_PRESET, tokens=RATIO_TOKENS, backends=names, quick=quick,
                                       date=env["date"], rows=run_ratio(timer, bw, flops, names,
                                                                        targets=ratio_targets(quick)))
        except Exception as exc:  # noqa: BLE001  (the other parts still run)
            result["errors"].append(dict(part=part, error=_error(exc), traceback=traceback.format_exc(limit=5)))
        result.setdefault("seconds", {})[part] = time.perf_counter() - t0
        _write(result, path)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    try:
        for p in benchplot.plot_all(result, out):
            print(f"wrote {p}")
    except Exception as exc:  # noqa: BLE001
        print(f"deco-kernels bench: plotting failed: {_error(exc)}", file=sys.stderr)
    print(benchplot.summary(result))
    return 0
