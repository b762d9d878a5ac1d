"""Render a bench_layer.py JSON as the README's results table (between the RESULTS markers).

    python benchmarks/readme_table.py benchmarks/results/h100/bench_layer.json --write README.md
"""
import argparse
import json
import re

BEGIN, END = "<!-- RESULTS:BEGIN (benchmarks/readme_table.py) -->", "<!-- RESULTS:END -->"


def table(result: dict) -> str:
    env = result["environment"]
    kernels = [k for k in ("triton", "cupy") if any(k in r["us"] for r in result["rows"])]
    names = ["dense_twin"] + (["torch"] if any("torch" in r["us"] for r in result["rows"]) else []) + kernels
    lines = [f"Measured on {env['gpu']} (sm_{env['capability'].replace('.', '')}), torch {env['torch']}, "
             f"triton {env['triton']}, {env['date'][:10]}; {result['dtype']}, one layer, ~20% of experts active; "
             f"copy {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{result['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s. µs are medians; T <= 8 under CUDA graphs.", "",
             "| preset | T | " + " | ".join(f"{n} µs" for n in names) + " | "
             + " | ".join(f"{k} vs dense | {k} fraction of floor" for k in kernels) + " |",
             "|" + "---|" * (2 + len(names) + 2 * len(kernels))]
    for r in result["rows"]:
        cells = [r["preset"], str(r["T"])] + [f"{r['us'][n]:.1f}" if n in r["us"] else "-" for n in names]
        for k in kernels:
            cells += [f"{r['speedup_vs_dense'][k]:.2f}x", f"{r['fraction_of_floor'][k]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--write", help="README to update in place between the markers")
    args = p.parse_args()
    with open(args.json) as f:
        text = table(json.load(f))
    if not args.write:
        print(text)
        return
    with open(args.write) as f:
        readme = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{args.write}: no {BEGIN} ... {END} block to fill")
    with open(args.write, "w") as f:
        f.write(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))


if __name__ == "__main__":
    main()
