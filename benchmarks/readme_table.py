"""Render a benchmark JSON (``deco-kernels bench``'s bench.json, or an earlier layer-only JSON) as the README's
results block, between the RESULTS markers. Nothing in the block is typed by hand.

    python benchmarks/readme_table.py benchmarks/results/h100/bench.json --write README.md
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch

from deco_kernels.benchmark import output_off

BEGIN, END = "<!-- RESULTS:BEGIN (benchmarks/readme_table.py) -->", "<!-- RESULTS:END -->"
KERNELS = ("triton", "cupy")
PLOTS = (("speedup_vs_T.png", "speed-up vs T"), ("fraction_of_floor.png", "fraction of floor"),
         ("decode_latency_vs_active_ratio.png", "decode latency vs active ratio"), ("model.png", "whole model"))


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def header(result: dict) -> str:
    env = result["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cupy") if k in env)
    text = (f"Measured on {env['gpu']} (sm_{env['capability'].replace('.', '')}), {versions}, {env['date'][:10]}; "
            f"{result['dtype']}; copy {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul "
            f"{result['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    if "two_empty_launches_us" in result:
        text += (f"; a CUDA graph of two empty Triton launches replays in {result['two_empty_launches_us']:.1f} µs "
                 f"(the least a two-launch layer can take)")
    return text + "."


def layer_table(result: dict) -> str:
    rows = result["rows"]
    kernels = [k for k in KERNELS if any(k in r.get("us", {}) for r in rows)]
    names = ["dense_twin"] + (["torch"] if any("torch" in r.get("us", {}) for r in rows) else []) + kernels
    graphs = any("graph_us" in r for r in rows)
    graph_max = result.get("graph_max_tokens", 8)
    timing = f"µs: {result['timing']}" if "timing" in result else "µs are medians"
    lines = [f"One layer, ~20% of experts active; {timing}; T <= {graph_max} under CUDA graphs, larger T "
             "eagerly (host launch cost included)"
             + ("; the last columns time every T under CUDA graphs (the kernels' own time)." if graphs else "."),
             "",
             "| preset | T | " + " | ".join(f"{n} µs" for n in names) + " | "
             + " | ".join(f"{k} vs dense | {k} fraction of floor" for k in kernels)
             + ("".join(f" | {n} µs, graph" for n in ["dense_twin", *kernels])
                + "".join(f" | {k} vs dense, graph" for k in kernels) if graphs else "") + " |",
             "|" + "---|" * (2 + len(names) + 2 * len(kernels) + (1 + 2 * len(kernels) if graphs else 0))]
    for r in rows:
        us, speedup, floor = r.get("us", {}), r.get("speedup_vs_dense", {}), r.get("fraction_of_floor", {})
        cells = [r["preset"], str(r["T"])] + [_f(us.get(n), ".1f") for n in names]
        for k in kernels:
            cells += [_f(speedup.get(k), ".2f") + ("x" if k in speedup else ""), _f(floor.get(k), ".2f")]
        if graphs:  # rows timed under graphs already repeat their own figures here
            gus = us if r.get("graph") else r.get("graph_us", {})
            gspeed = speedup if r.get("graph") else r.get("graph_speedup_vs_dense", {})
            cells += [_f(gus.get(n), ".1f") for n in ["dense_twin", *kernels]]
            cells += [_f(gspeed.get(k), ".2f") + ("x" if k in gspeed else "") for k in kernels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(result: dict) -> str:
    part = result["model"]
    rows = part["rows"]
    first = next((r["deco"] for r in rows if "decode_context" in r.get("deco", {})), {})
    busy = any("train_step_gpu_us" in r.get(m, {}) for r in rows for m in ("deco", "dense_twin"))
    graphed = any("train_graph_tokens_per_s" in r.get(m, {}) for r in rows for m in ("deco", "dense_twin"))
    lines = [f"Whole model, DECO vs the dense-twin model, routers calibrated to ~{100 * part['target_ratio']:.0f}% "
             f"active: batch-1 decode after {first.get('decode_context', '?')} cached tokens "
             f"({first.get('decode_method', '?').replace('_', ' ')}), prefill of {first.get('prefill_tokens', '?')} "
             f"tokens ({first.get('prefill_method', 'eager').replace('_', ' ')}), training step (forward, backward, "
             f"AdamW) on {first.get('train_tokens', '?')} tokens. The "
             f"floor ratio is the weights read per decoded token, dense over DECO (attention, the embedding row "
             f"and the LM head do not shrink); the fraction is the measured decode speed-up over it."
             + (" GPU-busy: the step's kernel time from torch.profiler, without the host's share." if busy else "")
             + (" Graph: the same step captured into one CUDA graph and replayed (AdamW with capturable state)."
                if graphed else ""),
             "",
             "| preset | decode active | decode tok/s DECO / dense | decode x | floor ratio | fraction of floor "
             "ratio | prefill tok/s DECO / dense | train tok/s DECO / dense | train peak GiB DECO / dense |"
             + (" train GPU-busy µs DECO / dense |" if busy else "")
             + (" train tok/s graph DECO / dense |" if graphed else ""),
             "|" + "---|" * (9 + busy + graphed)]
    for r in rows:
        deco, dense = r.get("deco", {}), r.get("dense_twin", {})

        def pair(key, fmt, scale=1.0):
            a, b = deco.get(key), dense.get(key)
            return f"{_f(a and a * scale, fmt)} / {_f(b and b * scale, fmt)}"
        cells = [r["preset"], _f(deco.get("decode_active_ratio") and 100 * deco["decode_active_ratio"], ".1f") + "%",
                 pair("decode_tokens_per_s", ".0f"), _f(r.get("decode_speedup"), ".2f"),
                 _f(r.get("floor", {}).get("floor_ratio"), ".2f"), _f(r.get("fraction_of_floor_ratio"), ".2f"),
                 pair("prefill_tokens_per_s", ".0f"), pair("train_tokens_per_s", ".0f"),
                 pair("train_peak_bytes", ".1f", 2.0**-30)] + ([pair("train_step_gpu_us", ".0f")] if busy else [])
        cells += [pair("train_graph_tokens_per_s", ".0f")] if graphed else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_table(result: dict) -> str:
    """One layer's forward + backward (training) at T tokens: µs, speed-up and peak memory per backend."""
    part = result["train"]
    names = [n for n in ("dense_twin", "torch", *KERNELS) if any(n in r.get("us", {}) for r in part["rows"])]
    busy = [n for n in names if any(n in r.get("gpu_us", {}) for r in part["rows"])]
    fast = [n for n in busy if n != "dense_twin"]
    graphed = [n for n in names if any(n in r.get("graph_us", {}) for r in part["rows"])]
    sparse_graphed = [n for n in graphed if n != "dense_twin"]
    lines = [f"One layer, forward + backward on {part.get('tokens', '?')} tokens (x and every weight require grad); "
             "peak memory is the step's own, above what is allocated before it."
             + (" GPU-busy: the kernels' time from torch.profiler, without the host's share." if busy else "")
             + (" Graph: replayed from a CUDA graph (the Triton forward then sizes its pair buffers without a host "
                "synchronisation)." if graphed else ""), "",
             "| preset | " + " | ".join(f"{n} µs" for n in names) + " | "
             + " | ".join(f"{n} vs dense" for n in names if n != "dense_twin") + " | "
             + " | ".join(f"{n} peak MiB" for n in names) + " |"
             + "".join(f" {n} GPU-busy µs |" for n in busy) + "".join(f" {n} vs dense, GPU-busy |" for n in fast)
             + "".join(f" {n} µs, graph |" for n in graphed)
             + "".join(f" {n} vs dense, graph |" for n in sparse_graphed),
             "|" + "---|" * (1 + 2 * len(names) + len([n for n in names if n != "dense_twin"]) + len(busy)
                             + len(fast) + len(graphed) + len(sparse_graphed))]
    for r in part["rows"]:
        us, peak, speed = r.get("us", {}), r.get("peak_bytes", {}), r.get("speedup_vs_dense", {})
        gus, gspeed = r.get("gpu_us", {}), r.get("gpu_speedup_vs_dense", {})
        cus, cspeed = r.get("graph_us", {}), r.get("graph_speedup_vs_dense", {})
        cells = ([r["preset"]] + [_f(us.get(n), ".0f") for n in names]
                 + [_f(speed.get(n), ".2f") + "x" for n in names if n != "dense_twin"]
                 + [_f(peak.get(n) and peak[n] / 2**20, ".0f") for n in names]
                 + [_f(gus.get(n), ".0f") for n in busy] + [_f(gspeed.get(n), ".2f") + "x" for n in fast]
                 + [_f(cus.get(n), ".0f") for n in graphed] + [_f(cspeed.get(n), ".2f") + "x" for n in sparse_graphed])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_line(result: dict) -> str:
    """Decode latency at the lowest and highest active ratio of the sweep, per T and backend."""
    part = result["ratio"]
    rows = [r for r in part["rows"] if r.get("us")]
    out = []
    for T in sorted({r["T"] for r in rows}):
        sel = sorted((r for r in rows if r["T"] == T), key=lambda r: r["active_ratio"])
        lo, hi = sel[0], sel[-1]
        for k in (k for k in KERNELS if k in lo["us"] and k in hi["us"]):
            out.append(f"T={T} {k}: {lo['us'][k]:.1f} µs at {100 * lo['active_ratio']:.0f}% active, "
                       f"{hi['us'][k]:.1f} µs at {100 * hi['active_ratio']:.0f}% (dense twin "
                       f"{_f(lo.get('dense_twin_us'), '.1f')} µs)")
    return (f"Decode latency vs active ratio ({part.get('preset', '1.2b')} layer, CUDA graphs, router bias swept): "
            + "; ".join(out) + ".") if out else ""


def plot_links(json_dir: str, link_prefix: str) -> str:
    """"Plots: [label](prefix/name), ..." for the plots that exist next to the JSON ("" when none)."""
    links = [f"[{label}]({link_prefix}/{name})" for name, label in PLOTS
             if os.path.exists(os.path.join(json_dir, name))]
    return "Plots: " + ", ".join(links) + "." if links else ""


def output_failures(result: dict) -> str:
    """A warning line naming every layer row whose kernel output was off the reference (empty if none)."""
    dtype = getattr(torch, result["dtype"])
    verdicts = [(k, r, output_off(rel, dtype)) for r in result.get("rows", [])
                for k, rel in r.get("rel_err", {}).items()]
    bad = [f"{k} at {r['preset']} T={r['T']} ({off})" for k, r, off in verdicts if off]
    return ("**Wrong outputs in this run** (their times are of a wrong result; see benchmarks/NOTES.md): "
            + "; ".join(bad) + ".") if bad else ""


def table(result: dict, plots: str = "") -> str:
    """The whole results block: header, layer table, training table, model table, active-ratio line and
    ``plots``."""
    parts = [header(result)]
    if result.get("rows"):
        parts += [layer_table(result)] + [line for line in [output_failures(result)] if line]
    if result.get("train", {}).get("rows"):
        parts.append(train_table(result))
    if result.get("model", {}).get("rows"):
        parts.append(model_table(result))
    if result.get("ratio", {}).get("rows") and ratio_line(result):
        parts.append(ratio_line(result))
    if plots:
        parts.append(plots)
    return "\n\n".join(parts)


def write(readme_path: str, text: str) -> None:
    with open(readme_path) as f:
        readme = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{readme_path}: no {BEGIN} ... {END} block to fill")
    with open(readme_path, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--write", help="README to update in place between the markers")
    args = p.parse_args(argv)
    with open(args.json) as f:
        result = json.load(f)
    json_dir = os.path.dirname(os.path.abspath(args.json))
    if not args.write:
        print(table(result, plot_links(json_dir, os.path.relpath(json_dir))))
        return
    prefix = os.path.relpath(json_dir, os.path.dirname(os.path.abspath(args.write)))
    write(args.write, table(result, plot_links(json_dir, prefix)))


if __name__ == "__main__":
    main()
