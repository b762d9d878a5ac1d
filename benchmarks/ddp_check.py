"""DDP and FSDP2 of DecoForCausalLM with the SparsityController (issue 4 part 4), one process per GPU.

    torchrun --nproc_per_node=2 benchmarks/ddp_check.py --out "$OUT/ddp_check.json"
    torchrun --nproc_per_node=2 benchmarks/ddp_check.py --device cpu      # gloo on the CPU: a smoke run

Every rank trains on its own batches (different seeds, so the local active ratios differ) for ``--steps``
steps, with AdamW and a SparsityController, three ways:

1. DDP (``broadcast_buffers=False``; see 3): after every step every rank must hold the same λ and the same
   global active ratio (all-gathered and compared exactly), and after the last step the same parameters
   (a sha256 of every parameter's bytes, all-gathered).
2. FSDP2: ``torch.distributed.fsdp.fully_shard`` on every decoder block and the root, the same batches: λ
   and the full parameters equal on every rank, and the loss curve compared with the DDP run's (the same
   global batches and initial weights, so they differ only by rounding of the gradient reductions; fp32
   with TF32 off by default). Whether it runs at all is recorded, with the error if it does not.
   Both runs also count the cached lookups of the fp32 mean of w_up (``deco_kernels.layout.memoize``, keyed
   by the tensor's version counter) made while training: there must be none. FSDP2 all-gathers into the same
   unsharded parameter every step and keeps its version counter, so a cached mean would be stale; the training
   path computes it from the weights in use (``deco_kernels.triton.means.expert_mean``). An earlier version
   of this check compared a cached lookup of its own with the fresh mean, and so reported the staleness its
   own lookup created (it failed FSDP2 on an H200 pair with the training path reading no cache).
3. Information only: DDP with its default ``broadcast_buffers=True`` and two micro-batches per step. DDP
   broadcasts rank 0's buffers at each forward, and the layers' active-gate counters are buffers, so the
   second micro-batch overwrites the other ranks' counts; recorded as the difference between the counters
   and the counts the layers really added.

Never hangs: the process group has a ``--pg-timeout`` (init and collectives), and a watchdog thread ends
the process after ``--timeout`` seconds (writing what it has, status "timeout", exit 124), with
faulthandler as a last resort. NVLink multicast stays off: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are set before torch is imported.

Exit status: 0 every check passed, 1 a check failed (or FSDP2 did not run), 2 skipped (fewer than 2
processes or GPUs; ``--min-world-size 1`` runs anyway, for a smoke run on one GPU), 124 timeout.
"""
from __future__ import annotations

import os

# NVLink multicast must stay off on the shared GPU hosts (before torch, NCCL or NVSHMEM read them).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_overridden = {k: os.environ[k] for k, v in MULTICAST_OFF.items() if os.environ.get(k, v) != v}
os.environ.update(MULTICAST_OFF)

import argparse  # noqa: E402
import datetime  # noqa: E402
import faulthandler  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from deco_kernels import DecoConfig, DecoForCausalLM, SparsityController, __version__, backends, layout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "h100" / "ddp_check.json"
REPORT: dict = {"status": "starting", "stage": "init"}


# ---------------------------------------------------------------------------------------------------------
# Never hang
# ---------------------------------------------------------------------------------------------------------
def write_report(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(REPORT, indent=1, default=str) + "\n")


def start_watchdog(seconds: float, out: Path, rank: int) -> threading.Timer:
    """After ``seconds``: rank 0 writes the report so far (status "timeout"), every rank exits with 124. A
    thread, so it fires while the main thread waits inside a collective; faulthandler 40 s later dumps every
    thread's stack and exits even if the interpreter is wedged."""
    def fire():
        REPORT["status"] = "timeout"
        print(f"[rank {rank}] ddp_check: timeout after {seconds:.0f} s in stage {REPORT.get('stage')!r}",
              file=sys.stderr, flush=True)
        if rank == 0:
            try:
                write_report(out)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(124)

    # The other ranks wait 10 s longer: when one rank exits torchrun kills the rest, and rank 0 must write first.
    timer = threading.Timer(seconds if rank == 0 else seconds + 10, fire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(seconds + 40, exit=True)
    return timer


# ---------------------------------------------------------------------------------------------------------
# Model, data, checks
# ---------------------------------------------------------------------------------------------------------
def model_config(args) -> DecoConfig:
    if args.preset == "small":  # the elastic experiment's model: 4 layers, d=256, N=24 experts of de=32
        return DecoConfig(vocab_size=256, num_layers=4, d_model=256, num_heads=4, head_dim=64, d_ff=640,
                          num_experts=24, expert_dim=32, shared_dim=128, max_seq_len=args.seq_len, lr=1e-3,
                          lambda0=1e-3, lambda_multiplier=1.2, backend=args.backend)
    return DecoConfig.preset(args.preset, backend=args.backend)


def batches_for(rank: int, steps: int, micro: int, batch: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    """Per rank: steps * micro batches of arithmetic sequences (a + k*i) mod vocab; the seed is the rank's."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(steps * micro):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 4 + 4 * rank, (batch, 1), generator=gen)  # ranks differ in difficulty
        out.append((start + stride * torch.arange(seq_len)) % vocab)
    return out


def digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order (FSDP2 DTensors gathered in full first)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        h.update(name.encode())
        h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).float().cpu()
    return out


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CachedMeanSpy:
    """While installed, counts the lookups of the weight-derived cache (layout.memoize: every backend's cached
    wbar goes through it) and the training path's fresh means (the Triton backend's means.expert_mean, called
    on the weights in use every step). Both are looked up through their module attributes, so every call passes
    here."""

    def __init__(self):
        self.cached_lookups, self.fresh = 0, 0
        self._memoize = layout.memoize

        def memoize(t, make):
            self.cached_lookups += 1
            return self._memoize(t, make)
        layout.memoize = memoize
        self._means = None
        if backends.available("triton", torch.device("cuda")):
            from deco_kernels.triton import means
            self._means, self._expert_mean = means, means.expert_mean

            def expert_mean(w_up):
                self.fresh += 1
                return self._expert_mean(w_up)
            means.expert_mean = expert_mean

    def remove(self):
        layout.memoize = self._memoize
        if self._means is not None:
            self._means.expert_mean = self._expert_mean


def local_counts(model) -> tuple[int, int]:
    layers = [m for m in model.modules() if type(m).__name__ == "DecoMoE"]
    return (sum(int(m.active_count.item()) for m in layers), sum(int(m.gate_count.item()) for m in layers))


def train(model, wrapped, batches, steps: int, micro: int, lr: float, *, stage: str, no_sync=None) -> dict:
    """``steps`` optimizer steps of ``micro`` micro-batches each; returns the per-step record of this rank."""
    controller = SparsityController(model)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.01), lr=lr)
    spy = CachedMeanSpy()
    rec = {"loss": [], "lam": [], "global_ratio": [], "local_ratio": []}
    device = next(model.parameters()).device
    for step in range(steps):
        REPORT["stage"] = f"{stage} step {step}"
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for k in range(micro):
            ids = batches[step * micro + k].to(device)
            ctx = no_sync() if (no_sync is not None and k < micro - 1) else _nullcontext()
            with ctx:
                out = wrapped(ids, labels=ids)
                (out.loss / micro).backward()
            loss_sum += out.loss.detach().double() / micro
        opt.step()
        active, total = local_counts(model)
        rec["local_ratio"].append(active / total)
        rec["global_ratio"].append(controller.step())
        rec["lam"].append(controller.lam)
        dist.all_reduce(loss_sum)
        rec["loss"].append(loss_sum.item() / dist.get_world_size())
    spy.remove()
    rec["wbar_cached_lookups"], rec["wbar_fresh"] = spy.cached_lookups, spy.fresh
    return rec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build(args, device, dtype) -> DecoForCausalLM:
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run
    return DecoForCausalLM(model_config(args)).to(device=device, dtype=dtype).train()


def run_ddp(args, device, dtype, batches) -> tuple[dict, DecoForCausalLM]:
    model = build(args, device, dtype)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    rec = train(model, ddp, batches, args.steps, 1, args.lr, stage="ddp")
    return rec, model


def counter_hazard(args, device, dtype, batches, use_no_sync: bool) -> dict:
    """DDP(broadcast_buffers=True), two steps of two micro-batches (the first under no_sync when
    ``use_no_sync``): per step, the layers' active-gate counters vs the counts the layers really added on
    this rank (forward hooks)."""
    model = build(args, device, dtype)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=True)
    layers = [m for m in model.modules() if type(m).__name__ == "DecoMoE"]
    added, before = [0], {}

    def pre(m, a):
        before[m] = int(m.active_count.item())  # after DDP's buffer broadcast, which runs before the module

    def post(m, a, y):
        added[0] += int(m.active_count.item()) - before[m]

    handles = [m.register_forward_pre_hook(pre) for m in layers] + [m.register_forward_hook(post) for m in layers]
    controller = SparsityController(model)
    steps = []
    for step in range(2):
        added[0] = 0
        for k in range(2):
            ids = batches[2 * step + k].to(device)
            with (ddp.no_sync() if use_no_sync and k == 0 else _nullcontext()):
                ddp(ids, labels=ids).loss.backward()
        steps.append({"counted": local_counts(model)[0], "added": added[0]})
        controller.step()
    for h in handles:
        h.remove()
    return {"no_sync_first_microbatch": use_no_sync, "steps": steps,
            "counters_corrupted": any(s["counted"] != s["added"] for s in steps)}


def run_fsdp2(args, device, dtype, batches) -> tuple[dict, DecoForCausalLM]:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    model = build(args, device, dtype)
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    rec = train(model, model, batches, args.steps, 1, args.lr, stage="fsdp2")
    return rec, model


def rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def same(values: list) -> bool:
    return all(v == values[0] for v in values)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="'small' (4 layers, d=256, N=24, de=32) or a DecoConfig preset")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--backend", default="auto", help="DECO layer backend (auto: triton on cuda, torch on cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--fsdp-tol", type=float, default=None,
                   help="largest relative loss difference FSDP2 vs DDP (default 1e-3 fp32, 3e-2 bf16)")
    p.add_argument("--min-world-size", type=int, default=2)
    p.add_argument("--pg-timeout", type=float, default=120.0, help="seconds, process group init and collectives")
    p.add_argument("--timeout", type=float, default=480.0, help="seconds for the whole run")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    out = Path(args.out)
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    REPORT.update(experiment="DDP and FSDP2 of DecoForCausalLM with the SparsityController (issue 4 part 4)",
                  settings=vars(args), world_size=world, multicast_env=MULTICAST_OFF,
                  multicast_env_overridden=_overridden)

    gpus = torch.cuda.device_count() if args.device == "cuda" else None
    reason = None
    if "RANK" not in os.environ:
        reason = "not launched by torchrun: run `torchrun --nproc_per_node=2 benchmarks/ddp_check.py`"
    elif world < args.min_world_size:
        reason = f"world size {world} < {args.min_world_size}: launch with --nproc_per_node=2 on a 2-GPU machine"
    elif args.device == "cuda" and gpus < world:
        reason = f"{world} processes but torch sees {gpus} GPU(s): this check needs one GPU per process"
    if reason is not None:
        print(f"ddp_check: skipped: {reason}", flush=True)
        return 2  # no JSON: a skipped run must not replace a real result

    watchdog = start_watchdog(args.timeout, out, rank)
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        device = torch.device("cpu")
    torch.set_float32_matmul_precision("highest")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    t0 = time.perf_counter()
    if args.device == "cuda":
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    REPORT["stage"] = "environment"
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "deco_kernels": __version__,
           "nccl": ".".join(map(str, torch.cuda.nccl.version())) if args.device == "cuda" else None,
           "devices": gather(torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    REPORT["environment"] = env
    REPORT["config"] = model_config(args).to_dict()
    REPORT["deco_backend"] = backends.resolve(args.backend, device, needs_grad=True)
    batches = batches_for(rank, args.steps, 2, args.batch, args.seq_len, model_config(args).vocab_size)
    checks = {}
    status = 0
    try:
        # 1. DDP
        REPORT["stage"] = "ddp"
        rec, ddp_model = run_ddp(args, device, dtype, batches)
        lams, ratios = gather(rec["lam"]), gather(rec["global_ratio"])
        digests = gather(digest(ddp_model))
        wbar = gather(rec["wbar_cached_lookups"])
        ddp = {"loss": rec["loss"], "lam": rec["lam"], "global_ratio": rec["global_ratio"],
               "local_ratio_by_rank": gather(rec["local_ratio"]), "lam_equal": same(lams),
               "global_ratio_equal": same(ratios), "params_equal": same(digests), "param_sha256": digests,
               "wbar_cached_lookups_by_rank": wbar, "wbar_fresh_by_rank": gather(rec["wbar_fresh"])}
        ddp["local_ratios_differ"] = not same(ddp["local_ratio_by_rank"])
        # on a kernel backend the spy must have seen the training path's fresh means (else it saw nothing)
        spy_live = REPORT["deco_backend"] == "torch" or min(ddp["wbar_fresh_by_rank"]) > 0
        ddp["ok"] = (ddp["lam_equal"] and ddp["global_ratio_equal"] and ddp["params_equal"] and max(wbar) == 0
                     and spy_live)
        REPORT["ddp"] = ddp
        checks["ddp"] = ddp["ok"]
        ddp_state = full_state(ddp_model)
        del ddp_model

        # 3. (information) DDP's default buffer broadcast and the counters
        REPORT["stage"] = "broadcast_buffers"
        REPORT["broadcast_buffers_true_two_microbatches"] = {
            "with_no_sync": gather(counter_hazard(args, device, dtype, batches, True)),
            "without_no_sync": gather(counter_hazard(args, device, dtype, batches, False))}

        # 2. FSDP2
        REPORT["stage"] = "fsdp2"
        try:
            rec, fsdp_model = run_fsdp2(args, device, dtype, batches)
            lams, digests = gather(rec["lam"]), gather(digest(fsdp_model))
            state = full_state(fsdp_model)
            param_diff = max(((state[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
                             for k, v in ddp_state.items())
            tol = args.fsdp_tol if args.fsdp_tol is not None else (1e-3 if args.dtype == "fp32" else 3e-2)
            wbar = gather(rec["wbar_cached_lookups"])
            fsdp = {"runs": True, "loss": rec["loss"], "lam": rec["lam"], "global_ratio": rec["global_ratio"],
                    "lam_equal": same(lams), "params_equal": same(digests), "param_sha256": digests,
                    "loss_rel_diff_vs_ddp": rel_diff(rec["loss"], REPORT["ddp"]["loss"]),
                    "param_max_rel_diff_vs_ddp": param_diff, "tolerance_vs_ddp": tol,
                    "wbar_cached_lookups_by_rank": wbar, "wbar_fresh_by_rank": gather(rec["wbar_fresh"])}
            if max(wbar) > 0:
                fsdp["diagnosis"] = ("the training forward looked up the cached mean of w_up "
                                     "(deco_kernels.layout.memoize): its cache is keyed by (id, data_ptr, "
                                     "version) and FSDP2 all-gathers into the same unsharded parameter every step "
                                     "while preserving its version counter, so the lookup can return a stale mean")
            fsdp["ok"] = (fsdp["lam_equal"] and fsdp["params_equal"] and fsdp["loss_rel_diff_vs_ddp"] <= tol
                          and max(wbar) == 0)
        except Exception as e:  # noqa: BLE001 - record whether FSDP2 works at all
            fsdp = {"runs": False, "ok": False, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-4000:]}
        all_ok = gather(fsdp["ok"])
        fsdp["ok_by_rank"] = all_ok
        fsdp["ok"] = all(all_ok)
        REPORT["fsdp2"] = fsdp
        checks["fsdp2"] = fsdp["ok"]
        REPORT["checks"] = checks
        REPORT["status"] = "passed" if all(checks.values()) else "failed"
        status = 0 if all(checks.values()) else 1
    except Exception as e:  # noqa: BLE001 - report, then fail
        REPORT.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        print(f"[rank {rank}] {REPORT['traceback']}", file=sys.stderr, flush=True)
        status = 1
    REPORT["seconds"] = time.perf_counter() - t0
    REPORT["stage"] = "done"
    watchdog.cancel()
    faulthandler.cancel_dump_traceback_later()
    if rank == 0:
        write_report(out)
        summary(REPORT)
        print(f"wrote {out}", flush=True)
    try:
        dist.barrier()  # a rank that returns early would have torchrun kill rank 0 while it writes
    finally:
        dist.destroy_process_group()
    return status


def summary(report: dict) -> None:
    print(f"status: {report['status']}  world size {report['world_size']}  {report.get('seconds', 0):.1f} s")
    ddp = report.get("ddp")
    if ddp:
        print(f"DDP:   lam equal {ddp['lam_equal']}  global ratio equal {ddp['global_ratio_equal']}  "
              f"params equal {ddp['params_equal']}  local ratios differ {ddp['local_ratios_differ']}  "
              f"final lam {ddp['lam'][-1]:.4g}  loss {ddp['loss'][0]:.4f} -> {ddp['loss'][-1]:.4f}  "
              f"cached wbar lookups {max(ddp['wbar_cached_lookups_by_rank'])}")
    hazard = report.get("broadcast_buffers_true_two_microbatches")
    if hazard:
        for name, by_rank in hazard.items():
            print(f"DDP broadcast_buffers=True, 2 micro-batches {name.replace('_', ' ')}: counters corrupted on "
                  f"ranks {[i for i, h in enumerate(by_rank) if h['counters_corrupted']]}")
    fsdp = report.get("fsdp2")
    if fsdp:
        if fsdp.get("runs"):
            print(f"FSDP2: lam equal {fsdp['lam_equal']}  params equal {fsdp['params_equal']}  loss vs DDP "
                  f"{fsdp['loss_rel_diff_vs_ddp']:.3g} (tol {fsdp['tolerance_vs_ddp']:.3g})  params vs DDP "
                  f"{fsdp['param_max_rel_diff_vs_ddp']:.3g}  cached wbar lookups {max(fsdp['wbar_cached_lookups_by_rank'])}"
                  f"  ok {fsdp['ok']}")
            if fsdp.get("diagnosis"):
                print(f"FSDP2: {fsdp['diagnosis']}")
        else:
            print(f"FSDP2: does not run: {fsdp['error']}")
    if report.get("error"):
        print(f"error: {report['error']}")


if __name__ == "__main__":
    sys.exit(main())
