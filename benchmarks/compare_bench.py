"""Compare two `deco-kernels bench` results (bench.json): is the second a reproduction of the first?

    python benchmarks/compare_bench.py benchmarks/results/h100/bench.json benchmarks/results/h100/bench_repeat.json

Every timed figure present in both files is paired: the layer rows (preset, T, backend; eager and, where
present, under CUDA graphs), the active-ratio rows (preset, T, target ratio, backend), the training rows
(preset, T, backend; eager and GPU-busy) and the whole-model figures (preset, model, figure). For each pair
the relative change (b - a) / a is printed; the summary gives the median and the largest |change| of each
part and the pairs beyond ``--tolerance``. Exit status 0 when every pair is
within the tolerance, 1 otherwise, 2 when the two files were measured on different GPUs (not comparable).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

MODEL_FIGURES = ("decode_us", "prefill_us", "train_step_us", "train_step_gpu_us")


def timed_figures(result: dict) -> dict[tuple, float]:
    """{(part, ...labels): µs} of every timed figure in a bench.json."""
    out = {}
    for row in result.get("rows", []):
        for name, us in row["us"].items():
            out[("layer", row["preset"], row["T"], name)] = us
        for name, us in row.get("graph_us", {}).items():
            out[("layer_graph", row["preset"], row["T"], name)] = us
    for row in result.get("ratio", {}).get("rows", []):
        for name, us in row["us"].items():
            out[("ratio", row["preset"], row["T"], row["target_ratio"], name)] = us
    for row in result.get("train", {}).get("rows", []):
        for name, us in row["us"].items():
            out[("train", row["preset"], row["T"], name)] = us
        for name, us in row.get("gpu_us", {}).items():
            out[("train_gpu", row["preset"], row["T"], name)] = us
    for row in result.get("model", {}).get("rows", []):
        for model in ("deco", "dense_twin"):
            for fig in MODEL_FIGURES:
                value = row.get(model, {}).get(fig)
                if value is not None:
                    out[("model", row["preset"], model, fig)] = value
    return {k: v for k, v in out.items() if v is not None and v > 0}


def compare(a: dict, b: dict, tolerance: float) -> dict:
    fa, fb = timed_figures(a), timed_figures(b)
    pairs = [(key, fa[key], fb[key], (fb[key] - fa[key]) / fa[key]) for key in fa if key in fb]
    parts = {}
    for key, _, _, change in pairs:
        parts.setdefault(key[0], []).append(abs(change))
    summary = {part: dict(pairs=len(v), median_abs_change=statistics.median(v), max_abs_change=max(v))
               for part, v in parts.items()}
    beyond = [dict(key=list(k), a_us=x, b_us=y, change=c) for k, x, y, c in pairs if abs(c) > tolerance]
    return dict(gpu=[a["environment"]["gpu"], b["environment"]["gpu"]],
                dates=[a["environment"]["date"], b["environment"]["date"]], tolerance=tolerance,
                pairs=len(pairs), only_in_one=len(set(fa) ^ set(fb)), parts=summary, beyond_tolerance=beyond)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest |relative change| counted as noise")
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    with open(args.first) as f:
        a = json.load(f)
    with open(args.second) as f:
        b = json.load(f)
    if a["environment"]["gpu"] != b["environment"]["gpu"]:
        print(f"different GPUs: {a['environment']['gpu']} vs {b['environment']['gpu']}", file=sys.stderr)
        return 2
    report = compare(a, b, args.tolerance)
    print(f"{report['pairs']} timed figures in both ({report['only_in_one']} in one only), "
          f"{report['gpu'][0]}, {report['dates'][0][:19]} vs {report['dates'][1][:19]}")
    for part, s in report["parts"].items():
        print(f"  {part:6} {s['pairs']:3} figures: median |change| {s['median_abs_change']:.1%}, "
              f"max {s['max_abs_change']:.1%}")
    for item in report["beyond_tolerance"]:
        print(f"  beyond {args.tolerance:.0%}: {' '.join(map(str, item['key']))}: {item['a_us']:.1f} -> "
              f"{item['b_us']:.1f} µs ({item['change']:+.1%})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0 if not report["beyond_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
