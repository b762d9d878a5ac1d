"""`deco-kernels tune`: measure (on this GPU) or model (for a device profile, e.g. Jetson Orin) the best tile
config per kernel path, layer geometry and token bucket, and write a tune cache.

    deco-kernels tune --preset all --budget 240 --out autotune/caches --validate     # measured, this GPU
    deco-kernels tune --preset all --modelled orin-agx-64gb,orin-nano-8gb --out autotune/caches

Measured: each (geometry, bucket) gets an equal share of what is left of --budget; within it the default is
timed first, then the config the output directory's cache already holds for that entry (the incumbent, so a
re-tune never drops a pick it did not beat side by side), then candidates in the order: cost model's best, a
random one, the model's next, ... (the random ones keep the model-vs-measured validation honest). After the
budget, no new candidate starts; everything measured so far is in the cache (written after every entry).
Modelled: no GPU needed; the model ranks the pruned space, the best few are compiled for the profile's
architecture and rejected if they exceed its shared memory or spill, and the best survivor is written with
"source": "modelled".
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from . import buckets, cache, devices, model, runner, space
from .lookup import user_cache_dir

KERNELS = ("small_batch", "grouped")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODEL_SAMPLE = 400      # candidates the model scores per entry (a seeded sample of the pruned space)


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="autotune the Triton kernels' tile configs (writes a tune cache)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="preset name, comma list, or 'all' (0.1b,0.2b,0.5b,1.2b)")
    p.add_argument("--shape", action="append", default=[], help="explicit layer d,N,de,ds (repeatable)")
    p.add_argument("--tokens", default="buckets",
                   help="'buckets' (all), or a comma list of token counts / bucket labels (e.g. 1,8,t65-512)")
    p.add_argument("--kernels", default="small_batch,grouped", help="subset of: small_batch, grouped")
    p.add_argument("--budget", type=float, default=600.0, help="seconds for the whole measured tune (default 600)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--out", default=None, help="output directory (default: the user cache dir)")
    p.add_argument("--validate", action="store_true", help="after tuning, write the model-vs-measured table")
    p.add_argument("--modelled", default=None,
                   help="comma list of device profiles to model instead of measuring: " + ",".join(devices.PROFILES))
    p.add_argument("--compile-top", type=int, default=4, help="modelled: candidates compiled per entry")
    p.add_argument("--validate-cache", default=None, metavar="FILE",
                   help="only print and write (next to FILE, in validation/) the model-vs-measured table of a "
                        "measured cache; no GPU needed")
    p.add_argument("--compiled-usage", action="store_true",
                   help="with --validate-cache: compile every measured candidate for the cache device's arch "
                        "(cached in validation/<fingerprint>.usage.json) and model its compiled registers, shared "
                        "memory and spills instead of the estimates")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=main)


def _geometries(args) -> list[tuple[str, tuple[int, int, int, int]]]:
    from deco_kernels.config import DecoConfig

    out = []
    names = []
    if args.preset:
        names = ["0.1b", "0.2b", "0.5b", "1.2b"] if args.preset == "all" else args.preset.split(",")
    for name in names:
        c = DecoConfig.preset(name)
        out.append((name, (c.d_model, c.num_experts, c.expert_dim, c.shared_dim)))
    for s in args.shape:
        vals = tuple(int(v) for v in s.split(","))
        if len(vals) != 4:
            raise SystemExit(f"deco-kernels tune: --shape wants d,N,de,ds, got {s!r}")
        out.append((s, vals))
    if not out:
        raise SystemExit("deco-kernels tune: give --preset or --shape")
    return out


def _buckets(spec: str) -> list[str]:
    if spec == "buckets":
        return list(buckets.LABELS)
    out = []
    for item in spec.split(","):
        label = item if item in buckets.LABELS else buckets.bucket_of(int(item))
        if label not in out:
            out.append(label)
    return out


def tasks_of(args) -> list[dict]:
    """Bucket-major (kernels compiled for one bucket are reused by the next geometry)."""
    kernels = [k for k in args.kernels.split(",") if k]
    bad = set(kernels) - set(KERNELS)
    if bad:
        raise SystemExit(f"deco-kernels tune: unknown kernels {sorted(bad)}; known: {list(KERNELS)}")
    out = []
    for label in _buckets(args.tokens):
        T = buckets.representative_t(label)
        path = buckets.path_of(T)
        if path not in kernels:
            continue
        for name, geom in _geometries(args):
            out.append(dict(name=name, geom=geom, bucket=label, T=T, path=path))
    return out


def order_candidates(cands: list[dict], predicted: list[float | None], seed: int, pinned: int = 1) -> list[dict]:
    """The first `pinned` (the default, the incumbent) in order, then alternately the model's next best and a
    random remaining candidate."""
    rest = list(range(pinned, len(cands)))
    by_model = sorted((i for i in rest if predicted[i] is not None), key=lambda i: predicted[i])
    shuffled = rest[:]
    random.Random(seed).shuffle(shuffled)
    order, seen = list(range(pinned)), set(range(pinned))
    a, b = iter(by_model), iter(shuffled)
    while len(order) < len(cands):
        for it in (a, b):
            for i in it:
                if i not in seen:
                    seen.add(i)
                    order.append(i)
                    break
        if len(order) < len(cands) and all(i in seen for i in rest):
            break
    return [cands[i] for i in order]


def incumbents(out_dir: str, info: dict) -> dict:
    """entry key -> config of the measured cache of this device in `out_dir` ({} if none, or stale)."""
    path = os.path.join(out_dir, f"{info['fingerprint']}.json")
    if not os.path.exists(path):
        return {}
    try:
        data = cache.load(path)
    except cache.CacheError as e:
        print(f"deco-kernels tune: {path} not reused ({e})", file=sys.stderr)
        return {}
    return {k: e["config"] for k, e in data["entries"].items() if e.get("source", "measured") == "measured"}


def with_incumbent(cands: list[dict], incumbent: dict | None, task: dict, dtype) -> tuple[list[dict], int]:
    """`cands` with the incumbent second (moved there if the space holds it), and how many lead the order.
    An incumbent tuned for an earlier kernel (space.missing_keys) is not seeded."""
    if not incumbent or space.missing_keys(task["path"], incumbent, task["T"], dtype):
        return cands, 1
    frozen = space._freeze(incumbent)
    if frozen == space._freeze(cands[0]):
        return cands, 1
    rest = [c for c in cands[1:] if space._freeze(c) != frozen]
    return [cands[0], dict(incumbent)] + rest, 2


def _predict(path, cfg, task, dtype, profile, usage=None):
    try:
        return model.predict(path, cfg, task["T"], *task["geom"], dtype, profile, usage=usage)
    except Exception:  # noqa: BLE001 - a config the launcher rejects cannot be modelled
        return None


class Progress:
    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.total, self.done, self.desc = total, 0, desc

    def step(self, note: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(note)
            self.bar.update(1)
        else:
            print(f"\r{self.desc}: {self.done}/{self.total} {note}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def _entry(task, res, source, **extra) -> dict:
    return dict(config=res["config"], us=res["us"], default_us=res["default_us"], T=task["T"], source=source,
                candidates=res["candidates"], date=cache.now(), versions=cache.versions(), **extra)


def run_measured(args, tasks, dtype, out_dir) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("deco-kernels tune: no CUDA GPU; use --modelled PROFILE to model a device instead")
    info = devices.describe_device(torch.cuda.current_device())
    profile = devices.profile_for(info)
    start = time.monotonic()
    deadline = start + args.budget
    table, progress = [], Progress(len(tasks), f"tune {info['name']}")
    held = incumbents(out_dir, info)
    try:
        for k, task in enumerate(tasks):
            now = time.monotonic()
            if now >= deadline:
                table.append(dict(task, skipped="budget"))
                progress.step("budget spent")
                continue
            share = now + (deadline - now) / (len(tasks) - k)
            key = buckets.entry_key(task["path"], *task["geom"], dtype, task["T"])
            cands, pinned = with_incumbent(
                space.candidates(task["path"], task["T"], *task["geom"], dtype, profile, seed=args.seed),
                held.get(key), task, dtype)
            sample = cands[:pinned] + random.Random(args.seed).sample(cands[pinned:],
                                                                      min(MODEL_SAMPLE, len(cands) - pinned))
            pred = [_predict(task["path"], c, task, dtype, profile) for c in sample]
            ordered = order_candidates(sample, pred, args.seed, pinned)
            model_of = {space._freeze(c): p for c, p in zip(sample, pred)}
            try:
                bench = runner.LayerBench(task["path"], task["T"], *task["geom"], dtype=dtype, seed=args.seed)
                res = runner.tune_one(ordered, bench.measure, output=bench.output, close=runner.close_enough(dtype),
                                      deadline=share, healthy=runner.cuda_healthy, reference=bench.reference())
            except runner.ContextLost as e:
                print(f"\ndeco-kernels tune: {e}; stopping (entries so far are written)", file=sys.stderr)
                break
            for row in res["candidates"]:
                row["model_us"] = model_of.get(space._freeze(row["config"]))
            cache.merge_entries(out_dir, info, {key: _entry(task, res, "measured", profile=profile.key)})
            table.append(dict(task, default_us=res["default_us"], us=res["us"],
                              measured=sum(r["us"] is not None for r in res["candidates"]),
                              failed=sum(r["us"] is None for r in res["candidates"])))
            progress.step(f"{task['name']} {task['bucket']}: {res['default_us'] or float('nan'):.1f} -> "
                          f"{res['us'] or float('nan'):.1f} µs")
    except KeyboardInterrupt:
        print("\ndeco-kernels tune: interrupted; entries so far are written", file=sys.stderr)
    finally:
        progress.close()
    return table


class _Compiler:
    """Compile-only checks with a memo per binary (compile.binary_key): shared by entries and profiles."""

    def __init__(self):
        self.memo = {}
        self.unavailable = None      # why nothing can be compiled here (then entries are unchecked)

    def usage(self, path, cfg, task, dtype, capability):
        from . import compile as C
        from .launches import record

        usage = {}
        if self.unavailable:
            return usage
        for ln in record(path, cfg, task["T"], *task["geom"], dtype):
            key = C.binary_key(ln, capability)
            if key not in self.memo:
                try:
                    self.memo[key] = C.compile_launch(ln, capability)
                except C.CompileUnavailable as e:
                    self.unavailable = str(e)
                    print(f"\ndeco-kernels tune: compile-only checks unavailable ({e}); modelled configs are "
                          "checked against the shared-memory estimate only", file=sys.stderr)
                    return {}
                except Exception as e:  # noqa: BLE001 - a config that does not compile is rejected
                    self.memo[key] = {"error": runner._error(e)}
            usage[ln.name] = self.memo[key]
        return usage


def run_modelled(args, tasks, dtype, out_dir) -> list[dict]:
    from . import compile as C

    profiles = []
    for key in args.modelled.split(","):
        if key not in devices.PROFILES:
            raise SystemExit(f"deco-kernels tune: unknown profile {key!r}; known: {list(devices.PROFILES)}")
        profiles.append(devices.PROFILES[key])
    compiler, table = _Compiler(), []
    progress = Progress(len(tasks) * len(profiles), "model")
    try:
        for profile in profiles:
            info = dict(name=profile.name, capability=list(profile.capability), sms=profile.sms,
                        memory_gb=profile.memory_gb, fingerprint=profile.fingerprint, profile=profile.key)
            for task in tasks:
                path = task["path"]
                cands = space.candidates(path, task["T"], *task["geom"], dtype, profile, seed=args.seed)
                sample = cands[:1] + random.Random(args.seed).sample(cands[1:], min(MODEL_SAMPLE, len(cands) - 1))
                pred = [_predict(path, c, task, dtype, profile) for c in sample]
                top = sorted((i for i in range(1, len(sample)) if pred[i] is not None), key=lambda i: pred[i])
                rows, survivors = [], 0
                # Compile the default and the model's best until --compile-top of them fit (at most 4x as many
                # tries: on a small device the best-modelled tiles are often the ones that spill).
                for i in [0] + top[:4 * args.compile_top]:
                    if survivors >= args.compile_top:
                        break
                    cfg, row = sample[i], {"config": sample[i], "model_us": pred[i]}
                    usage = compiler.usage(path, cfg, task, dtype, profile.capability)
                    bad = [f"{k}: {u['error']}" for k, u in usage.items() if "error" in u]
                    bad += [f"{k}: {r}" for k, u in usage.items() if "error" not in u
                            for r in [C.check_fits(u, profile)] if r]
                    if bad:
                        row["rejected"] = "; ".join(bad)
                        row["hard"] = any(": spills" not in b for b in bad)
                    else:
                        row["model_us"] = _predict(path, cfg, task, dtype, profile, usage)
                        survivors += i > 0
                    row["usage"] = {k: {f: u.get(f) for f in ("shared", "regs", "spills", "error")}
                                    for k, u in usage.items()}
                    rows.append(row)
                ok = [r for r in rows if "rejected" not in r and r["model_us"] is not None]
                default = rows[0]
                if not ok:   # every compiled candidate spills (or worse): keep the least-spilling one that fits
                    soft = [r for r in rows if r.get("model_us") is not None and not r.get("hard")]
                    ok = sorted(soft, key=lambda r: (sum(u.get("spills") or 0 for u in r["usage"].values()),
                                                     r["model_us"]))[:1]
                    for r in ok:
                        r["note"] = "every compiled candidate spills: the least-spilling one is kept"
                best = min(ok, key=lambda r: r["model_us"]) if ok else default
                res = dict(config=best["config"], us=best["model_us"], default_us=default["model_us"],
                           candidates=rows)
                key = buckets.entry_key(path, *task["geom"], dtype, task["T"])
                cache.merge_entries(out_dir, info, {key: _entry(task, res, "modelled", profile=profile.key,
                                                                default_rejected=default.get("rejected"),
                                                                compiled=compiler.unavailable is None)},
                                    source="modelled", filename=f"{profile.key}.json")
                table.append(dict(task, profile=profile.key, default_us=default["model_us"], us=best["model_us"],
                                  measured=len(ok), failed=len(rows) - len(ok)))
                progress.step(f"{profile.key} {task['name']} {task['bucket']}")
    except KeyboardInterrupt:
        print("\ndeco-kernels tune: interrupted; entries so far are written", file=sys.stderr)
    finally:
        progress.close()
    return table


def format_table(table: list[dict], modelled: bool) -> str:
    unit = "model µs" if modelled else "µs"
    lines = [f"{'kernel':12} {'shape':8} {'bucket':10} {'default ' + unit:>16} {'tuned ' + unit:>14} "
             f"{'speed-up':>8} {'ok/failed':>9}"]
    for r in table:
        name = (r.get("profile", "") + " " if modelled else "") + r["name"]
        if "skipped" in r:
            lines.append(f"{r['path']:12} {name:8} {r['bucket']:10} {'(not tuned: ' + r['skipped'] + ')':>16}")
            continue
        d, t = r["default_us"], r["us"]
        sp = f"{d / t:.2f}x" if d and t else "-"
        lines.append(f"{r['path']:12} {name:8} {r['bucket']:10} {d if d is not None else float('nan'):>16.1f} "
                     f"{t if t is not None else float('nan'):>14.1f} {sp:>8} {r['measured']:>4}/{r['failed']:<4}")
    return "\n".join(lines)


def _validate(cache_path: str, compiled: bool = False) -> None:
    from . import validate
    report = validate.validate(cache_path, held_out=True, compiled=compiled)
    print(validate.format_table(report))
    out_dir = os.path.join(os.path.dirname(os.path.abspath(cache_path)), "validation")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{report['summary']['device']['fingerprint']}.json")
    validate.write_report(report, out)
    print(f"validation table written to {out}")


def main(args) -> int:
    if args.validate_cache:
        _validate(args.validate_cache, args.compiled_usage)
        return 0
    dtype = DTYPES[args.dtype]
    out_dir = args.out or user_cache_dir()
    tasks = tasks_of(args)
    modelled = args.modelled is not None
    table = (run_modelled if modelled else run_measured)(args, tasks, dtype, out_dir)
    print(format_table(table, modelled))
    print(f"cache written under {out_dir}")
    if args.validate and not modelled and torch.cuda.is_available():
        info = devices.describe_device(torch.cuda.current_device())
        _validate(os.path.join(out_dir, f"{info['fingerprint']}.json"))
    return 0
