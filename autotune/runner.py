"""The tuning runner: times candidate configs of one (path, geometry, bucket), keeps the best that is correct
and faster than the default.

    result = tune_one(candidates, measure, output=..., close=..., deadline=...)

candidates[0] is the default config. `measure(cfg) -> µs` and `output(cfg) -> tensors` are injected: on a GPU
they come from `LayerBench` (a CUDA graph of the launcher call, replayed, median µs); tests pass fakes. Every
exception of a candidate (compile error, out of resources, launch failure) is recorded and the tune goes on;
a candidate whose output is off the `reference` (LayerBench.reference(): torch in fp32), or without one off
the default's output, is rejected, the default included (a compiler bug can make one config wrong, the
default as much as any: ffn.router_stages); the default is re-measured against the winner at the end, and the
winner is written only if it is still faster. If the CUDA context is lost (an illegal address poisons it),
`ContextLost` stops the whole tune; what was measured before is kept.
"""
from __future__ import annotations

import math
import time

import torch

from deco_kernels.testing import GPU_REL_TOL, rel_err


class ContextLost(RuntimeError):
    """The CUDA context no longer works: nothing more can be measured in this process."""


# Gates are fp32 sums of exact products in every config: only the order of the sum differs.
GATE_REL_TOL = 1e-4


def close_enough(dtype):
    """close(out, ref) for LayerBench outputs (y, g): y within testing.GPU_REL_TOL[dtype]; gates g (when
    given) within GATE_REL_TOL and with the same active set up to gates within GATE_REL_TOL * max|g| of zero.
    Non-finite outputs are never close."""
    def close(out, ref):
        y, y_ref = out[0], ref[0]
        if not torch.isfinite(y).all() or rel_err(y, y_ref) > GPU_REL_TOL[dtype]:
            return False
        if len(out) < 2:
            return True
        g, g_ref = out[1], ref[1]
        # A gate within rounding of the threshold may fall either side (LayerBench sets the bias at a quantile of
        # the logits, so one gate sits on it): only flips of gates above that margin count.
        margin = GATE_REL_TOL * float(g_ref.abs().max())
        flips = ((g > 0) != (g_ref > 0)) & (torch.maximum(g, g_ref) > margin)
        return not bool(flips.any()) and rel_err(g, g_ref) <= GATE_REL_TOL
    return close


def _error(e: BaseException) -> str:
    """Type, first and last line of the message (a CompilationError's reason is on its last line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(e).__name__}: {text[:400]}"


def tune_one(candidates, measure, output=None, close=None, deadline=None, clock=time.monotonic,
             healthy=None, confirm: int = 1, on_step=None, reference=None) -> dict:
    """Measure candidates in order until `deadline` (clock seconds); returns
    {"config", "us", "default_us", "candidates": [{"config", "us", "error"?}], "stopped": bool}.
    The default (candidates[0]) is always measured, whatever the deadline. healthy() -> bool is called after a
    failure (False raises ContextLost)."""
    rows, ref = [], None
    stopped = False
    for i, cfg in enumerate(candidates):
        if i > 0 and deadline is not None and clock() >= deadline:
            stopped = True
            break
        row = {"config": dict(cfg), "us": None}
        try:
            if output is not None:
                out = output(cfg)
                if reference is not None:
                    if not close(out, reference):
                        raise ValueError("output off the reference")
                elif i == 0:
                    ref = out
                elif ref is not None and close is not None and not close(out, ref):
                    raise ValueError("output differs from the default config's")
            row["us"] = float(measure(cfg))
            if not math.isfinite(row["us"]) or row["us"] <= 0:
                raise ValueError(f"bad time {row['us']}")
        except Exception as e:  # noqa: BLE001 - any failure of one candidate rejects that candidate only
            row["us"] = None
            row["error"] = _error(e)
            if healthy is not None and not healthy():
                rows.append(row)
                raise ContextLost(f"CUDA context lost after {row['config']}: {row['error']}") from e
        rows.append(row)
        if on_step is not None:
            on_step(row)
    default = rows[0]
    ok = [r for r in rows if r["us"] is not None]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    result = {"config": dict(candidates[0]), "us": default["us"], "default_us": default["us"], "candidates": rows,
              "stopped": stopped}
    if best is None or best is default:
        return result
    if default["us"] is None:   # the default itself fails here: any working config beats it
        result.update(config=dict(best["config"]), us=best["us"])
        return result
    # Confirm: time the default and the winner again, alternately; keep the winner only if still faster.
    d_times, b_times = [default["us"]], [best["us"]]
    for _ in range(confirm):
        try:
            d_times.append(float(measure(candidates[0])))
            b_times.append(float(measure(best["config"])))
        except Exception as e:  # noqa: BLE001
            if healthy is not None and not healthy():
                raise ContextLost(_error(e)) from e
            return result
    d_us, b_us = sorted(d_times)[len(d_times) // 2], sorted(b_times)[len(b_times) // 2]
    result["default_us"] = d_us
    if b_us < d_us:
        result.update(config=dict(best["config"]), us=b_us)
    else:
        result["us"] = d_us
    return result


def cuda_healthy() -> bool:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def graph_us(fn, warmup_ms: float = 5, rep_ms: float = 25) -> float:
    """Median µs of fn captured in a CUDA graph and replayed (L2 flushed between replays by do_bench)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


class LayerBench:
    """One layer's tensors on the GPU (init-scale weights, SPEC §1; router bias set so ~20% of the gates are
    active) and the launcher of `path`, called with a config."""

    def __init__(self, path: str, T: int, d: int, n: int, de: int, ds: int, dtype=torch.bfloat16, device="cuda",
                 seed: int = 0, target: float = 0.2):
        from deco_kernels.triton import ffn, means

        g = torch.Generator(device=device).manual_seed(seed)

        def normal(*shape, std=0.01):
            return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)
        self.w = dict(w_router=normal(n, d), router_scale=torch.full((n,), 0.1, device=device, dtype=dtype),
                      w_up=normal(n * de, d), gamma=torch.ones(de, device=device, dtype=dtype),
                      w_down=normal(d, n * de), ws_gate=normal(ds, d), ws_up=normal(ds, d),
                      ws_down=normal(d, ds, std=0.001))
        self.x = torch.randn(T, d, generator=g, device=device).to(dtype)
        r = self.x.float() @ self.w["w_router"].float().t()
        self.bias = -torch.quantile(r.flatten(), 1 - target).item()
        self.mean = means.cached_expert_mean(self.w["w_up"])
        self.g = torch.empty(T, n, device=device, dtype=torch.float32)
        self.y = torch.empty(T, d, device=device, dtype=dtype)
        self.launcher = {"small_batch": ffn._small_batch, "grouped": ffn._grouped}[path]

    def run(self, cfg):
        self.launcher(self.x, self.w, self.mean, self.bias, None, 0.0, None, self.g, self.y, dict(cfg))

    def reference(self):
        """(y, g) of the torch reference in fp32 on the same inputs."""
        from deco_kernels import reference as ref
        w = {k: v.float() for k, v in self.w.items()}
        with torch.no_grad():
            return ref.deco_ffn(self.x.float(), **w, bias=self.bias, return_gates=True)

    def output(self, cfg):
        self.y.fill_(float("nan"))
        self.g.fill_(float("nan"))
        with torch.no_grad():
            self.run(cfg)
        torch.cuda.synchronize()
        return self.y.clone(), self.g.clone()

    def measure(self, cfg) -> float:
        with torch.no_grad():
            return graph_us(lambda: self.run(cfg))
