"""Fit the cost model's few global constants (model.Constants) on a measured tune cache, and judge them honestly.

    python -m deco_kernels.autotune.calibrate autotune/caches/nvidia-h100-80gb-hbm3_sm90_132sm.json

The judged quantity is the one validate.py reports: for each entry with at least two measured candidates, is
the model's pick (lowest predicted µs among the measured candidates) within `tolerance` of the measured best?
The fit maximises the number of such entries, ties broken by the mean log of pick / best, by coordinate search
over a log grid of each constant around the current values (a few sweeps; deterministic).

Held-out: leave-one-geometry-out. For each layer geometry of the cache the constants are fitted on the
entries of the other geometries only and judged on that geometry's entries; the held-out pass count sums these
four (or however many geometries there are) judgements. This is the number to quote; the in-sample count
(fitted and judged on everything) is an upper bound. The shipped model.CONSTANTS are the fit on all entries.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, fields, replace

from . import devices, model
from .buckets import representative_t
from .cache import load

# Where every fit starts (round first guesses, not fitted): the shipped constants are fit(all entries, START).
# The fp32 atomics resolve in the L2, where the accumulators they add into stay (T x d x 4 bytes), so their first
# guess is the DRAM rate rather than a fraction of it.
START = model.Constants(tc_efficiency=0.7, fma_efficiency=0.5, atomic_efficiency=1.0, sync_cycles=200.0,
                        overlap=0.3, reg_base=40.0)
# Multipliers tried for each constant per sweep, and the range each constant may take.
STEPS = (0.5, 0.7, 0.85, 1.0, 1.18, 1.4, 2.0)
BOUNDS = dict(tc_efficiency=(0.05, 1.0), fma_efficiency=(0.01, 1.0), atomic_efficiency=(0.02, 2.0),
              sync_cycles=(1.0, 5000.0), overlap=(0.0, 1.0), reg_base=(8.0, 128.0))


@dataclass
class Entry:
    key: str
    path: str
    geometry: str            # "d768_n42_de64_ds128_bf16": the leave-one-out unit
    T: int
    configs: list
    us: list                 # measured µs per candidate
    works: list = field(default_factory=list)   # model.Work lists per candidate (recorded once)


def load_entries(cache_path: str, compiled: bool = False) -> tuple[list[Entry], dict]:
    """The entries of a measured cache with >= 2 measured candidates that the launcher can record, and the
    cache's device description. With compiled, the Works carry the compiled resource usage of each candidate's
    kernels for the device's arch (validate.usage_cache: compiled once, then read from its file)."""
    from .launches import record
    from .validate import parse_key, usage_cache

    data = load(cache_path, check_versions=False)
    uc = usage_cache(cache_path, data, compiled)
    out = []
    for key, e in sorted(data["entries"].items()):
        path, d, n, de, ds, dtype, bucket = parse_key(key)
        T = e.get("T") or representative_t(bucket)
        configs, us, works = [], [], []
        for c in e.get("candidates", []):
            if c.get("us") is None:
                continue
            try:
                launches = record(path, c["config"], T, d, n, de, ds, dtype)
                ws = model.works_of(launches, T, d, n, de, ds, dtype, uc.usage(launches) if uc else None)
            except Exception:  # noqa: BLE001 - a config the current launcher rejects cannot be modelled
                continue
            configs.append(c["config"])
            us.append(c["us"])
            works.append(ws)
        if len(us) >= 2:
            out.append(Entry(key, path, key.split("/")[1], T, configs, us, works))
    if uc:
        uc.save()
    return out, data["device"]


def judge(entries: list[Entry], profile, constants=None, tolerance: float = 0.10) -> dict:
    """{"passed", "judged", "mean_log_ratio", "worst_ratio", "rows": [{key, ratio, passed, pick}]} of the model's
    picks with `constants` (the path's other costs are the same for every candidate: they do not rank)."""
    rows = []
    for e in entries:
        pred = [sum(model.kernel_us(w, profile, constants) for w in ws) for ws in e.works]
        pick = min(range(len(pred)), key=lambda i: (pred[i], i))
        ratio = e.us[pick] / min(e.us)
        rows.append(dict(key=e.key, ratio=ratio, passed=ratio <= 1 + tolerance, pick=e.configs[pick]))
    judged = len(rows)
    return dict(passed=sum(r["passed"] for r in rows), judged=judged,
                mean_log_ratio=sum(math.log(r["ratio"]) for r in rows) / max(judged, 1),
                worst_ratio=max((r["ratio"] for r in rows), default=None), rows=rows)


def _score(result: dict) -> tuple:
    return (-result["passed"], result["mean_log_ratio"])


def fit(entries: list[Entry], profile, start=None, sweeps: int = 3, tolerance: float = 0.10):
    """Coordinate search from `start` (default START): (best constants, their judge result)."""
    best = start or START
    best_res = judge(entries, profile, best, tolerance)
    for _ in range(sweeps):
        improved = False
        for f in fields(best):
            lo, hi = BOUNDS[f.name]
            v0 = getattr(best, f.name)
            tries = [min(hi, max(lo, v0 * s)) for s in STEPS]
            if f.name == "overlap":   # may sit at 0: additive steps too
                tries += [min(hi, max(lo, v0 + a)) for a in (-0.2, -0.1, 0.1, 0.2)]
            for v in dict.fromkeys(tries):
                if v == v0:
                    continue
                cand = replace(best, **{f.name: v})
                res = judge(entries, profile, cand, tolerance)
                if _score(res) < _score(best_res):
                    best, best_res, improved = cand, res, True
        if not improved:
            break
    return best, best_res


def geometries(entries: list[Entry]) -> list[str]:
    return sorted({e.geometry for e in entries})


def split(entries: list[Entry], held: str) -> tuple[list[Entry], list[Entry]]:
    """(training entries: every geometry but `held`, judged entries: `held` only)."""
    return [e for e in entries if e.geometry != held], [e for e in entries if e.geometry == held]


def held_out(entries: list[Entry], profile, start=None, tolerance: float = 0.10) -> dict:
    """Leave-one-geometry-out: fit on the others, judge the held-out geometry; summed over geometries."""
    folds, rows = [], []
    for g in geometries(entries):
        train, test = split(entries, g)
        k, train_res = fit(train, profile, start, tolerance=tolerance)
        res = judge(test, profile, k, tolerance)
        folds.append(dict(held_out=g, constants=k.to_json(), train_passed=train_res["passed"],
                          train_judged=train_res["judged"], passed=res["passed"], judged=res["judged"],
                          worst_ratio=res["worst_ratio"]))
        rows += res["rows"]
    return dict(passed=sum(f["passed"] for f in folds), judged=sum(f["judged"] for f in folds),
                worst_ratio=max((r["ratio"] for r in rows), default=None), folds=folds, rows=rows)


def calibrate(cache_path: str, profile=None, tolerance: float = 0.10, compiled: bool = False) -> dict:
    """The shipped constants' result, the in-sample fit (what to ship) and the leave-one-geometry-out judgement
    (both fits from START); with compiled, on the compiled resource usage (load_entries)."""
    entries, device = load_entries(cache_path, compiled)
    profile = profile or devices.profile_for(device)
    shipped = judge(entries, profile, model.CONSTANTS, tolerance)
    k, res = fit(entries, profile, tolerance=tolerance)
    ho = held_out(entries, profile, tolerance=tolerance)
    return dict(profile=profile.key, tolerance=tolerance, shipped=dict(constants=model.CONSTANTS.to_json(),
                passed=shipped["passed"], judged=shipped["judged"], worst_ratio=shipped["worst_ratio"]),
                fitted=dict(constants=k.to_json(), passed=res["passed"], judged=res["judged"],
                            worst_ratio=res["worst_ratio"]),
                held_out={key: v for key, v in ho.items() if key != "rows"}, held_out_rows=ho["rows"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="a measured tune cache (JSON)")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--compiled-usage", action="store_true",
                   help="compile every measured candidate for the device's arch (cached) and give the model its "
                        "registers, shared memory and spills instead of the estimates")
    args = p.parse_args(argv)
    r = calibrate(args.cache, tolerance=args.tolerance, compiled=args.compiled_usage)
    print(json.dumps({k: v for k, v in r.items() if k != "held_out_rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
