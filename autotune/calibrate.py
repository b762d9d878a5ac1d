"""Fit the cost model's few global constants (model.Constants) on measured tune caches, and judge them honestly.

    python -m deco_kernels.autotune.calibrate            # the shipped measured caches (FIT_CACHES), jointly
    python -m deco_kernels.autotune.calibrate autotune/caches/nvidia-h200_sm90_132sm.json   # one cache alone

The constants are global, one set for every device (the profiles carry what differs), so they are fitted on
the entries of every measured cache at once, each entry modelled on its own device's profile.
The judged quantity is the one validate.py reports: for each entry with at least two measured candidates, is
the model's pick (lowest predicted µs among the measured candidates) within `tolerance` of the measured best?
The fit first keeps the anchors (ANCHOR_FILE: whole-layer timings) within ANCHOR_TOLERANCE of their
measurements, then maximises the number of such entries, ties broken by the mean log of pick / best, then by the
soft regret (soft_regret: each entry's candidates weighted by a softmin of their predictions, the mean log of
measured / best under those weights), by coordinate search over a log grid of each constant around the current
values (a few sweeps; deterministic). The first two change only where some entry's pick changes, so the search
stood still wherever no single step moved a pick (most of the space); the soft regret changes with every
prediction and leads the search towards constants that rank the fast candidates ahead by a margin. With it the
held-out count rose from 41 to 43 of 51 (2026-12-04), the in-sample fit unchanged.

Held-out: leave-one-geometry-out across all the caches given. For each layer geometry the constants are fitted
on the entries of the other geometries only, on every device, and judged on that geometry's entries on every
device (a geometry measured on two GPUs goes out on both: its other device's entries would otherwise leak its
shape into the fit); the held-out pass count sums these judgements. This is the number to quote; the in-sample
count (fitted and judged on everything) is an upper bound. The shipped model.CONSTANTS are the fit on all
entries of FIT_CACHES.

Shipping a refit (after a measured cache in FIT_CACHES gained entries, or the model changed) is one command:

    python -m deco_kernels.autotune.calibrate --ship

It fits the constants on FIT_CACHES from STARTS and from the shipped constants (the best fit wins), writes
them (4 significant digits) into model.py, writes both
validation tables (autotune/caches/validation/<fingerprint>.json: in-sample and held out, as
`deco-kernels tune --validate-cache` does), rewrites the "Current fit" paragraph of model.py's docstring from
those tables, and regenerates the modelled Orin caches (`deco-kernels tune --preset all --modelled <every
Orin profile> --out autotune/caches`, compile-only checks for sm_87: run it without TRITON_INTERPRET). A few
minutes on two CPU cores with a warm Triton cache, most of it compiling Orin candidates.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field, fields, replace

from . import devices, model
from .buckets import representative_t
from .cache import load

# The measured caches (in autotune/caches) the shipped constants are fitted on, jointly.
FIT_CACHES = ("nvidia-h100-80gb-hbm3_sm90_132sm.json", "nvidia-h200_sm90_132sm.json")

# Where every fit starts (round first guesses, not fitted): the shipped constants are fit(all entries), the best
# of the searches from each of STARTS. The fp32 atomics resolve in the L2, where the accumulators they add into
# stay (T x d x 4 bytes), so their first guess is the DRAM rate rather than a fraction of it.
START = model.Constants(tc_efficiency=0.7, fma_efficiency=0.5, atomic_efficiency=1.0, sync_cycles=200.0,
                        overlap=0.3, reg_base=40.0)
# The coordinate search is local and its objective's first parts (a count, the picks' ratios) are flat almost
# everywhere (the soft regret only breaks their ties): from START alone the folds of the leave-one-geometry-out
# judgement ended at tc_efficiency 0.245 to 0.7 and sync_cycles 236 to 400, entries short of what other starts
# reach. So every fit also starts from three other round guesses, one per regime those folds ended in (cheap
# barriers and little overlap; slow tensor cores and cheap atomics; much overlap and slow FMAs), and keeps the
# best; none is fitted, so no fold sees its held-out geometry through them.
STARTS = (START,
          replace(START, sync_cycles=100.0, overlap=0.1),
          replace(START, tc_efficiency=0.35, atomic_efficiency=2.0),
          replace(START, overlap=0.6, fma_efficiency=0.25))
# Multipliers tried for each constant per sweep, and the range each constant may take.
STEPS = (0.5, 0.7, 0.85, 1.0, 1.18, 1.4, 2.0)
BOUNDS = dict(tc_efficiency=(0.05, 1.0), fma_efficiency=(0.01, 1.0), atomic_efficiency=(0.02, 2.0),
              sync_cycles=(1.0, 5000.0), overlap=(0.0, 1.0), reg_base=(8.0, 128.0))


# Absolute measurements every fit must keep within ANCHOR_TOLERANCE: the whole prefill layer under CUDA graphs on
# the H100, default tiles, with each down projection (benchmarks/results/h100/probe_ab_down_gemm.json, read from
# a checkout; without it there are none). The picks only rank candidates, so they leave the constants' scale
# free: on the caches of 2026-12-05 (GEMM ahead of the atomics everywhere) a ranking-only fit predicted those
# layers 1.2-1.7x slow (atomics 1.2b T=4096: 609 µs for 401.7) for one more pick. The Orin caches are chosen on
# the absolute cost of each down projection, so the fit may not buy picks with it. Held out, a geometry's own
# anchors go out with it.
ANCHOR_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "benchmarks", "results", "h100", "probe_ab_down_gemm.json")
ANCHOR_TOLERANCE = 0.30


@dataclass
class Anchor:
    label: str               # "1.2b T=4096 atomics"
    geometry: str            # as Entry.geometry
    us: float                # measured
    works: list              # model.Work per launch, recorded once
    profile: devices.DeviceProfile
    T: int
    shape: tuple             # d, n, de, ds
    dtype: object

    def predict(self, constants=None) -> float:
        d, _, _, ds = self.shape
        return model.path_us(self.works, "grouped", self.T, d, ds, self.dtype, self.profile, constants)


_ANCHORS: list | None = None


def default_anchors() -> list[Anchor]:
    """The anchors of ANCHOR_FILE (recorded once per process); [] where the file is not there."""
    global _ANCHORS
    if _ANCHORS is None:
        _ANCHORS = load_anchors(ANCHOR_FILE) if os.path.exists(ANCHOR_FILE) else []
    return _ANCHORS


def load_anchors(path: str) -> list[Anchor]:
    """Anchors from a benchmarks/probe_ab.py result of the grouped path's down-projection variants (rows with
    "preset", "T", "variant" in {"gemm", "atomics"} and "us"), on the profile of its "environment"'s GPU."""
    import torch

    from deco_kernels.config import DecoConfig

    from .buckets import entry_key
    from .launches import record
    from .space import default_config

    with open(path) as f:
        data = json.load(f)
    profile = devices.profile_of_environment(data["environment"])
    dtype, out = torch.bfloat16, []
    for r in data["rows"]:
        c = DecoConfig.preset(r["preset"])
        shape = (c.d_model, c.num_experts, c.expert_dim, c.shared_dim)
        cfg = dict(default_config("grouped", r["T"], dtype), down=r["variant"])
        works = model.works_of(record("grouped", cfg, r["T"], *shape, dtype), r["T"], *shape, dtype)
        out.append(Anchor(f"{r['preset']} T={r['T']} {r['variant']}",
                          entry_key("grouped", *shape, dtype, r["T"]).split("/")[1], r["us"], works, profile,
                          r["T"], shape, dtype))
    return out


def anchors_off(anchors, constants=None, tolerance: float = ANCHOR_TOLERANCE) -> list[tuple[str, float]]:
    """(label, predicted / measured) of the anchors predicted more than `tolerance` off (either way)."""
    out = []
    for a in anchors:
        r = a.predict(constants) / a.us
        if abs(math.log(r)) > math.log(1 + tolerance):
            out.append((a.label, r))
    return out


@dataclass
class Entry:
    key: str
    path: str
    geometry: str            # "d768_n42_de64_ds128_bf16": the leave-one-out unit
    T: int
    configs: list
    us: list                 # measured µs per candidate
    works: list = field(default_factory=list)   # model.Work lists per candidate (recorded once)
    profile: devices.DeviceProfile | None = None  # the device it was measured on (None: the profile judged with)
    cache: str = ""          # the measured cache it comes from (its path)

    @property
    def device(self) -> str:
        return self.profile.key if self.profile else ""


def fit_cache_paths() -> list[str]:
    """The shipped measured caches the constants are fitted on (FIT_CACHES in autotune/caches)."""
    from .lookup import SHIPPED_DIR

    return [os.path.join(SHIPPED_DIR, f) for f in FIT_CACHES]


def load_entries(cache_path: str, compiled: bool = False, profile=None) -> tuple[list[Entry], dict]:
    """The entries of a measured cache with >= 2 measured candidates that the launcher can record, and the
    cache's device description; each entry carries `profile` (default: devices.profile_for the cache's device).
    With compiled, the Works carry the compiled resource usage of each candidate's kernels for the device's
    arch (validate.usage_cache: compiled once, then read from its file)."""
    from .launches import record
    from .space import as_measured
    from .validate import parse_key, usage_cache

    data = load(cache_path, check_versions=False)
    profile = profile or devices.profile_for(data["device"])
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
                launches = record(path, as_measured(path, c["config"]), T, d, n, de, ds, dtype)
                ws = model.works_of(launches, T, d, n, de, ds, dtype, uc.usage(launches) if uc else None)
            except Exception:  # noqa: BLE001 - a config the current launcher rejects cannot be modelled
                continue
            configs.append(c["config"])
            us.append(c["us"])
            works.append(ws)
        if len(us) >= 2:
            out.append(Entry(key, path, key.split("/")[1], T, configs, us, works, profile, cache_path))
    if uc:
        uc.save()
    return out, data["device"]


def load_caches(cache_paths, compiled: bool = False) -> list[Entry]:
    """The entries of several measured caches (load_entries each, on its own device's profile)."""
    out = []
    for p in dict.fromkeys(os.path.abspath(p) for p in cache_paths):
        out += load_entries(p, compiled)[0]
    return out


def soft_regret(pred: list[float], us: list[float], temperature: float) -> float:
    """The mean log of measured / best µs over an entry's candidates, each weighted by exp(-log(pred / lowest
    pred) / temperature): the pick's log ratio when it is predicted well ahead of the rest, more as slower
    candidates come within `temperature` (in log µs) of it. Unlike the pick's ratio it moves with every
    prediction, so the fit can tell constants apart that pick the same candidates."""
    lowest, best = min(pred), min(us)
    weights = [math.exp(-math.log(p / lowest) / temperature) for p in pred]
    return sum(w * math.log(u / best) for w, u in zip(weights, us)) / sum(weights)


def judge(entries: list[Entry], profile=None, constants=None, tolerance: float = 0.10, anchors=None) -> dict:
    """{"passed", "judged", "mean_log_ratio", "soft_regret", "worst_ratio", "rows": [{key, device, ratio, passed,
    pick}], "anchors_off": [(label, ratio)]} of the model's picks with `constants`, each entry on its own profile
    (else `profile`; the path's other costs are the same for every candidate: they do not rank). soft_regret: the
    mean over entries, at a temperature of `tolerance` (a candidate predicted 10% slower than the pick weighs 0.39
    of it). anchors: absolute measurements to check (default: default_anchors())."""
    rows, soft = [], 0.0
    for e in entries:
        prof = e.profile or profile
        pred = [sum(model.kernel_us(w, prof, constants) for w in ws) for ws in e.works]
        pick = min(range(len(pred)), key=lambda i: (pred[i], i))
        ratio = e.us[pick] / min(e.us)
        soft += soft_regret(pred, e.us, tolerance)
        rows.append(dict(key=e.key, device=prof.key, cache=e.cache, ratio=ratio, passed=ratio <= 1 + tolerance,
                         pick=e.configs[pick]))
    judged = len(rows)
    off = anchors_off(default_anchors() if anchors is None else anchors, constants)
    return dict(passed=sum(r["passed"] for r in rows), judged=judged, anchors_off=off,
                mean_log_ratio=sum(math.log(r["ratio"]) for r in rows) / max(judged, 1),
                soft_regret=soft / max(judged, 1),
                worst_ratio=max((r["ratio"] for r in rows), default=None), rows=rows)


def _score(result: dict) -> tuple:
    """What the fit minimises: fewest anchors off, then fewest misses, then the picks' mean log ratio, then the
    soft regret."""
    return (len(result["anchors_off"]), -result["passed"], result["mean_log_ratio"], result["soft_regret"])


def fit(entries: list[Entry], profile=None, start=None, sweeps: int = 3, tolerance: float = 0.10, anchors=None):
    """Coordinate search from `start`, or from each of STARTS keeping the best (default): (best constants,
    their judge result). anchors: as judge's."""
    starts = STARTS if start is None else (start,)
    anchors = default_anchors() if anchors is None else anchors
    return min((_search(entries, profile, s, sweeps, tolerance, anchors) for s in starts),
               key=lambda f: _score(f[1]))


def _search(entries: list[Entry], profile, start, sweeps: int, tolerance: float, anchors):
    """fit's coordinate search from one start."""
    best = start
    best_res = judge(entries, profile, best, tolerance, anchors)
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
                res = judge(entries, profile, cand, tolerance, anchors)
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


def held_out(entries: list[Entry], profile=None, start=None, tolerance: float = 0.10) -> dict:
    """Leave-one-geometry-out: fit on the others (every device), judge the held-out geometry (every device);
    summed over geometries."""
    folds, rows = [], []
    for g in geometries(entries):
        train, test = split(entries, g)
        k, train_res = fit(train, profile, start, tolerance=tolerance,
                           anchors=[a for a in default_anchors() if a.geometry != g])
        res = judge(test, profile, k, tolerance)
        folds.append(dict(held_out=g, constants=k.to_json(), train_passed=train_res["passed"],
                          train_judged=train_res["judged"], passed=res["passed"], judged=res["judged"],
                          worst_ratio=res["worst_ratio"], by_device=by_device(res)))
        rows += res["rows"]
    return dict(passed=sum(f["passed"] for f in folds), judged=sum(f["judged"] for f in folds),
                worst_ratio=max((r["ratio"] for r in rows), default=None), folds=folds, rows=rows)


def by_device(result: dict) -> dict:
    """{device: {"passed", "judged", "worst_ratio"}} of a judge / held_out result's rows."""
    out = {}
    for r in result["rows"]:
        d = out.setdefault(r["device"], dict(passed=0, judged=0, worst_ratio=None))
        d["passed"] += r["passed"]
        d["judged"] += 1
        d["worst_ratio"] = max(d["worst_ratio"] or 0.0, r["ratio"])
    return out


def calibrate(cache_paths=None, profile=None, tolerance: float = 0.10, compiled: bool = False) -> dict:
    """The shipped constants' result, the in-sample fit (what to ship) and the leave-one-geometry-out judgement
    (both fits from STARTS) on the entries of `cache_paths` (a path or a list; default fit_cache_paths()), jointly,
    each with its counts per device; with compiled, on the compiled resource usage (load_entries). profile:
    force one profile for a single cache (default: each cache's device)."""
    if isinstance(cache_paths, str):
        cache_paths = [cache_paths]
    cache_paths = list(cache_paths or fit_cache_paths())
    if profile is not None:
        if len(cache_paths) != 1:
            raise ValueError("calibrate: a forced profile applies to one cache only")
        entries = load_entries(cache_paths[0], compiled, profile)[0]
    else:
        entries = load_caches(cache_paths, compiled)
    shipped = judge(entries, None, model.CONSTANTS, tolerance)
    k, res = fit(entries, None, tolerance=tolerance)
    ho = held_out(entries, None, tolerance=tolerance)

    def summary(r):
        return dict(passed=r["passed"], judged=r["judged"], worst_ratio=r["worst_ratio"], by_device=by_device(r))
    return dict(caches=[os.path.basename(p) for p in cache_paths], tolerance=tolerance,
                shipped=dict(constants=model.CONSTANTS.to_json(), **summary(shipped)),
                fitted=dict(constants=k.to_json(), **summary(res)),
                held_out=dict(folds=ho["folds"], **summary(ho)), held_out_rows=ho["rows"])


# model.py's docstring paragraph that ship() rewrites: from this phrase to the next blank line.
FIT_PARAGRAPH = "Current fit"


def rounded(k: model.Constants) -> model.Constants:
    """`k` to 4 significant digits, as ship() writes it into model.py."""
    return replace(k, **{f.name: float(f"{getattr(k, f.name):.4g}") for f in fields(k)})


def _rewrite(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_constants(k: model.Constants, path: str | None = None) -> None:
    """Write `k` as the defaults of model.Constants in model.py's source."""
    path = path or model.__file__
    with open(path) as f:
        src = f.read()
    for f_ in fields(k):
        src, hits = re.subn(rf"^(    {f_.name}: float = )\S+$", rf"\g<1>{getattr(k, f_.name)!r}", src, flags=re.M)
        if hits != 1:
            raise RuntimeError(f"{path}: no single default for Constants.{f_.name} to rewrite")
    _rewrite(path, src)


def fit_paragraph(reports: list[dict]) -> str:
    """The "Current fit" paragraph of model.py's docstring from the validation reports of FIT_CACHES
    (validate.validate(..., held_out=True), as written to autotune/caches/validation)."""
    tol = reports[0]["summary"]["tolerance"]
    judged = sum(r["summary"]["judged"] for r in reports)
    caches = "; ".join(f"{r['summary']['device']['fingerprint']}.json: {r['summary']['judged']} of its "
                       f"{r['summary']['entries']}" for r in reports)
    devs = []
    for r in reports:
        s, h = r["summary"], r["summary"]["held_out"]
        devs.append(f"{s['device']['name']} {s['passed']}/{s['judged']} (worst {s['worst_ratio']:.3f}), held out "
                    f"{h['passed']}/{h['judged']} (worst {h['worst_ratio']:.3f})")
    text = (f"{FIT_PARAGRAPH} (`python -m deco_kernels.autotune.calibrate --ship`): the constants below are the fit "
            f"on the {judged} entries with at least two measured candidates ({caches}), with the estimated "
            f"registers. Model picks within {tol:.0%} of the measured best, in-sample and held out "
            f"(leave-one-geometry-out): " + "; ".join(devs) + ".")
    return textwrap.fill(text, width=115, break_on_hyphens=False, break_long_words=False)


def write_fit_paragraph(text: str, path: str | None = None) -> None:
    """Replace the "Current fit" paragraph of model.py's docstring by `text`."""
    path = path or model.__file__
    with open(path) as f:
        src = f.read()
    doc_end = src.index('"""', 3)
    start = src.find(FIT_PARAGRAPH + " (", 0, doc_end)
    if start < 0:
        raise RuntimeError(f"{path}: no {FIT_PARAGRAPH!r} paragraph in the module docstring")
    end = src.index("\n\n", start)
    _rewrite(path, src[:start] + text + src[end:])


def regenerate_orin(out_dir: str | None = None) -> list[dict]:
    """`deco-kernels tune --preset all --modelled <every Orin profile> --out out_dir` (default: the shipped
    caches); refuses to write entries that were not checked by compiling for sm_87."""
    from . import compile as C
    from . import tune
    from .launches import record
    from .lookup import SHIPPED_DIR

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("calibrate --ship: unset TRITON_INTERPRET (the Orin caches need compile-only checks)")
    args = argparse.Namespace(preset="all", shape=[], tokens="buckets", kernels=",".join(tune.KERNELS),
                              dtype="bfloat16", modelled=",".join(devices.ORIN_KEYS), compile_top=4, seed=0)
    tasks = tune.tasks_of(args)
    try:   # one compile first: without a compiler there are no modelled caches to ship
        C.compile_launch(record(tasks[0]["path"], {}, tasks[0]["T"], *tasks[0]["geom"])[0], (8, 7))
    except C.CompileUnavailable as e:
        raise SystemExit(f"calibrate --ship: cannot compile for sm_87 here ({e})") from e
    return tune.run_modelled(args, tasks, tune.DTYPES[args.dtype], out_dir or SHIPPED_DIR)


def ship(orin: bool = True, tolerance: float = 0.10) -> dict:
    """Refit and regenerate everything that depends on the constants (see the module docstring); returns
    {"constants", "validation": {cache: summary}}."""
    from . import validate

    paths = fit_cache_paths()
    entries = load_caches(paths)
    # The searches from STARTS and from the shipped constants: a local search can end below where the constants
    # it would replace already stand (2026-12-03: 43 of 51 entries from START, 44 with the shipped ones).
    fits = [fit(entries, None, tolerance=tolerance), fit(entries, None, start=model.CONSTANTS, tolerance=tolerance)]
    k = rounded(min(fits, key=lambda f: _score(f[1]))[0])
    write_constants(k)
    model.CONSTANTS = k          # this process validates and models with them too
    reports, out = [], {}
    for p in paths:
        report = validate.validate(p, tolerance=tolerance, held_out=True, fit_caches=paths)
        folder = os.path.join(os.path.dirname(p), "validation")
        os.makedirs(folder, exist_ok=True)
        validate.write_report(report, os.path.join(folder, os.path.basename(p)))
        print(validate.format_table(report))
        reports.append(report)
        out[os.path.basename(p)] = {x: report["summary"][x] for x in ("passed", "judged", "worst_ratio")}
        out[os.path.basename(p)]["held_out"] = {x: report["summary"]["held_out"][x]
                                                for x in ("passed", "judged", "worst_ratio")}
    write_fit_paragraph(fit_paragraph(reports))
    if orin:
        regenerate_orin()
    return dict(constants=k.to_json(), validation=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", nargs="*", help="measured tune caches (JSON), fitted jointly; default: FIT_CACHES")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--compiled-usage", action="store_true",
                   help="compile every measured candidate for the device's arch (cached) and give the model its "
                        "registers, shared memory and spills instead of the estimates")
    p.add_argument("--ship", action="store_true",
                   help="refit on FIT_CACHES and write the constants into model.py, both validation tables, the "
                        "docstring's fit paragraph and the modelled Orin caches")
    p.add_argument("--no-orin", action="store_true", help="with --ship: leave the Orin caches as they are")
    args = p.parse_args(argv)
    if args.ship:
        if args.cache or args.compiled_usage:
            p.error("--ship fits FIT_CACHES with the estimated registers: give no caches and no --compiled-usage")
        print(json.dumps(ship(orin=not args.no_orin, tolerance=args.tolerance), indent=1))
        return 0
    r = calibrate(args.cache or None, tolerance=args.tolerance, compiled=args.compiled_usage)
    print(json.dumps({k: v for k, v in r.items() if k != "held_out_rows"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
