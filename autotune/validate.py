"""Model vs measured: for each tuned entry of a measured cache, is the cost model's pick within 10% of the
measured best?

Among the candidates an entry measured (the cache keeps all of them), the model's pick is the one with the
lowest predicted µs on the device's profile (devices.profile_for the cache's device, or the profile given);
its measured µs over the best measured µs is the ratio, and the entry passes when ratio <= 1 + tolerance.
Entries with fewer than two measured candidates are listed but not judged. The in-sample count uses the shipped
constants, which were fitted on this very data (calibrate.py); the held-out count (validate(..., held_out=True),
what `deco-kernels tune --validate-cache` prints) refits them leaving each layer geometry out in turn. Caveat: the tuner measures the
model's top candidates first (interleaved with random ones), so a small budget favours the model.
"""
from __future__ import annotations

import json
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


def validate(cache_path: str, profile=None, tolerance: float = 0.10, held_out: bool = False) -> dict:
    """The model-vs-measured table of a measured cache; with held_out, also the leave-one-geometry-out result
    of refitting the model's constants (calibrate.py) under report["summary"]["held_out"]."""
    data = load(cache_path, check_versions=False)
    profile = profile or devices.profile_for(data["device"])
    rows = []
    for key, entry in sorted(data["entries"].items()):
        path, d, n, de, ds, dtype, bucket = parse_key(key)
        T = entry.get("T") or representative_t(bucket)
        measured = [c for c in entry.get("candidates", []) if c.get("us") is not None]
        for c in measured:
            try:
                c["model_now"] = model.predict(path, c["config"], T, d, n, de, ds, dtype, profile)
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
    judged = [r for r in rows if "ratio" in r]
    summary = dict(device=data["device"], profile=profile.key, tolerance=tolerance, entries=len(rows),
                   judged=len(judged), passed=sum(r["passed"] for r in judged),
                   worst_ratio=max((r["ratio"] for r in judged), default=None), constants=model.CONSTANTS.to_json())
    if held_out:
        from . import calibrate

        entries, _ = calibrate.load_entries(cache_path)
        ho = calibrate.held_out(entries, profile, tolerance=tolerance)
        summary["held_out"] = {k: v for k, v in ho.items() if k != "rows"}
        for r in rows:
            for h in ho["rows"]:
                if h["key"] == r["key"]:
                    r.update(held_out_ratio=h["ratio"], held_out_passed=h["passed"], held_out_pick=h["pick"])
    return dict(summary=summary, rows=rows)


def format_table(report: dict) -> str:
    s = report["summary"]
    lines = [f"model vs measured on {s['device']['name']} (profile {s['profile']}): {s['passed']}/{s['judged']} "
             f"entries within {s['tolerance']:.0%} of the measured best (in-sample: the shipped constants)"]
    ho = s.get("held_out")
    if ho:
        lines.append(f"held out (constants refitted without the entry's geometry, leave-one-geometry-out): "
                     f"{ho['passed']}/{ho['judged']} within {s['tolerance']:.0%}, worst ratio {ho['worst_ratio']:.3f}")
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
