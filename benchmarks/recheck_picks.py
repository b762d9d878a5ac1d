"""Re-measure the cost model's picks against the tune's measured best, side by side.

A tune times each candidate once, so its measured best is the least of many noisy figures: with 100+
candidates some are lucky draws, and the model-vs-measured table (autotune/caches/validation/) judges the
model's pick against that draw. Here, for every entry of a measured cache whose validation table names a pick
other than the best (in-sample or held out), the best, the in-sample pick and the held-out pick are timed again
on this GPU, interleaved over --rounds rounds (each a CUDA-graph replay median, runner.LayerBench as the tune
uses), and each config's median over the rounds is reported with its ratio to the best's.

    python benchmarks/recheck_picks.py --out recheck_picks.json     # the shipped cache of this GPU
"""
import argparse
import json
import os
import statistics

import torch

from deco_kernels.autotune import devices, lookup, runner
from deco_kernels.autotune.space import as_measured
from deco_kernels.autotune.validate import parse_key
from deco_kernels.benchmark import kernel_times, write_result

ROLES = ("best", "pick", "held_out_pick")


def configs_of(entry: dict, row: dict) -> dict:
    """{role: config} of one entry: the measured best, the model's in-sample and held-out picks."""
    best = min((c for c in entry["candidates"] if c.get("us") is not None), key=lambda c: c["us"])["config"]
    return {"best": best, "pick": row["pick"], "held_out_pick": row.get("held_out_pick") or row["pick"]}


def misses_first(item) -> tuple:
    """Sort key of (key, validation row): in-sample misses, then held-out misses, then the rest, by key."""
    key, row = item
    return (row["passed"], row.get("held_out_passed", row["passed"]), key)


def remeasure(bench, path: str, configs: list[str], rounds: int) -> dict:
    """{config (JSON): [µs of each round]}: every config once per round, interleaved, so drift hits all alike."""
    times = {c: [] for c in configs}
    for _ in range(rounds):
        for c in configs:
            times[c].append(bench.measure(as_measured(path, json.loads(c))))
    return times


def recheck(cache_path: str, rounds: int, keys=None, on_row=None, kernels: bool = False,
            make_bench=runner.LayerBench) -> list[dict]:
    """The re-measured entries, the tune's misses first (misses_first); on_row(rows) after each. Each role's
    "passed": its re-measured ratio within the validation table's tolerance. kernels: also
    each config's per-kernel µs (torch.profiler, eager), to see which launch a miss comes from. make_bench(path,
    T, d, n, de, ds, dtype): the layer on this GPU (a fake in the CPU tests)."""
    with open(cache_path) as f:
        cache = json.load(f)
    table = os.path.join(os.path.dirname(cache_path), "validation", os.path.basename(cache_path))
    with open(table) as f:
        report = json.load(f)
    tolerance = report["summary"]["tolerance"]
    rows = {r["key"]: r for r in report["rows"] if "pick" in r}
    out = []
    for key, row in sorted(rows.items(), key=misses_first):
        if keys and not any(k in key for k in keys):
            continue
        entry = cache["entries"][key]
        cfgs = configs_of(entry, row)
        distinct = list(dict.fromkeys(json.dumps(c, sort_keys=True) for c in cfgs.values()))
        if len(distinct) == 1:
            continue                                   # the model picked the best: nothing to re-measure
        path, d, n, de, ds, dtype, _ = parse_key(key)
        bench = make_bench(path, entry["T"], d, n, de, ds, dtype)
        times = remeasure(bench, path, distinct, rounds)
        median = {c: statistics.median(v) for c, v in times.items()}
        best_us = median[json.dumps(cfgs["best"], sort_keys=True)]
        res = dict(key=key, T=entry["T"], rounds=rounds,
                   tune_ratio=dict(pick=row["ratio"], held_out_pick=row.get("held_out_ratio", row["ratio"])))
        for role in ROLES:
            c = json.dumps(cfgs[role], sort_keys=True)
            res[role] = dict(config=cfgs[role], us=median[c], spread_us=[min(times[c]), max(times[c])],
                             ratio=median[c] / best_us, passed=median[c] <= (1 + tolerance) * best_us)
            if kernels:
                with torch.no_grad():
                    res[role]["kernels_us"] = kernel_times(lambda: bench.run(as_measured(path, cfgs[role])), 20)
        out.append(res)
        print(f"{key:55s} best {best_us:7.1f}  pick {res['pick']['ratio']:.3f} (tune {row['ratio']:.3f})  "
              f"held out {res['held_out_pick']['ratio']:.3f} (tune {res['tune_ratio']['held_out_pick']:.3f})",
              flush=True)
        del bench
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if on_row:
            on_row(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="a measured tune cache, its validation table beside it (default: the shipped "
                   "cache of this GPU)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--keys", nargs="*", help="only entries whose key contains one of these")
    p.add_argument("--kernels", action="store_true", help="also each config's per-kernel µs (torch.profiler)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    args.cache = args.cache or os.path.join(lookup.SHIPPED_DIR, devices.describe_device()["fingerprint"] + ".json")

    def save(rows):     # after every entry: a run cut by a time limit keeps what it measured
        if args.out:
            write_result(args.out, cache=os.path.basename(args.cache), rounds=args.rounds, rows=rows)

    rows = recheck(args.cache, args.rounds, args.keys, on_row=save, kernels=args.kernels)
    for role in ("pick", "held_out_pick"):
        ok = sum(r[role]["passed"] for r in rows)
        print(f"{role}: {ok}/{len(rows)} re-measured entries within the validation's tolerance of the best")


if __name__ == "__main__":
    main()
