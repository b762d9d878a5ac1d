"""Model vs measured: for each tuned entry of a measured cache, is the cost model's pick within 10% of the
measured best?

Among the candidates an entry measured (the cache keeps all of them), the model's pick is the one with the
lowest predicted µs on the device's profile (devices.profile_for the cache's device, or the profile given);
its measured µs over the best measured µs is the ratio, and the entry passes when ratio <= 1 + tolerance.
Entries with fewer than two measured candidates are listed but not judged. The in-sample count uses the shipped
constants, which were fitted on this very data and the other measured caches (calibrate.FIT_CACHES); the
held-out count (validate(..., held_out=True), what `deco-kernels tune --validate-cache` prints) refits them,
jointly on this cache and the shipped measured caches as calibrate.py does, leaving each layer geometry out in
turn on every device, and counts this cache's entries.

With compiled=True (`--compiled-usage`), each measured candidate's kernels are compiled for the cache device's
arch with the local Triton (compile.UsageCache, kept in validation/<fingerprint>.usage.json) and the model takes
the compiled registers, shared memory and spills instead of its estimates; the local Triton may differ from the
one that measured (the report says both). It is off by default: on the H100 cache it does not improve the
held-out result (see model.py).
Caveat: the tuner measures the model's top candidates first (interleaved with random ones), so a small budget
favours the model.
"""
from __future__ import annotations

import json
import os
import re

from . import devices, model
from .buckets import representative_t
from .cache import load

_GEOM = re.compile(r"d(\d+)_n(\d+)_de(\d+)_ds(\d+)_(\w+)")
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_key(key: str):
    path, geom, bucket = key.split("/")
    d, n, de, ds, dt = _GEOM.fullmatch(geom).groups()
    import torch

    return path, int(d), int(n), int(de), int(ds), getattr(torch, _DTYPES[dt]), bucket


def usage_cache(cache_path: str, data: dict, compiled: bool = True):
    """The compile-usage cache of a measured cache's device (compile.UsageCache at validation/<fingerprint>.usage
    .json next to it, for the device's arch), or None when compiled is False (the model estimates registers)."""
    if not compiled:
        return None
    from .compile import UsageCache

    folder = os.path.join(os.path.dirname(os.path.abspath(cache_path)), "validation")
    return UsageCache(os.path.join(folder, f"{data['device']['fingerprint']}.usage.json"),
                      data["device"]["capability"])


def usage_summary(uc, data: dict) -> dict:
    import triton

    if uc is None:
        return dict(compiled=False)
    return dict(compiled=uc.unavailable is None or uc.hits > 0, file=os.path.basename(uc.path), hits=uc.hits,
                new_compiles=uc.compiled, unavailable=uc.unavailable, compiled_with_triton=triton.__version__,
                measured_with_triton=data.get("versions", {}).get("triton"),
                arch="sm_{}{}".format(*data["device"]["capability"]))


def validate(cache_path: str, profile=None, tolerance: float = 0.10, held_out: bool = False,
             compiled: bool = False, fit_caches=None) -> dict:
    """The model-vs-measured table of a measured cache; with held_out, also the leave-one-geometry-out result
    of refitting the model's constants (calibrate.py) under report["summary"]["held_out"], fitted jointly on
    this cache and `fit_caches` (default: the shipped measured caches, calibrate.fit_cache_paths(); [] for
    this cache alone) and counted on this cache's entries (all_caches: on all of them). With compiled, every
    measured candidate's kernels are compiled for the device's arch (cached, see usage_cache) and the model
    takes their registers, shared memory and spills instead of its estimates."""
    from .launches import record
    from .space import as_measured

    data = load(cache_path, check_versions=False)
    profile = profile or devices.profile_for(data["device"])
    uc = usage_cache(cache_path, data, compiled)
    rows = []
    for key, entry in sorted(data["entries"].items()):
        path, d, n, de, ds, dtype, bucket = parse_key(key)
        T = entry.get("T") or representative_t(bucket)
        measured = [c for c in entry.get("candidates", []) if c.get("us") is not None]
        for c in measured:
            try:
                launches = record(path, as_measured(path, c["config"]), T, d, n, de, ds, dtype)
                usage = uc.usage(launches) if uc else None
                c["model_now"] = model.predict(path, c["config"], T, d, n, de, ds, dtype, profile, usage=usage,
                                               launches=launches)
            except Exception:  # noqa: BLE001 - a config the current launcher rejects cannot be modelled
                c["model_now"] = None
        scored = [c for c in measured if c["model_now"] is not None]
        row = dict(key=key, path=path, bucket=bucket, measured=len(measured))
        if len(scored) >= 2:
            best = min(scored, key=lambda c: c["us"])
            pick = min(scored, key=lambda c: c["model_now"])
            row.update(best_us=best["us"], pick_us=pick["us"], pick_model_us=pick["model_now"],
                       default_us=entry.get("default_us"), ratio=pick["us"] / best["us"],
                       passed=pick["us"] <= (1 + tolerance) * best["us"], pick=pick["config"])
        rows.append(row)
    if uc:
        uc.save()
    judged = [r for r in rows if "ratio" in r]
    summary = dict(device=data["device"], profile=profile.key, tolerance=tolerance, entries=len(rows),
                   judged=len(judged), passed=sum(r["passed"] for r in judged),
                   worst_ratio=max((r["ratio"] for r in judged), default=None), constants=model.CONSTANTS.to_json(),
                   usage=usage_summary(uc, data))
    if held_out:
        from . import calibrate

        fit_with = calibrate.fit_cache_paths() if fit_caches is None else list(fit_caches)
        here = os.path.abspath(cache_path)
        entries = calibrate.load_entries(here, compiled, profile)[0]
        others = [p for p in dict.fromkeys(os.path.abspath(p) for p in fit_with) if p != here]
        entries += calibrate.load_caches(others, compiled)
        ho = calibrate.held_out(entries, None, tolerance=tolerance)
        mine = [h for h in ho["rows"] if h["cache"] == here]
        summary["held_out"] = dict(
            passed=sum(h["passed"] for h in mine), judged=len(mine),
            worst_ratio=max((h["ratio"] for h in mine), default=None),
            fitted_on=[os.path.basename(p) for p in [here] + others],
            all_caches=dict(passed=ho["passed"], judged=ho["judged"], worst_ratio=ho["worst_ratio"],
                            by_device=calibrate.by_device(ho)),
            folds=ho["folds"])
        for r in rows:
            for h in mine:
                if h["key"] == r["key"]:
                    r.update(held_out_ratio=h["ratio"], held_out_passed=h["passed"], held_out_pick=h["pick"])
    return dict(summary=summary, rows=rows)


def sweep_report(sweep_path: str) -> list[dict]:
    """The cost model against a benchmarks/sweep_tiles.py result (measured µs of bf16 configs of a preset at a
    few T on one GPU): per T, the model's pick's measured µs over the best measured and the rank correlation of
    predicted and measured µs. A check of the kernels' model where no tune cache measured them yet."""
    import torch

    from deco_kernels.config import DecoConfig

    from .buckets import path_of

    with open(sweep_path) as f:
        data = json.load(f)
    profile = devices.profile_of_environment(data["environment"])
    c = DecoConfig.preset(data["preset"])
    geom = (c.d_model, c.num_experts, c.expert_dim, c.shared_dim)
    out = []
    for T in sorted({r["T"] for r in data["rows"]}):
        measured = {}
        for r in data["rows"]:
            if r["T"] == T and r.get("us"):
                key = tuple(sorted(r["cfg"].items()))
                measured[key] = min(measured.get(key, r["us"]), r["us"])
        cfgs, us = [dict(k) for k in measured], list(measured.values())
        pred = [model.predict(path_of(T), cfg, T, *geom, torch.bfloat16, profile) for cfg in cfgs]
        pick = min(range(len(cfgs)), key=lambda i: pred[i])
        out.append(dict(preset=data["preset"], T=T, profile=profile.key, configs=len(cfgs), best_us=min(us),
                        pick_us=us[pick], ratio=us[pick] / min(us), spearman=_spearman(pred, us), pick=cfgs[pick]))
    return out


def _spearman(a: list, b: list) -> float:
    def ranks(x):
        r = [0] * len(x)
        for k, i in enumerate(sorted(range(len(x)), key=lambda i: x[i])):
            r[i] = k
        return r
    n = len(a)
    return 1.0 - 6.0 * sum((x - y) ** 2 for x, y in zip(ranks(a), ranks(b))) / (n * (n * n - 1)) if n > 1 else 1.0


def format_table(report: dict) -> str:
    s = report["summary"]
    lines = [f"model vs measured on {s['device']['name']} (profile {s['profile']}): {s['passed']}/{s['judged']} "
             f"entries within {s['tolerance']:.0%} of the measured best (in-sample: the shipped constants)"]
    u = s.get("usage", {})
    if u.get("compiled"):
        lines.append(f"registers and shared memory compiled for {u['arch']} with Triton {u['compiled_with_triton']} "
                     f"(measured with Triton {u['measured_with_triton']}); {u['new_compiles']} new compiles, "
                     f"{u['hits']} cache hits ({u['file']})")
    elif u:
        lines.append("registers and shared memory: the model's estimates"
                     + (f" (cannot compile here: {u['unavailable']})" if u.get("unavailable") else ""))
    ho = s.get("held_out")
    if ho:
        lines.append(f"held out (constants refitted without the entry's geometry on any device, leave-one-geometry-"
                     f"out, fitted on {', '.join(ho.get('fitted_on', []))}): {ho['passed']}/{ho['judged']} within "
                     f"{s['tolerance']:.0%}, worst ratio {ho['worst_ratio']:.3f}")
    lines.append(f"{'entry':58} {'n':>3} {'best µs':>9} {'model pick µs':>13} {'ratio':>6} ok"
                 + ("  held-out ratio" if ho else ""))
    for r in report["rows"]:
        if "ratio" in r:
            extra = (f"  {r['held_out_ratio']:>6.3f} {'yes' if r['held_out_passed'] else 'NO'}"
                     if "held_out_ratio" in r else "")
            lines.append(f"{r['key']:58} {r['measured']:>3} {r['best_us']:>9.1f} {r['pick_us']:>13.1f} "
                         f"{r['ratio']:>6.3f} {'yes' if r['passed'] else 'NO'}{extra}")
        else:
            lines.append(f"{r['key']:58} {r['measured']:>3} {'-':>9} {'-':>13} {'-':>6} (too few measured)")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
