"""The least time each design of the prefill's expert sum can take, from a bench.json's measured ceilings, and
the speed-up over the dense twin that this caps (issue targets: prefill >= 3x at 4096 tokens, training >= 2x).

Each token's output sums ~20% of N experts' de-wide products, chosen per token. Three ways to do that sum:
- gemm: one dense-masked GEMM over token-major activations [T, N*de] (zero where a gate is off) — every
  expert's FLOPs whatever the active ratio, plus writing the zero fill;
- pairs: a grouped GEMM per expert writing each (token, expert) pair's d outputs, then a per-token sum that
  reads them back — the active FLOPs plus 2 x pairs x d x 2 bytes;
- atomics: the active FLOPs, adding each pair's outputs into an fp32 accumulator (4 bytes per element); its
  floor is taken as the pairs' bytes at the copy rate (an optimistic bound: the measured atomic kernels ran
  at about a third of it).
A token tile cannot skip experts either: with a fraction a of N experts active at random, an expert is unused
by all of a tile's m tokens with probability (1 - a)^m (~1e-6 at a = 0.2, m = 64).
Everything else of the layer (router, up projection, shared expert) is taken at its active FLOPs at the
measured matmul rate. Training sums twice over experts per token (y forward, dx backward) and does about three
times the forward's other FLOPs.

    cd benchmarks && python design_floors.py results/h100/bench.json --out results/h100/design_floors.json
"""
import argparse
import json

from deco_kernels import DecoConfig


def floors(preset: str, T: int, active: float, mm_flops: float, copy_bps: float, eb: int = 2) -> dict:
    """µs floors of the layer's parts for T tokens at `active` (fraction of experts per token)."""
    c = DecoConfig.preset(preset)
    d, n, de, ds = c.d_model, c.num_experts, c.expert_dim, c.shared_dim
    pairs = T * n * active
    down_active = 2 * pairs * de * d
    rest = 2 * T * n * d + 2 * pairs * de * d + 6 * T * ds * d   # router, up projection, shared expert
    us = 1e6
    down = dict(gemm=(2 * T * n * de * d / mm_flops + T * n * de * eb / copy_bps) * us,
                pairs=(down_active / mm_flops + 2 * pairs * d * eb / copy_bps) * us,
                atomics=(down_active / mm_flops + pairs * d * 4 / copy_bps) * us)
    best = min(down, key=down.get)
    layer = rest / mm_flops * us + down[best]
    train = 3 * (rest + down_active) / mm_flops * us - 2 * down_active / mm_flops * us + 2 * down[best]
    dense = 6 * T * d * c.d_ff      # the dense twin's forward: three GEMMs of width d_ff
    return dict(preset=preset, T=T, active_ratio=active, rest_us=rest / mm_flops * us,
                **{f"down_{k}_us": v for k, v in down.items()}, best_down=best, layer_floor_us=layer, train_floor_us=train,
                active_floor_us=(rest + down_active) / mm_flops * us, dense_floor_us=dense / mm_flops * us,
                train_dense_floor_us=3 * dense / mm_flops * us)


# The printed table: (header, row key, width, format).
COLUMNS = [("preset", "preset", 6, ""), ("T", "T", 5, "d"), ("gemm", "down_gemm_us", 7, ".1f"),
           ("pairs", "down_pairs_us", 7, ".1f"), ("atomics", "down_atomics_us", 7, ".1f"),
           ("layer floor", "layer_floor_us", 11, ".1f"), ("dense", "dense_twin_us", 7, ".1f"),
           ("cap", "layer_cap", 5, ".2f"), ("eq", "layer_cap_same_efficiency", 5, ".2f"),
           ("triton", "triton_us", 7, ".1f"), ("train floor", "train_floor_us", 11, ".1f"),
           ("dense", "train_dense_twin_us", 7, ".1f"), ("cap", "train_cap", 5, ".2f"),
           ("eq", "train_cap_same_efficiency", 5, ".2f"), ("triton", "train_triton_us", 7, ".1f")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", help="a deco-kernels bench JSON")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    b = json.load(open(args.bench))
    mm, bw = b["bf16_matmul_flops"], b["copy_bandwidth_Bps"]
    train = {r["preset"]: r for r in b.get("train", {}).get("rows", [])}
    rows = []
    for r in b["rows"]:
        if r["T"] < 512:
            continue
        f = floors(r["preset"], r["T"], r["active_ratio"], mm, bw)
        dense = r.get("graph_us", r["us"])["dense_twin"]
        # cap: the dense twin as measured over DECO at its floor; cap_same_efficiency: both at their floors (as
        # if DECO's kernels reached the same share of theirs as cuBLAS's dense twin does).
        f.update(dense_twin_us=dense, triton_us=r.get("graph_us", r["us"])["triton"],
                 layer_cap=dense / f["layer_floor_us"],
                 layer_cap_same_efficiency=f["dense_floor_us"] / f["layer_floor_us"])
        t = train.get(r["preset"])
        if t is not None and t["T"] == r["T"] and t.get("graph_us"):
            f.update(train_dense_twin_us=t["graph_us"]["dense_twin"], train_triton_us=t["graph_us"]["triton"],
                     train_cap=t["graph_us"]["dense_twin"] / f["train_floor_us"],
                     train_cap_same_efficiency=f["train_dense_floor_us"] / f["train_floor_us"])
        rows.append(f)
    out = dict(source=args.bench, environment=b.get("environment"), bf16_matmul_flops=mm, copy_bandwidth_Bps=bw,
               rows=rows)
    print("µs; cap = dense twin measured / DECO floor, eq = both at their floors (the same efficiency)")
    print(" ".join(format(name, f">{width}") for name, _, width, _ in COLUMNS))
    for f in rows:
        print(" ".join(format(f[key] if key in f else "-", f">{width}" + ("" if key not in f else spec))
                       for _, key, width, spec in COLUMNS))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
