"""Localise an error of the Triton prefill path: run its launches one by one at a preset size and check each
stage against torch (fp32) on the same inputs, for the default tiles, the tuned cache's and single-knob
variants; repeat each call to expose run-to-run differences.

    python benchmarks/check_grouped.py --preset 1.2b --tokens 1024 4096
"""
import argparse

import torch

from deco_kernels import DecoConfig, layout
from deco_kernels import reference as ref
from deco_kernels.autotune import config_for
from deco_kernels.benchmark import layer_inputs
from deco_kernels.testing import rel_err
from deco_kernels.triton import ffn
from deco_kernels.triton.grouped import _grouped_down_kernel, _grouped_up_kernel
from deco_kernels.reference.ops import NORM_EPS


def stages(x, w, cfg):
    """(g, tokens, counts, act, y) of the grouped path, launch by launch as ffn._grouped runs them."""
    T, d = x.shape
    n, de = w["w_router"].shape[0], w["gamma"].shape[0]
    g = torch.full((T, n), float("nan"), device=x.device)
    mu = torch.full((T,), float("nan"), device=x.device)
    wbar = layout.expert_mean(w["w_up"])
    tokens, counts = ffn._group_by_expert(x, w["w_router"], wbar, 0.0, None, 0.0, None, g, mu, cfg["router_block_t"])
    act = torch.full((n, T, de), float("nan"), device=x.device, dtype=x.dtype)
    grid = (n, ffn.cdiv(T, cfg["block_m"]))
    prec = ffn._precision(x.dtype)
    _grouped_up_kernel[grid](x, w["w_up"], tokens, counts, g, mu, w["router_scale"], w["gamma"], act, T, n, d,
                             x.stride(0), NORM_EPS, DE=de, PREC=prec, BLOCK_M=cfg["block_m"],
                             BLOCK_K=cfg["block_k"], num_warps=cfg["up_warps"], num_stages=cfg["up_stages"])
    acc = ffn.dense_swiglu_fp32(x, w["ws_gate"], w["ws_up"], w["ws_down"])
    shared = acc.clone()
    _grouped_down_kernel[grid](act, w["w_down"], tokens, counts, acc, T, n, d, DE=de, PREC=prec,
                               BLOCK_M=cfg["block_m"], BLOCK_D=cfg["block_d"], num_warps=cfg["down_warps"],
                               num_stages=cfg["down_stages"])
    return g, mu, tokens, counts, act, shared, acc


def check(x, w, cfg, label):
    n, de = w["w_router"].shape[0], w["gamma"].shape[0]
    wf = {k: v.float() for k, v in w.items()}
    y_ref, g_ref = ref.deco_ffn(x.float(), **wf, return_gates=True)
    runs = [stages(x, w, cfg) for _ in range(3)]
    g, mu, tokens, counts, act, shared, acc = runs[0]
    out = [label]
    out.append(f"gates same set {bool(torch.equal(g > 0, g_ref > 0))} rel {rel_err(g, g_ref):.1e}")
    # The up kernel's activations against torch, from the kernel's own gates and token lists.
    act_err, down_ref = 0.0, shared.clone()
    for e in range(n):
        c = int(counts[e])
        toks = tokens[e, :c].long()
        if c == 0:
            continue
        xe = x[toks].float()
        h = xe @ wf["w_up"][e * de:(e + 1) * de].t()
        u = h - (xe @ layout.expert_mean(w["w_up"]))[:, None]
        a = torch.nn.functional.silu(u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + NORM_EPS) * wf["gamma"])
        a = a * (g[toks, e] * wf["router_scale"][e])[:, None]
        act_err = max(act_err, rel_err(act[e, :c], a))
        down_ref.index_add_(0, toks, act[e, :c].float() @ wf["w_down"][:, e * de:(e + 1) * de].t())
    out.append(f"act rel {act_err:.1e} (worst expert)")
    out.append(f"down vs torch on the kernel's act: {rel_err(acc, down_ref):.1e}")
    out.append(f"y vs reference {rel_err(acc, y_ref):.1e}")
    spread = {name: max(float((r[i].float() - runs[0][i].float()).abs().nan_to_num(1e9).max()) for r in runs[1:])
              for i, name in ((0, "g"), (1, "mu"), (3, "counts"), (6, "y"))}
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
        variants = [("default", base), ("cache", cached)] + [
            (f"{k}={v}", {**base, k: v}) for k, v in [("block_m", 64), ("block_d", 32), ("down_warps", 4),
                                                       ("up_warps", 4), ("router_block_t", 16),
                                                       ("down_stages", 1), ("up_stages", 1)]]
        with torch.no_grad():
            for label, cfg in variants:
                if cfg is not None:
                    check(x, w, cfg, f"{args.preset} T={T} {label}")


if __name__ == "__main__":
    main()
