"""Compare two `deco-kernels bench` results (bench.json): is the second a reproduction of the first?

    python benchmarks/compare_bench.py benchmarks/results/h100/bench.json benchmarks/results/h100/bench_repeat.json

Every timed figure present in both files is paired: the layer rows (preset, T, backend; eager and, where
present, under CUDA graphs), the active-ratio rows (preset, T, target ratio, backend), the training rows
(preset, T, backend; eager and GPU-busy) and the whole-model figures (preset, model, figure). For each pair
the relative change (b - a) / a is printed; the summary gives the median and the largest |change| of each
part and the pairs beyond ``--tolerance``.

Figures come in two clocks. "device" figures time the GPU alone: CUDA-graph replays and GPU-busy times
(torch.profiler). "host" figures time eager calls, whose host launch work moves with the load of the lent
machine's CPU (up to 2x between runs). The exit status judges the device figures (``--all``: every figure):
0 when each is within the tolerance, 1 otherwise, 2 when the two files were measured on different GPUs (not
comparable). Host figures beyond the tolerance are listed either way.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

MODEL_FIGURES = ("decode_us", "prefill_us", "train_step_us", "train_step_gpu_us")


def timed_figures(result: dict) -> dict[tuple, tuple[float, str]]:
    """{(part, ...labels): (µs, clock)} of every timed figure in a bench.json; clock "device" (CUDA graph or
    GPU-busy) or "host" (an eager call)."""
    out = {}
    for row in result.get("rows", []):
        for name, us in row["us"].items():
            out[("layer", row["preset"], row["T"], name)] = (us, "device" if row.get("graph") and name != "torch"
                                                             else "host")
        for name, us in row.get("graph_us", {}).items():
            out[("layer_graph", row["preset"], row["T"], name)] = (us, "device")
    for row in result.get("ratio", {}).get("rows", []):
        for name, us in row["us"].items():
            out[("ratio", row["preset"], row["T"], row["target_ratio"], name)] = (us, "device" if row.get("graph")
                                                                                    else "host")
    for row in result.get("train", {}).get("rows", []):
        for name, us in row["us"].items():
            out[("train", row["preset"], row["T"], name)] = (us, "host")
        for name, us in row.get("gpu_us", {}).items():
            out[("train_gpu", row["preset"], row["T"], name)] = (us, "device")
    for row in result.get("model", {}).get("rows", []):
        for model in ("deco", "dense_twin"):
            figures = row.get(model, {})
            for fig in MODEL_FIGURES:
                value = figures.get(fig)
                if value is not None:
                    method = figures.get(fig.replace("_us", "_method"))
                    device = fig == "train_step_gpu_us" or method == "cuda_graph"
                    out[("model", row["preset"], model, fig)] = (value, "device" if device else "host")
    return {k: v for k, v in out.items() if v[0] is not None and v[0] > 0}


def compare(a: dict, b: dict, tolerance: float) -> dict:
    fa, fb = timed_figures(a), timed_figures(b)
    # a figure timed on different clocks in the two files (e.g. prefill before it ran under a graph) is no pair
    both = [key for key in fa if key in fb and fa[key][1] == fb[key][1]]
    pairs = [(key, fa[key][0], fb[key][0], (fb[key][0] - fa[key][0]) / fa[key][0], fa[key][1]) for key in both]
    parts = {}
    for key, _, _, change, clock in pairs:
        parts.setdefault(f"{key[0]} ({clock})", []).append(abs(change))
    summary = {part: dict(pairs=len(v), median_abs_change=statistics.median(v), max_abs_change=max(v))
               for part, v in parts.items()}
    beyond = [dict(key=list(k), a_us=x, b_us=y, change=c, clock=clock)
              for k, x, y, c, clock in pairs if abs(c) > tolerance]
    return dict(gpu=[a["environment"]["gpu"], b["environment"]["gpu"]],
                dates=[a["environment"]["date"], b["environment"]["date"]], tolerance=tolerance,
                pairs=len(pairs), only_in_one=len(set(fa) ^ set(fb)), other_clock=len(set(fa) & set(fb)) - len(both),
                parts=summary, beyond_tolerance=beyond)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest |relative change| counted as noise")
    p.add_argument("--out", help="also write the comparison as JSON here")
    p.add_argument("--all", action="store_true", help="judge the host (eager) figures too")
    args = p.parse_args(argv)
    with open(args.first) as f:
        a = json.load(f)
    with open(args.second) as f:
        b = json.load(f)
    if a["environment"]["gpu"] != b["environment"]["gpu"]:
        print(f"different GPUs: {a['environment']['gpu']} vs {b['environment']['gpu']}", file=sys.stderr)
        return 2
    report = compare(a, b, args.tolerance)
    print(f"{report['pairs']} timed figures in both ({report['only_in_one']} in one only, "
          f"{report['other_clock']} on different clocks), "
          f"{report['gpu'][0]}, {report['dates'][0][:19]} vs {report['dates'][1][:19]}")
    for part, s in report["parts"].items():
        print(f"  {part:20} {s['pairs']:3} figures: median |change| {s['median_abs_change']:.1%}, "
              f"max {s['max_abs_change']:.1%}")
    for item in report["beyond_tolerance"]:
        print(f"  beyond {args.tolerance:.0%} ({item['clock']}): {' '.join(map(str, item['key']))}: "
              f"{item['a_us']:.1f} -> {item['b_us']:.1f} µs ({item['change']:+.1%})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    judged = [i for i in report["beyond_tolerance"] if args.all or i["clock"] == "device"]
    return 0 if not judged else 1


if __name__ == "__main__":
    sys.exit(main())
