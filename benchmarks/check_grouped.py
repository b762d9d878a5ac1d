"""Localise an error of the Triton prefill path: run it (ffn.grouped_stages) at a preset size and check what
each launch leaves against torch in fp32 on the same inputs, for the default tiles, the tuned cache's and
one-knob variants. Five calls each expose run-to-run differences, stage by stage: gates and mu (router), token
lists (grouping), activations and the shared expert's hidden activation (up), output (down); the first stage
that differs is where a race lives. Every config runs with the atomic down projection ("down": "atomics"), the
one with stages to check (the GEMM's output is cuBLAS's).

    python benchmarks/check_grouped.py --preset 1.2b --tokens 1024 4096
    TRITON_INTERPRET=1 python benchmarks/check_grouped.py --preset tiny --tokens 100 --device cpu
"""
import argparse

import torch

from deco_kernels import DecoConfig
from deco_kernels import reference as ref
from deco_kernels.autotune import config_for
from deco_kernels.benchmark import layer_inputs
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn, means

# One knob at a time off the default tiles; stages 1 turns the loop's software pipelining off.
VARIANTS = [("block_m", 64), ("block_d", 32), ("down_warps", 4), ("up_warps", 4), ("router_block_t", 16),
            ("down_stages", 1), ("up_stages", 1)]


def stages(x, w, mean, cfg):
    """(g, mu, tokens, counts, act, hs, acc) of one call of the prefill path, every buffer fresh."""
    g = torch.full((x.shape[0], w["w_router"].shape[0]), float("nan"), device=x.device)
    return (g, *ffn.grouped_stages(x, w, mean, 0.0, None, 0.0, None, g, cfg))


def valid(run, i):
    """Stage i of a run as fp32, the token lists and activations only where written (slots < counts; a run
    whose counts differ from the first run's shows in the counts spread)."""
    t = run[i].float()
    if i in (2, 4):
        slots = torch.arange(t.shape[1], device=t.device)[None, :] < run[3][:, None]
        t = torch.where(slots if i == 2 else slots[..., None], t, 0.0)
    return t


def check(x, w, cfg, label):
    n, de = w["w_router"].shape[0], w["gamma"].shape[0]
    wf = {k: v.float() for k, v in w.items()}
    mean = means.cached_expert_mean(w["w_up"])
    y_ref, g_ref = ref.deco_ffn(x.float(), **wf, return_gates=True)
    runs = [stages(x, w, mean, cfg) for _ in range(5)]
    g, mu, tokens, counts, act, hs, acc = runs[0]
    if act.dim() != 3:
        raise SystemExit("check_grouped.py checks the atomic down projection's stages ([N, T, de] activations); "
                         "ffn.DOWN_GEMM = 1 or torch.use_deterministic_algorithms forces the GEMM")
    out = [label, f"gates same set {bool(torch.equal(g > 0, g_ref > 0))} rel {rel_err(g, g_ref):.1e}",
           f"mu rel {rel_err(mu, x.float() @ mean.wbar):.1e}"]
    # Each expert's activations and down projection in torch, from the kernels' own gates and token lists.
    # The grouping against torch: expert e's list is the tokens with g[:, e] > 0, in token order.
    wrong_lists = sum(not torch.equal(tokens[e, :int(counts[e])].long(), torch.nonzero(g[:, e] > 0).flatten())
                      for e in range(n))
    out.append(f"token lists wrong for {wrong_lists} of {n} experts")
    act_err = 0.0
    xf = x.float()
    hs_ref = torch.nn.functional.silu(xf @ wf["ws_gate"].t()) * (xf @ wf["ws_up"].t())
    out.append(f"shared hidden rel {rel_err(hs, hs_ref):.1e}")
    down_ref = hs.float() @ wf["ws_down"].t()   # from the kernel's shared hidden, as the launcher does
    for e in range(n):
        c = int(counts[e])
        if c == 0:
            continue
        toks = tokens[e, :c].long()
        u = x[toks].float() @ wf["w_up"][e * de:(e + 1) * de].t()
        a = ref.norm_silu(u, wf["gamma"], mu[toks, None]) * (g[toks, e] * wf["router_scale"][e])[:, None]
        act_err = max(act_err, rel_err(act[e, :c], a))
        down_ref.index_add_(0, toks, act[e, :c].float() @ wf["w_down"][:, e * de:(e + 1) * de].t())
    out += [f"act rel {act_err:.1e} (worst expert)", f"down vs torch on the kernel's act: {rel_err(acc, down_ref):.1e}",
            f"y vs reference {rel_err(acc, y_ref):.1e}"]
    spread = {name: max(float((valid(r, i) - valid(runs[0], i)).abs().nan_to_num(1e9).max()) for r in runs[1:])
              for i, name in ((0, "g"), (1, "mu"), (3, "counts"), (2, "tokens"), (4, "act"), (5, "hs"), (6, "y"))}
    out.append(f"run-to-run max diff {spread}")
    print(" | ".join(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="1.2b")
    p.add_argument("--tokens", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--device", default="cuda", help="cpu runs the Triton interpreter (TRITON_INTERPRET=1)")
    args = p.parse_args()
    model = DecoConfig.preset(args.preset)
    for T in args.tokens:
        x, w, _ = layer_inputs(model, T, args.device, seed=T,
                               dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)
        base = ffn.grouped_config(T)
        cached = config_for("grouped", x.device, T, x.dtype, model.d_model, model.num_experts, model.expert_dim,
                            model.shared_dim)
        variants = [("default", base), ("cache", cached)] + [(f"{k}={v}", {**base, k: v}) for k, v in VARIANTS]
        with torch.no_grad():
            for label, cfg in variants:
                if cfg is not None:
                    check(x, w, {**cfg, "down": "atomics"}, f"{args.preset} T={T} {label}")


if __name__ == "__main__":
    main()
