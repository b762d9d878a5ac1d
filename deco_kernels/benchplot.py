"""Plots and a text summary of a ``deco-kernels bench`` JSON (``deco_kernels.benchmark``); matplotlib's Agg
backend, no GPU. Each plot is drawn only when its part is in the JSON:

- speedup_vs_T.png: every backend's speed-up over the dense twin against T, one panel per preset (layer);
- fraction_of_floor.png: the fraction of the floor reached against T, one panel per preset (layer);
- decode_latency_vs_active_ratio.png: µs against the measured active ratio at T=1 and T=8, the dense twin's
  constant line and the byte floor (ratio);
- model.png: whole-model speed-ups (decode, prefill, training) beside the decode floor ratio (model).
"""
from __future__ import annotations

from pathlib import Path

COLORS = {"dense_twin": "black", "torch": "tab:gray", "triton": "tab:blue", "cupy": "tab:green"}
KERNELS = ("torch", "triton", "cupy")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _device(result: dict) -> str:
    env = result.get("environment", {})
    cap = env.get("capability", "?").replace(".", "")
    return f"{env.get('gpu', 'unknown GPU')} (sm_{cap}), {result.get('dtype', 'bfloat16')}"


def _layer_series(rows: list, preset: str, key: str, graphs_only: bool = False) -> dict[str, tuple[list, list]]:
    """{backend: (T values, row[key][backend])} for one preset, rows without that backend skipped.
    ``graphs_only``: every point timed under a CUDA graph (row[key] where the row ran under one, else
    row["graph_" + key]); rows with no graph figure are skipped."""
    series: dict[str, tuple[list, list]] = {}
    for r in sorted((r for r in rows if r.get("preset") == preset), key=lambda r: r["T"]):
        values = r.get(key, {}) if not graphs_only or r.get("graph") else r.get("graph_" + key, {})
        for name, value in values.items():
            xs, ys = series.setdefault(name, ([], []))
            xs.append(r["T"])
            ys.append(value)
    return series


def _layer_panels(result: dict, key: str, names, ylabel: str, title: str, path: Path, unit_line: bool):
    plt = _pyplot()
    rows = result["rows"]
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.8), squeeze=False, sharey=True)
    for ax, preset in zip(axes[0], presets):
        for name, (xs, ys) in _layer_series(rows, preset, key).items():
            if name in names:
                ax.plot(xs, ys, "o-", color=COLORS.get(name), label=name)
        graphed = {n for r in rows for n in r.get("graph_" + key, {})}  # timed under graphs beyond the bucket
        if graphed:
            for name, (xs, ys) in _layer_series(rows, preset, key, graphs_only=True).items():
                if name in names and name in graphed:
                    ax.plot(xs, ys, "x--", color=COLORS.get(name), alpha=0.7, label=f"{name} (all in graphs)")
        if unit_line:
            ax.axhline(1.0, color="black", lw=1, ls="--", label="dense twin")
        ax.set_xscale("log", base=2)
        ts = sorted({r["T"] for r in rows if r.get("preset") == preset})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call T")
        ax.set_title(preset)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"{title} — {_device(result)}\nsolid: T <= {result.get('graph_max_tokens', 8)} under CUDA graphs, "
                 "larger T eager; dashed: every T under CUDA graphs", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ratio(result: dict, path: Path) -> Path:
    plt = _pyplot()
    part = result["ratio"]
    rows = [r for r in part["rows"] if r.get("us")]
    tokens = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(5 * len(tokens), 4), squeeze=False)
    for ax, T in zip(axes[0], tokens):
        sel = sorted((r for r in rows if r["T"] == T), key=lambda r: r["active_ratio"])
        ratios = [100 * r["active_ratio"] for r in sel]
        for name in sorted({n for r in sel for n in r["us"]}):
            pts = [(100 * r["active_ratio"], r["us"][name]) for r in sel if name in r["us"]]
            ax.plot(*zip(*pts), "o-", color=COLORS.get(name), label=name)
        dense = [r["dense_twin_us"] for r in sel if r.get("dense_twin_us")]
        if dense:
            ax.axhline(dense[0], color="black", ls="--", label="dense twin")
        ax.plot(ratios, [r["floor_us"] for r in sel], ":", color="tab:red", label="floor")
        ax.set_xlabel("measured active ratio (%)")
        ax.set_ylabel("µs per layer call")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{part.get('preset', '1.2b')} layer, T={T}, CUDA graph")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Decode latency vs active ratio (router bias swept) — {_device(result)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_model(result: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = result["model"]["rows"]
    figures = [("decode_speedup", "decode (batch 1)"), ("prefill_speedup", "prefill"),
               ("train_step_speedup", "training step")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / (len(figures) + 1)
    for i, r in enumerate(rows):
        for j, (key, label) in enumerate(figures):
            if key in r:
                ax.bar(i + j * width, r[key], width, color=f"C{j}", label=label if i == 0 else None)
        if "floor" in r:
            ax.bar(i + len(figures) * width, r["floor"]["floor_ratio"], width, color="tab:red", alpha=0.5,
                   label="decode floor ratio (weights)" if i == 0 else None)
        if not any(key in r for key, _ in figures):
            ax.text(i + width * len(figures) / 2, 1.05, "failed (see JSON)", ha="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xlim(-2 * width, len(rows) - 1 + (len(figures) + 2) * width)
    ax.set_xticks([i + width * len(figures) / 2 for i in range(len(rows))], [r["preset"] for r in rows])
    ax.set_ylabel("DECO model vs dense-twin model (x)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4)
    ax.set_title(f"Whole model, ~{100 * result['model'].get('target_ratio', 0.2):.0f}% active — "
                 f"{_device(result)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(result: dict, out_dir) -> list[Path]:
    """Draw every plot the JSON has data for into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if any(r.get("us") for r in result.get("rows", [])):
        kernels = [k for k in KERNELS if any(k in r.get("us", {}) for r in result["rows"])]
        paths.append(_layer_panels(result, "speedup_vs_dense", kernels, "speed-up over the dense twin (x)",
                                   "One DECO layer vs its dense twin", out / "speedup_vs_T.png", True))
        paths.append(_layer_panels(result, "fraction_of_floor", ["dense_twin", *kernels], "fraction of the floor",
                                   "Fraction of the floor (bytes or FLOPs)", out / "fraction_of_floor.png", False))
    if any(r.get("us") for r in result.get("ratio", {}).get("rows", [])):
        paths.append(plot_ratio(result, out / "decode_latency_vs_active_ratio.png"))
    if result.get("model", {}).get("rows"):
        paths.append(plot_model(result, out / "model.png"))
    return paths


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary(result: dict) -> str:
    """A plain-text digest of every part in the JSON, and of the failures."""
    lines = [f"{_device(result)}; copy {_num(result.get('copy_bandwidth_Bps', 0) / 1e12, '.2f')} TB/s, bf16 mm "
             f"{_num(result.get('bf16_matmul_flops', 0) / 1e12, '.0f')} TFLOP/s, empty launches (CUDA graph) "
             f"{_num(result.get('one_empty_launch_us'), '.1f')} / "
             f"{_num(result.get('two_empty_launches_us'), '.1f')} µs"]
    rows = result.get("rows", [])
    if rows:
        names = list(dict.fromkeys(n for r in rows for n in r.get("us", {})))
        lines.append(f"{'preset':6} {'T':>5} {'act%':>5} " + " ".join(f"{n + ' us':>13}" for n in names)
                     + " " + " ".join(f"{n + ' x':>10}" for n in names if n != "dense_twin"))
        for r in rows:
            us = " ".join(f"{_num(r.get('us', {}).get(n), '13.1f'):>13}" for n in names)
            sp = " ".join(f"{_num(r.get('speedup_vs_dense', {}).get(n), '10.2f'):>10}" for n in names
                          if n != "dense_twin")
            lines.append(f"{r['preset']:6} {r['T']:5d} {_num(100 * r.get('active_ratio', float('nan')), '5.1f')} "
                         f"{us} {sp}" + (f"  errors: {r['errors']}" if r.get("errors") else ""))
    for r in result.get("model", {}).get("rows", []):
        deco, dense = r.get("deco", {}), r.get("dense_twin", {})
        lines.append(
            f"model {r['preset']}: decode {_num(deco.get('decode_tokens_per_s'), '.0f')} vs "
            f"{_num(dense.get('decode_tokens_per_s'), '.0f')} tok/s ({_num(r.get('decode_speedup'), '.2f')}x, floor "
            f"ratio {_num(r.get('floor', {}).get('floor_ratio'), '.2f')}x, fraction "
            f"{_num(r.get('fraction_of_floor_ratio'), '.2f')}); prefill {_num(r.get('prefill_speedup'), '.2f')}x; "
            f"train {_num(r.get('train_step_speedup'), '.2f')}x"
            + "".join(f"  {k} errors: {v['errors']}" for k, v in (("deco", deco), ("dense", dense)) if v.get("errors")))
    for r in result.get("ratio", {}).get("rows", []):
        lines.append(f"ratio T={r['T']} act {_num(100 * r.get('active_ratio', float('nan')), '.1f')}%: "
                     + ", ".join(f"{k} {v:.1f} µs" for k, v in r.get("us", {}).items())
                     + f", dense {_num(r.get('dense_twin_us'), '.1f')} µs"
                     + (f"  errors: {r['errors']}" if r.get("errors") else ""))
    for e in result.get("errors", []):
        lines.append(f"part {e['part']} failed: {e['error']}")
    return "\n".join(lines)
