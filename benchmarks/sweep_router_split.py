"""Time the prefill path's router launch geometry: ffn.ROUTER_SPLIT_BLOCKS (below this many token blocks the
router also splits K over programs) against the grouped config's router_block_t and the router's num_stages
(ffn.router_stages), whole layer under a CUDA graph (bf16, the benchmark's layer, ~20% active). Every output is
checked against the fp32 torch reference, and three calls against each other.

    python benchmarks/sweep_router_split.py --presets 1.2b 0.1b --tokens 512 4096 --out sweep_router_split.json
"""
import argparse
import itertools
from unittest import mock

import torch
from sweep_tiles import TIMER, layer_runner

from deco_kernels import DecoConfig, reference
from deco_kernels.benchmark import layer_inputs, write_result
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn

SPLIT_BLOCKS = [32, 132, 264]
BLOCK_T = [16, 32, 64]
STAGES = [1, 3]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["1.2b", "0.1b"])
    p.add_argument("--tokens", nargs="+", type=int, default=[512, 4096])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for preset, T in itertools.product(args.presets, args.tokens):
        model = DecoConfig.preset(preset)
        x, w, _ = layer_inputs(model, T, "cuda", seed=T)
        run = layer_runner(x, w, 0.0, T, model.num_experts)
        base = ffn.grouped_config(T)
        with torch.no_grad():
            y_ref = reference.deco_ffn(x.float(), **{k: v.float() for k, v in w.items()})
            for split_blocks, block_t, stages in itertools.product(SPLIT_BLOCKS, BLOCK_T, STAGES):
                cfg = {**base, "router_block_t": block_t}
                with mock.patch.object(ffn, "ROUTER_SPLIT_BLOCKS", split_blocks), \
                        mock.patch.object(ffn, "router_stages", lambda _: stages):
                    ys = [run(cfg).clone() for _ in range(3)]
                    us = TIMER(lambda: run(cfg), graph=True)
                rows.append(dict(preset=preset, T=T, split_blocks=split_blocks, router_block_t=block_t,
                                 stages=stages, us=us, rel_err=rel_err(ys[0], y_ref),
                                 spread=max(float((y - ys[0]).float().abs().max()) for y in ys[1:])))
                print(rows[-1], flush=True)
    if args.out:
        write_result(args.out, rows=rows)


if __name__ == "__main__":
    main()
