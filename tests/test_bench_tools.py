"""The CPU side of the benchmarks: floor arithmetic, case selection, plots, the README table generator, and
the measurement code run on a tiny config with a wall-clock timer (deco_kernels.benchmark, benchplot,
benchmarks/readme_table.py)."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from deco_kernels import benchmark as bench
from deco_kernels import benchplot, cli
from deco_kernels.config import DecoConfig
from deco_kernels.modules import DecoForCausalLM

REPO = Path(__file__).resolve().parents[1]
# d=8 (1 head of 8), N=4 experts of width 2, shared width 3, dense width 12, 2 layers, vocabulary 10.
TINY = DecoConfig(vocab_size=10, num_layers=2, d_model=8, num_heads=1, head_dim=8, d_ff=12, num_experts=4,
                  expert_dim=2, shared_dim=3)
SMALL = DecoConfig(vocab_size=97, num_layers=3, d_model=64, num_heads=2, head_dim=32, d_ff=160, num_experts=6,
                   expert_dim=16, shared_dim=32)


def _script(name: str):
    """benchmarks/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_timer(fn, graph):
    """Wall-clock µs of one call after a warm-up call (the CPU stand-in for GpuTimer)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


# ---------------------------------------------------------------------------------------------------------
# Floors
# ---------------------------------------------------------------------------------------------------------
def test_layer_floor_by_hand():
    # T=2 tokens, 3 active pairs over 2 distinct experts, 2-byte weights, 1e6 B/s and 1e6 FLOP/s.
    f = bench.layer_floor(TINY, T=2, pairs=3, union=2, esize=2, bw=1e6, flops=1e6)
    # bytes: (union 2 * 2 * de 2 * d 8 = 64) + (3 * ds 3 * d 8 = 72) + (N 4 * d 8 = 32) = 168 params * 2 B
    assert f["floor_bytes"] == 336
    # FLOPs: 2 * 3 pairs * 2 * 2 * 8 = 192, shared 2 * 2 * 3 * 3 * 8 = 288, router 2 * 2 * 4 * 8 = 128
    assert f["floor_flops"] == 608
    assert f["floor_us"] == pytest.approx(608.0)           # FLOP-bound: 608 FLOPs at 1e6 FLOP/s
    assert f["dense_bytes"] == 3 * 12 * 8 * 2 and f["dense_flops"] == 2 * 2 * 3 * 12 * 8
    assert f["dense_floor_us"] == pytest.approx(1152.0)


def test_decode_weight_params_by_hand():
    dense = bench.decode_weight_params(TINY, None)
    # embedding row 8, attention 2 layers * 4 * 8 * 8 = 512, norms 2 * 2 * 8 + 8 = 40, FFNs 2 * 3 * 8 * 12 = 576,
    # LM head 10 * 8 = 80
    assert dense == dict(embedding_row=8, attention=512, norms=40, ffn=576, lm_head=80, total=1216)
    deco = bench.decode_weight_params(TINY, 0.5)
    # layer 0 dense 288; layer 1: router 32 + scale 4 + gamma 2 + shared 72 + 0.5 * 4 experts * 2 * 2 * 8 = 64
    assert deco["ffn"] == 288 + 174 and deco["total"] == 1102
    floors = bench.model_floor(TINY, 0.5, context=5, esize=2, bw=1e6)
    assert floors["floor_ratio"] == pytest.approx(1216 / 1102)
    assert floors["kv_bytes"] == 2 * 2 * 5 * 8 * 2 == bench.kv_cache_bytes(TINY, 5, 2)
    assert floors["floor_ratio_with_kv"] == pytest.approx((1216 * 2 + 320) / (1102 * 2 + 320))
    assert floors["deco_floor_us"] == pytest.approx((1102 * 2 + 320) / 1e6 * 1e6)


@pytest.mark.parametrize("dense_twin", [False, True], ids=["deco", "dense_twin"])
def test_decode_weights_with_every_expert_active_are_the_model_minus_the_unread_embeddings(dense_twin):
    # With every expert active a decode step reads every parameter except the V - 1 other embedding rows.
    model = DecoForCausalLM(SMALL, dense_twin=dense_twin)
    params = sum(p.numel() for p in model.parameters())
    unread = (SMALL.vocab_size - 1) * SMALL.d_model
    assert bench.decode_weight_params(SMALL, None if dense_twin else 1.0)["total"] == params - unread


def test_bias_for_ratio_activates_the_requested_fraction_with_a_margin():
    r = torch.randn(3, 41, generator=torch.Generator().manual_seed(0))
    for ratio in (0.05, 0.2, 0.6, 1.0, 1e-6):
        bias = bench.bias_for_ratio(r, ratio)
        on = (r.double() + bias > 0)
        assert int(on.sum()) == min(r.numel(), max(1, round(ratio * r.numel())))
        assert (r.double() + bias).abs().min() > 1e-4  # half-way between two logits, never on one


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------
def test_quick_mode_selection(monkeypatch):
    assert bench.layer_presets(True) == ("0.1b", "1.2b")
    assert bench.layer_presets(False) == ("0.1b", "0.2b", "0.5b", "1.2b")
    assert len(bench.ratio_targets(True)) < len(bench.ratio_targets(False))
    assert min(bench.ratio_targets(True)) <= 0.05 and max(bench.ratio_targets(True)) >= 0.6
    for value, quick in (("1", True), ("yes", True), ("0", False), ("", False), ("false", False)):
        monkeypatch.setenv(bench.QUICK_ENV, value)
        assert bench.quick_from_env() is quick
    monkeypatch.delenv(bench.QUICK_ENV)
    assert bench.quick_from_env() is False


def test_graph_bucket():
    assert [T for T in bench.TOKENS if bench.uses_graph(T)] == [1, 8]


def test_micro_cases():
    quick = bench.micro_cases(True)
    assert len(quick) == 2 * 5 * len(bench.MICRO_OPS)
    assert {b for *_, b in quick} == {"torch"} and {p for p, *_ in quick} == {"0.1b", "1.2b"}
    full = bench.micro_cases(False, {"triton": {"deco_ffn", "dense_twin"}, "cupy": set()})
    # the dense twin is cuBLAS whatever the backend: it is timed once, under "torch"
    assert len(full) == 4 * 5 * (len(bench.MICRO_OPS) + 1)
    assert ("1.2b", 4096, "deco_ffn", "triton") in full and ("0.2b", 1, "dense_twin", "triton") not in full


def test_parse_parts():
    assert bench.parse_parts("all") == ["layer", "model", "ratio", "train"]
    assert bench.parse_parts("ratio, layer") == ["layer", "ratio"]
    for bad in ("", "layers", "layer,speed"):
        with pytest.raises(ValueError, match="parts"):
            bench.parse_parts(bad)


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"),
                                        ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("Orin (nvgpu)", "orin")])
def test_device_slug(name, slug):
    assert bench.device_slug(name) == slug


# ---------------------------------------------------------------------------------------------------------
# The measurement code on the CPU (tiny sizes, wall-clock timer)
# ---------------------------------------------------------------------------------------------------------
def test_layer_case_on_cpu_records_figures_and_failures():
    x, w, dense = bench.layer_inputs(SMALL, 16, "cpu", dtype=torch.float32)
    row = bench.layer_case(SMALL, "small", x[:8], w, dense, cpu_timer, 1e9, 1e12, ["nope"])
    assert row["T"] == 8 and row["graph"] is True and 0 < row["active_ratio"] < 1
    assert set(row["us"]) == {"dense_twin", "torch"} and all(us > 0 for us in row["us"].values())
    assert row["speedup_vs_dense"]["torch"] == pytest.approx(row["us"]["dense_twin"] / row["us"]["torch"])
    assert "ValueError" in row["errors"]["nope"]  # an unknown backend is recorded, not raised


def test_layer_case_beyond_the_graph_bucket_times_again_under_graphs():
    x, w, dense = bench.layer_inputs(SMALL, 16, "cpu", dtype=torch.float32)
    calls = []

    def timer(fn, graph):
        calls.append(graph)
        return 10.0 if graph else 20.0

    row = bench.layer_case(SMALL, "small", x, w, dense, timer, 1e9, 1e12, [])
    assert row["T"] == 16 and row["graph"] is False
    assert row["us"] == {"dense_twin": 20.0, "torch": 20.0}
    assert row["graph_us"] == {"dense_twin": 10.0}  # the reference syncs with the host: never in a graph
    assert row["graph_speedup_vs_dense"] == {"dense_twin": 1.0}
    assert row["graph_fraction_of_floor"]["dense_twin"] == pytest.approx(row["dense_floor_us"] / 10.0)
    assert sorted(calls) == [False, False, True]


def test_train_case_on_cpu_times_forward_and_backward():
    row = bench.train_case(SMALL, "small", 8, cpu_timer, ["nope"], device="cpu", dtype=torch.float32)
    assert row["T"] == 8 and set(row["us"]) == {"dense_twin", "torch"}
    assert all(us > 0 for us in row["us"].values())
    assert row["speedup_vs_dense"]["torch"] == pytest.approx(row["us"]["dense_twin"] / row["us"]["torch"])
    assert row["gpu_us"] == {} and row["gpu_speedup_vs_dense"] == {}  # GPU-busy time only on a GPU
    assert "errors" not in row  # "nope" has no backward: skipped, not attempted


def test_device_kernels_count_only_device_events():
    """A host operator's self device time repeats its kernels' time: only device-side events are summed."""
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType
    events = [Event(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=100.0),
              Event(key="gemm_kernel", device_type=DeviceType.CUDA, self_device_time_total=100.0),
              Event(key="_pair_scatter_kernel", device_type=DeviceType.CUDA, self_device_time_total=300.0),
              Event(key="aten::empty", device_type=DeviceType.CPU, self_device_time_total=0.0),
              Event(key="idle", device_type=DeviceType.CUDA, self_device_time_total=0.0)]
    assert bench.device_kernels(events, reps=2) == [("_pair_scatter_kernel", 150.0), ("gemm_kernel", 50.0)]


def test_write_result_stamps_the_environment(tmp_path):
    bench.write_result(tmp_path / "r.json", rows=[{"us": 1.5}], preset="tiny")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"] == [{"us": 1.5}] and data["preset"] == "tiny"
    assert {"torch", "date", "source_sha256"} <= set(data["environment"])


def test_model_row_on_cpu():
    row = bench.model_row("tiny", TINY, cpu_timer, 1e9, device="cpu", dtype=torch.float32, graphs=False,
                          context=8, prefill_tokens=32, train_tokens=32, calib_tokens=64)
    deco, dense = row["deco"], row["dense_twin"]
    assert "errors" not in deco and "errors" not in dense, (deco.get("errors"), dense.get("errors"))
    assert deco["calibration"]["reached"] and abs(deco["calibration"]["mean_ratio"] - 0.2) <= 0.01
    for m in (deco, dense):
        assert m["decode_method"] == "eager" and m["decode_tokens_per_s"] > 0
        assert m["prefill_method"] == "eager" and m["prefill_us"] == m["prefill_eager_us"]
        assert m["prefill_tokens_per_s"] > 0 and m["train_tokens_per_s"] > 0
    assert "decode_active_ratio" in deco and "decode_active_ratio" not in dense
    floors = bench.model_floor(TINY, deco["decode_active_ratio"], 8, 4, 1e9)
    assert row["floor"] == pytest.approx(floors)
    assert row["decode_speedup"] == pytest.approx(dense["decode_us"] / deco["decode_us"])
    assert row["fraction_of_floor_ratio"] == pytest.approx(row["decode_speedup"] / floors["floor_ratio"])


# ---------------------------------------------------------------------------------------------------------
# Plots and the README table, from a synthetic JSON
# ---------------------------------------------------------------------------------------------------------
def synthetic_result() -> dict:
    env = dict(gpu="Fake GPU X1", capability="9.0", torch="2.0", triton="3.0", date="2030-01-02T00:00:00")
    rows = []
    for preset in ("0.1b", "1.2b"):
        for T in (1, 8, 4096):
            us = dict(dense_twin=20.0 * T ** 0.25, torch=700.0, triton=10.0 * T ** 0.3)
            rows.append(dict(preset=preset, T=T, active_ratio=0.2, graph=T <= 8, floor_us=1.0, dense_floor_us=3.0,
                             us=us, speedup_vs_dense={k: us["dense_twin"] / v for k, v in us.items()},
                             fraction_of_floor={k: (3.0 if k == "dense_twin" else 1.0) / v for k, v in us.items()}))
    ratio_rows = [dict(preset="1.2b", T=T, target_ratio=a, active_ratio=a, us=dict(triton=8 + 30 * a * T ** 0.5),
                       dense_twin_us=40.0, floor_us=1 + 10 * a, graph=True)
                  for T in (1, 8) for a in (0.05, 0.2, 0.6)]
    model_rows = [dict(preset=p, deco=dict(decode_us=1000.0, decode_tokens_per_s=1000.0, decode_active_ratio=0.21,
                                           decode_context=128, decode_method="cuda_graph", prefill_tokens=4096,
                                           prefill_tokens_per_s=5e4, train_tokens=4096, train_tokens_per_s=2e4,
                                           train_peak_bytes=3 * 2**30),
                       dense_twin=dict(decode_us=1500.0, decode_tokens_per_s=666.7, prefill_tokens_per_s=9e4,
                                       train_tokens_per_s=4e4, train_peak_bytes=2**31),
                       decode_speedup=1.5, prefill_speedup=0.55, train_step_speedup=0.5,
                       floor=dict(floor_ratio=2.0), fraction_of_floor_ratio=0.75) for p in ("0.1b", "0.5b")]
    model_rows.append(dict(preset="1.2b", deco={"errors": {"model": "OutOfMemoryError: boom"}}, dense_twin={}))
    return dict(environment=env, dtype="bfloat16", copy_bandwidth_Bps=3e12, bf16_matmul_flops=7e14,
                one_empty_launch_us=4.5, two_empty_launches_us=5.5, graph_max_tokens=8, rows=rows,
                model=dict(target_ratio=0.2, rows=model_rows), ratio=dict(preset="1.2b", rows=ratio_rows),
                errors=[])


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_from_a_synthetic_json(tmp_path):
    paths = benchplot.plot_all(synthetic_result(), tmp_path)
    assert sorted(p.name for p in paths) == ["decode_latency_vs_active_ratio.png", "fraction_of_floor.png",
                                             "model.png", "speedup_vs_T.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p


def test_plots_only_for_the_parts_present(tmp_path):
    result = synthetic_result()
    del result["model"], result["ratio"]
    assert [p.name for p in benchplot.plot_all(result, tmp_path)] == ["speedup_vs_T.png", "fraction_of_floor.png"]
    assert benchplot.plot_all({"environment": {}}, tmp_path / "empty") == []


def test_summary_names_every_part_and_failure():
    text = benchplot.summary(synthetic_result())
    assert "Fake GPU X1" in text and "model 0.5b: decode 1000 vs 667 tok/s (1.50x, floor ratio 2.00x" in text
    assert "OutOfMemoryError: boom" in text and "ratio T=8 act 60.0%" in text


def test_cli_plot_only_redraws_from_the_json(tmp_path, capsys):
    (tmp_path / bench.RESULT_FILE).write_text(json.dumps(synthetic_result()))
    assert cli.main(["bench", "--plot-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "speedup_vs_T.png").read_bytes().startswith(PNG_MAGIC)


def test_readme_table_from_a_synthetic_json():
    rt = _script("readme_table")
    text = rt.table(synthetic_result())
    assert text.startswith("Measured on Fake GPU X1 (sm_90), torch 2.0, triton 3.0, 2030-01-02; bfloat16")
    # 0.1b, T=8: dense 20 * 8^0.25 = 33.6, triton 10 * 8^0.3 = 18.7, speed-up 33.6 / 18.7 = 1.80x
    assert "| 0.1b | 8 | 33.6 | 700.0 | 18.7 | 1.80x | 0.05 |" in text
    assert "| 0.5b | 21.0% | 1000 / 667 | 1.50 | 2.00 | 0.75 | 50000 / 90000 | 20000 / 40000 | 3.0 / 2.0 |" in text
    assert "| 1.2b | -% | - / - |" in text  # a failed model is a row of dashes, not a crash
    assert "T=1 triton: 9.5 µs at 5% active, 26.0 µs at 60% (dense twin 40.0 µs)" in text
    assert ", graph |" not in text  # no graph columns when no row has graph figures


def test_readme_table_gpu_busy_columns_only_when_measured():
    rt = _script("readme_table")
    result = synthetic_result()
    us, gpu = dict(dense_twin=1000.0, triton=2800.0), dict(dense_twin=1000.0, triton=1250.0)
    result["train"] = dict(tokens=4096, rows=[dict(preset="1.2b", T=4096, us=us, peak_bytes={}, speedup_vs_dense={
        k: 1000.0 / v for k, v in us.items()})])
    plain = rt.table(result)
    assert "| 1.2b | 1000 | 2800 | 0.36x | - | - |" in plain and "GPU-busy" not in plain
    result["train"]["rows"][0].update(gpu_us=gpu, gpu_speedup_vs_dense={k: 1000.0 / v for k, v in gpu.items()})
    result["model"]["rows"][0]["deco"]["train_step_gpu_us"] = 800.0
    result["model"]["rows"][0]["dense_twin"]["train_step_gpu_us"] = 1000.0
    text = rt.table(result)
    assert "| 1.2b | 1000 | 2800 | 0.36x | - | - | 1000 | 1250 | 0.80x |" in text
    assert "triton peak MiB | dense_twin GPU-busy µs | triton GPU-busy µs | triton vs dense, GPU-busy |" in text
    assert "| 3.0 / 2.0 | 800 / 1000 |" in text and "| 3.0 / 2.0 | - / - |" in text  # 0.5b has no GPU-busy figure
    for line in text.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.count("|") in {l.count("|") for l in text.splitlines() if l.startswith("| preset")}
    assert ", graph |" not in rt.train_table(result)
    result["train"]["rows"][0].update(graph_us=dict(dense_twin=990.0, triton=1100.0),
                                      graph_speedup_vs_dense=dict(dense_twin=1.0, triton=0.9))
    text = rt.train_table(result)
    assert "| dense_twin µs, graph | triton µs, graph | triton vs dense, graph |" in text
    assert text.rstrip().endswith("| 1000 | 1250 | 0.80x | 990 | 1100 | 0.90x |")
    header, separator, row = text.splitlines()[2:5]
    assert header.count("|") == separator.count("|") == row.count("|")
    only = dict(tokens=4096, rows=[dict(preset="1.2b", T=4096, us={"triton": 2800.0}, gpu_us={"triton": 1250.0})])
    header, separator, row = rt.train_table({"train": only}).splitlines()[2:5]
    assert header.count("|") == separator.count("|") == row.count("|")  # no dense twin measured


def test_readme_table_graph_training_column_only_when_measured():
    rt = _script("readme_table")
    result = synthetic_result()
    assert "train tok/s graph" not in rt.model_table(result)
    result["model"]["rows"][0]["deco"]["train_graph_tokens_per_s"] = 60000.0
    result["model"]["rows"][0]["dense_twin"]["train_graph_tokens_per_s"] = 75000.0
    text = rt.model_table(result)
    assert "| train tok/s graph DECO / dense |" in text and "captured into one CUDA graph" in text
    assert "| 3.0 / 2.0 | 60000 / 75000 |" in text and text.count("| - / - |") >= 1  # other rows: dashes
    for line in text.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.count("|") == text.splitlines()[2].count("|")


def test_readme_table_graph_columns():
    rt = _script("readme_table")
    result = synthetic_result()
    for r in result["rows"]:
        if not r["graph"]:
            r["graph_us"] = dict(dense_twin=100.0, triton=50.0)
            r["graph_speedup_vs_dense"] = dict(dense_twin=1.0, triton=2.0)
    text = rt.layer_table(result)
    assert "| dense_twin µs, graph | triton µs, graph | triton vs dense, graph |" in text
    assert text.count("| 100.0 | 50.0 | 2.00x |") == 2  # T=4096 of both presets
    assert "| 0.1b | 8 | 33.6 | 700.0 | 18.7 | 1.80x | 0.05 | 33.6 | 18.7 | 1.80x |" in text  # graph rows repeat


def test_compare_bench_pairs_every_figure_and_flags_changes(tmp_path, capsys):
    cb = _script("compare_bench")
    a = synthetic_result()
    b = json.loads(json.dumps(a))
    b["environment"]["date"] = "2030-01-03T00:00:00"
    for r in b["rows"]:
        r["us"] = {k: v * 1.02 for k, v in r["us"].items()}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert cb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    report = cb.compare(a, b, 0.05)
    assert report["parts"]["layer (device)"]["max_abs_change"] == pytest.approx(0.02)  # T <= 8: graphs
    assert report["parts"]["layer (host)"]["max_abs_change"] == pytest.approx(0.02)    # the rest: eager
    assert report["parts"]["ratio (device)"]["max_abs_change"] == 0 and report["only_in_one"] == 0
    b["rows"][-1]["us"]["triton"] *= 1.5  # T=4096, eager: the host's figure, listed but judged only with --all
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert cb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert cb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--all"]) == 1
    assert "beyond 5% (host): layer 1.2b 4096 triton" in capsys.readouterr().out
    b["rows"][0]["us"]["triton"] *= 1.5
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert cb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "beyond 5% (device): layer 0.1b 1 triton" in capsys.readouterr().out
    b["model"]["rows"][0]["deco"]["decode_method"] = "eager"  # timed on another clock: no pair
    assert cb.compare(a, b, 0.05)["other_clock"] == 1
    b["environment"]["gpu"] = "Other GPU"
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert cb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2


def test_readme_table_write_replaces_only_the_block(tmp_path):
    rt = _script("readme_table")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{rt.BEGIN}\nold\n{rt.END}\noutro\n")
    rt.write(str(readme), "new table")
    assert readme.read_text() == f"intro\n{rt.BEGIN}\nnew table\n{rt.END}\noutro\n"
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no .* block"):
        rt.write(str(readme), "x")


def test_readme_block_is_generated_from_a_committed_json():
    rt = _script("readme_table")
    readme = (REPO / "README.md").read_text()
    block = re.search(re.escape(rt.BEGIN) + r"\n(.*?)\n" + re.escape(rt.END), readme, re.S).group(1)
    candidates = sorted((REPO / "benchmarks" / "results").glob("*/bench.json"))
    tables = [rt.table(json.loads(p.read_text()), rt.plot_links(str(p.parent), str(p.parent.relative_to(REPO))))
              for p in candidates]
    assert block in tables, ("README.md's results block is not the table of any committed benchmark JSON: "
                             "run benchmarks/readme_table.py JSON --write README.md")


def test_floor_ratio_is_not_a_typed_constant():
    # The model's floor ratio follows the preset: larger models spend a larger share of weights in the FFN.
    small = bench.model_floor(DecoConfig.preset("0.1b"), 0.2, 128, 2, 1e12)["floor_ratio"]
    large = bench.model_floor(DecoConfig.preset("1.2b"), 0.2, 128, 2, 1e12)["floor_ratio"]
    assert 1 < small < large < 1 / 0.2 and not math.isclose(small, large)


def test_source_digest_names_the_code(tmp_path):
    for folder in ("deco_kernels", "reference", "autotune"):
        (tmp_path / folder / "__pycache__").mkdir(parents=True)
        (tmp_path / folder / "a.py").write_text(f"x = '{folder}'\n")
    first = bench.source_digest(tmp_path)
    (tmp_path / "deco_kernels" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("not code")
    assert bench.source_digest(tmp_path) == first  # caches and other files do not count
    (tmp_path / "autotune" / "a.py").write_text("x = 'changed'\n")
    assert bench.source_digest(tmp_path) != first
    assert len(bench.environment()["source_sha256"]) == 64


def test_an_output_off_the_reference_is_flagged_in_the_row_and_the_readme(monkeypatch):
    """A kernel whose output misses the dtype's bound still gets timed, but its row records the error and the
    README block names it under the layer table."""
    x, w, dense = bench.layer_inputs(SMALL, 16, "cpu", dtype=torch.float32)
    real = bench.ops.deco_ffn
    monkeypatch.setattr(bench.ops, "deco_ffn", lambda *a, **k: real(*a, **{**k, "backend": "torch"}) * 1.001)
    row = bench.layer_case(SMALL, "small", x[:8], w, dense, cpu_timer, 1e9, 1e12, ["triton"])
    assert "triton" in row["us"] and row["rel_err"]["triton"] == pytest.approx(1e-3, rel=1e-3)
    assert row["errors"]["triton"] == "output off the reference: rel_err 0.001 > 1e-05"
    rt = _script("readme_table")
    result = synthetic_result()
    assert "Wrong outputs" not in rt.table(result)
    result["rows"][0]["rel_err"] = {"triton": 0.025}
    text = rt.table(result)
    assert "**Wrong outputs in this run**" in text and "triton at 0.1b T=" in text and "rel_err 0.025 > 0.01" in text


def test_recheck_picks_remeasures_the_misses_first_and_skips_agreeing_entries(tmp_path):
    """benchmarks/recheck_picks.py on a fake layer: an entry whose picks are its best is skipped; the others
    are re-timed interleaved, the tune's misses first, each role's median over the rounds against the best's."""
    rp = _script("recheck_picks")
    a, b, c = (dict(rows=r) for r in (8, 16, 32))
    geom = "small_batch/d64_n4_de16_ds8_bf16"
    cache = {"entries": {
        f"{geom}/t1": dict(T=1, candidates=[dict(config=a, us=10.0), dict(config=b, us=12.0)]),
        f"{geom}/t2": dict(T=2, candidates=[dict(config=a, us=10.0), dict(config=c, us=15.0)]),
        f"{geom}/t3-4": dict(T=4, candidates=[dict(config=a, us=10.0), dict(config=b, us=11.0)]),
    }}
    def row(t, ratio, pick, held_out_ratio, held_out_pick):
        return dict(key=f"{geom}/{t}", ratio=ratio, passed=ratio <= 1.1, pick=pick, held_out_ratio=held_out_ratio,
                    held_out_passed=held_out_ratio <= 1.1, held_out_pick=held_out_pick)

    table = {"summary": dict(tolerance=0.1), "rows": [
        row("t1", 1.2, b, 1.2, b),          # a miss
        row("t2", 1.0, a, 1.5, c),          # a held-out miss
        row("t3-4", 1.0, a, 1.0, a),        # agrees: skipped
    ]}
    (tmp_path / "validation").mkdir()
    (tmp_path / "dev.json").write_text(json.dumps(cache))
    (tmp_path / "validation" / "dev.json").write_text(json.dumps(table))
    timed = []

    class FakeBench:
        def __init__(self, path, T, d, n, de, ds, dtype):
            assert (path, d, n, de, ds, dtype) == ("small_batch", 64, 4, 16, 8, torch.bfloat16)
            self.T = T

        def measure(self, cfg):
            timed.append((self.T, cfg["rows"]))
            return {8: 10.0, 16: 13.0, 32: 20.0}[cfg["rows"]] + len(timed) * 1e-3

    seen = []
    rows = rp.recheck(str(tmp_path / "dev.json"), rounds=3, make_bench=FakeBench, on_row=lambda r: seen.append(len(r)))
    assert [r["key"] for r in rows] == [f"{geom}/t1", f"{geom}/t2"] and seen == [1, 2]
    assert timed[:2] == [(1, 8), (1, 16)] and len(timed) == 2 * 3 + 2 * 3        # interleaved, two configs each
    t1, t2 = rows
    assert t1["pick"]["ratio"] == pytest.approx(1.3, rel=1e-3) and t1["best"]["ratio"] == 1.0
    assert t2["pick"]["ratio"] == 1.0 and t2["held_out_pick"]["ratio"] == pytest.approx(2.0, rel=1e-3)
    assert t2["tune_ratio"] == dict(pick=1.0, held_out_pick=1.5)
    assert not t1["pick"]["passed"] and t2["pick"]["passed"] and not t2["held_out_pick"]["passed"]
    assert all(r[role]["spread_us"][0] <= r[role]["us"] <= r[role]["spread_us"][1] for r in rows for role in rp.ROLES)
