"""deco_kernels.autotune on the CPU: buckets, fingerprints, cache files and their lookup order, the runner's
logic with a fake timer, the cost model's sanity, compile-only checks for sm_87; one GPU test."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from deco_kernels.autotune import buckets, cache, devices, lookup, model, runner, space
from deco_kernels.autotune.launches import meta_layer, record
from deco_kernels.triton import ffn as triton_ffn

H100 = devices.PROFILES["h100-sxm"]
ORIN = devices.PROFILES["orin-agx-64gb"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOM = (768, 42, 64, 128)          # preset 0.1b: d, N, de, ds
DEV = dict(name="Test GPU", capability=[9, 0], sms=7, memory_gb=16.0,
           fingerprint=devices.fingerprint_of("Test GPU", (9, 0), 7))
KEY1 = buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 1)


# ---------------------------------------------------------------- buckets and fingerprints

def test_buckets_cover_every_token_count_and_follow_the_paths():
    assert [buckets.bucket_of(t) for t in (1, 2, 4, 5, 8, 9, 16, 17, 64, 65, 512, 513, 2048, 2049, 10**6)] == [
        "t1", "t2", "t3-4", "t5-8", "t5-8", "t9-16", "t9-16", "t17-64", "t17-64", "t65-512", "t65-512",
        "t513-2048", "t513-2048", "t2049+", "t2049+"]
    for label, lo, hi, rep in buckets.BUCKETS:
        assert buckets.bucket_of(rep) == label and buckets.bucket_of(lo) == label
        assert buckets.path_of(lo) == buckets.path_of(rep)      # a bucket never straddles two kernel paths
    with pytest.raises(ValueError):
        buckets.bucket_of(0)


def test_keys_hold_buckets_never_raw_token_counts():
    k37 = buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 37)
    assert k37 == buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 50)
    assert k37 == "small_batch/d768_n42_de64_ds128_bf16/t17-64" and "37" not in k37
    assert buckets.entry_key("grouped", *GEOM, torch.float16, 3000) != buckets.entry_key(
        "grouped", *GEOM, torch.bfloat16, 3000)


def test_fingerprint_is_name_capability_and_sm_count():
    fp = devices.fingerprint_of("NVIDIA H100 80GB HBM3", (9, 0), 132)
    assert fp == "nvidia-h100-80gb-hbm3_sm90_132sm" == H100.fingerprint
    assert devices.fingerprint_of("NVIDIA H100 80GB HBM3", (9, 0), 114) != fp
    assert devices.fingerprint_of("NVIDIA H100 80GB HBM3", (8, 9), 132) != fp
    assert ORIN.fingerprint == "orin_sm87_16sm" and ORIN.smem_per_block == 163 * 1024 and ORIN.dram_gbps == 204.8
    # Orin NX 16GB and Orin Nano 8GB share a fingerprint; memory size tells them apart
    nx, nano = devices.PROFILES["orin-nx-16gb"], devices.PROFILES["orin-nano-8gb"]
    assert nx.fingerprint == nano.fingerprint
    assert devices.profile_for(dict(fingerprint=nx.fingerprint, memory_gb=7.4)) is nano
    assert devices.profile_for(dict(fingerprint=nx.fingerprint, memory_gb=15.3)) is nx


# ---------------------------------------------------------------- cache files and lookup

@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty env / user / shipped directories wired into the lookup; memo cleared before and after."""
    d = {k: tmp_path / k for k in ("env", "xdg", "shipped")}
    for p in d.values():
        p.mkdir()
    monkeypatch.setenv("DECO_KERNELS_TUNE_DIR", str(d["env"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(d["xdg"]))
    monkeypatch.delenv("DECO_KERNELS_AUTOTUNE", raising=False)
    monkeypatch.setattr(lookup, "SHIPPED_DIR", str(d["shipped"]))
    d["user"] = d["xdg"] / "deco_kernels" / "autotune"
    lookup.clear()
    yield d
    lookup.clear()


def _write(directory, block_d, device=DEV, key=KEY1, filename=None):
    cfg = dict(space.default_config("small_batch", 1, torch.bfloat16), block_d=block_d)
    return cache.merge_entries(str(directory), device, {key: {"config": cfg, "us": 1.0}}, filename=filename)


def _lookup(T=1, device=DEV):
    return lookup.config_for("small_batch", device, T, torch.bfloat16, *GEOM)


def test_lookup_order_env_then_user_then_shipped_then_default(dirs):
    assert lookup.user_cache_dir() == str(dirs["user"])
    _write(dirs["shipped"], 8)
    _write(dirs["user"], 16)
    _write(dirs["env"], 32)
    assert _lookup()["block_d"] == 32
    os.remove(dirs["env"] / f"{DEV['fingerprint']}.json")
    lookup.clear()
    assert _lookup()["block_d"] == 16
    os.remove(dirs["user"] / f"{DEV['fingerprint']}.json")
    lookup.clear()
    assert _lookup()["block_d"] == 8
    assert _lookup(T=512) is None                        # no entry for this bucket: the heuristic default
    other = dict(DEV, sms=8, fingerprint=devices.fingerprint_of("Test GPU", (9, 0), 8))
    assert _lookup(device=other) is None                 # another device's cache is never used


def test_lookup_is_memoised_and_skips_non_cuda_devices(dirs, monkeypatch):
    _write(dirs["env"], 32)
    assert _lookup()["block_d"] == 32
    os.remove(dirs["env"] / f"{DEV['fingerprint']}.json")
    assert _lookup(T=1)["block_d"] == 32                 # a dict hit: the file is not read again
    lookup.clear()
    assert _lookup() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup.config_for("small_batch", torch.device("cpu"), 1, torch.bfloat16, *GEOM) is None
    _write(dirs["env"], 32)
    lookup.clear()
    monkeypatch.setenv("DECO_KERNELS_AUTOTUNE", "0")
    assert _lookup() is None


def test_lookup_logs_the_source_once(dirs, caplog):
    _write(dirs["user"], 16)
    _write(dirs["user"], 16, key=buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 2))
    with caplog.at_level("INFO", logger="deco_kernels.autotune"):
        _lookup()
        _lookup(T=2)                                     # another bucket, same source: no second line
        _lookup(T=9)                                     # no entry: the defaults, one line
    lines = [r.getMessage() for r in caplog.records if "uses" in r.getMessage()]
    assert len(lines) == 2 and "user cache" in lines[0] and "heuristic defaults" in lines[1]


@pytest.mark.parametrize("damage", ["corrupt", "stale", "format", "unknown_key", "old_triton", "earlier_kernel"])
def test_bad_file_warns_and_falls_through(dirs, damage, monkeypatch):
    _write(dirs["user"], 16)
    path = _write(dirs["env"], 32)
    data = json.load(open(path))
    if damage == "corrupt":
        open(path, "w").write(json.dumps(data)[:-40])
    elif damage == "stale":
        data["versions"]["deco_kernels"] = "0.0.9"
    elif damage == "old_triton":
        data["versions"]["triton"] = "1.1.0"
        current = dict(cache.versions(), triton="3.6.0")
        monkeypatch.setattr(cache, "versions", lambda: current)
    elif damage == "format":
        data["format"] = 99
    elif damage == "unknown_key":
        data["entries"][KEY1]["config"]["tile_of_the_future"] = 3
    elif damage == "earlier_kernel":       # an entry without a key the current kernel reads: tuned for another
        del data["entries"][KEY1]["config"]["slots"]
    if damage != "corrupt":
        open(path, "w").write(json.dumps(data))
    with pytest.warns(UserWarning, match="deco_kernels.autotune: ignoring"):
        cfg = _lookup()
    assert cfg["block_d"] == 16                           # the next source serves the call


def test_stale_rule_is_major_minor_of_the_library_and_major_of_triton():
    cur = {"deco_kernels": "0.1.0", "triton": "3.6.0", "torch": "2.11"}
    assert cache.stale_reason({"deco_kernels": "0.1.7", "triton": "3.2.0"}, cur) is None
    assert cache.stale_reason({"deco_kernels": "0.2.0", "triton": "3.6.0"}, cur)
    assert cache.stale_reason({"deco_kernels": "0.1.0", "triton": "2.3.0"}, cur)
    assert cache.stale_reason({}, cur)


def _writer(directory, tag, count):
    for i in range(count):
        key = f"small_batch/d{i}_n1_de64_ds128_bf16/{tag}"
        cache.merge_entries(directory, DEV, {key: {"config": {"rows": i}, "us": float(i)}})


def test_a_merge_drops_entries_of_buckets_that_no_longer_exist(tmp_path):
    gone, kept = "small_batch/d8_n1_de64_ds128_bf16/t2-4", "small_batch/d8_n1_de64_ds128_bf16/t1"
    path = tmp_path / f"{DEV['fingerprint']}.json"
    cache.atomic_write_json(str(path), {"format": cache.FORMAT, "source": "measured", "device": DEV,
                                        "versions": cache.versions(), "date": cache.now(),
                                        "entries": {gone: {"config": {"rows": 1}}, kept: {"config": {"rows": 2}}}})
    new = "small_batch/d8_n1_de64_ds128_bf16/t2"
    cache.merge_entries(str(tmp_path), DEV, {new: {"config": {"rows": 3}}})
    assert set(cache.load(str(path))["entries"]) == {kept, new}


def test_two_processes_writing_at_once_keep_every_entry(tmp_path):
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), tag, 25)) for tag in ("t1", "t2")]
    for p in procs:
        p.start()
    path = tmp_path / f"{DEV['fingerprint']}.json"
    seen = 0
    while any(p.is_alive() for p in procs):     # readers never see half a file
        if path.exists():
            cache.load(str(path))
            seen += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    entries = cache.load(str(path))["entries"]
    assert len(entries) == 50 and seen > 0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ---------------------------------------------------------------- runner logic with a fake timer

class FakeBench:
    def __init__(self, times, fail=(), wrong=(), remeasure=None):
        self.times, self.fail, self.wrong, self.remeasure = times, set(fail), set(wrong), remeasure or {}
        self.measured = []

    def output(self, cfg):
        if cfg["id"] in self.fail:
            raise RuntimeError("out of resource: shared memory, Required: 300000")
        return (torch.ones(3) * (2.0 if cfg["id"] in self.wrong else 1.0),)

    def measure(self, cfg):
        self.measured.append(cfg["id"])
        if self.measured.count(cfg["id"]) > 1 and cfg["id"] in self.remeasure:
            return self.remeasure[cfg["id"]]
        return self.times[cfg["id"]]


def _tune(bench, n, **kw):
    cands = [{"id": i} for i in range(n)]
    return runner.tune_one(cands, bench.measure, output=bench.output, close=runner.close_enough(torch.bfloat16),
                           **kw)


def test_runner_keeps_the_fastest_correct_candidate_and_survives_failures():
    bench = FakeBench({0: 10.0, 1: 9.0, 2: 1.0, 3: 2.0, 4: 8.0}, fail={2}, wrong={3})
    res = _tune(bench, 5)
    assert res["config"] == {"id": 4} and res["us"] == 8.0 and res["default_us"] == 10.0
    rows = {r["config"]["id"]: r for r in res["candidates"]}
    assert rows[0]["us"] == 10.0 and len(rows) == 5                  # the default is measured and kept
    assert rows[2]["us"] is None and "out of resource" in rows[2]["error"]
    assert rows[3]["us"] is None and "differs" in rows[3]["error"]   # fast but wrong: rejected


def test_runner_checks_every_candidate_against_the_reference_the_default_too():
    # config 0 (the default) and 3 are wrong: with a reference both are rejected, and 1 wins though slower than 0
    bench = FakeBench({0: 1.0, 1: 9.0, 2: 5.0, 3: 0.5}, wrong={0, 3}, fail={2})
    res = _tune(bench, 4, reference=(torch.ones(3),))
    rows = {r["config"]["id"]: r for r in res["candidates"]}
    assert rows[0]["us"] is None and "off the reference" in rows[0]["error"]
    assert rows[3]["us"] is None and "off the reference" in rows[3]["error"]
    assert res["config"] == {"id": 1} and res["us"] == 9.0


def test_close_enough_needs_the_same_active_gates():
    close = runner.close_enough(torch.bfloat16)
    y, g = torch.ones(4, 3), torch.tensor([[0.0, 0.5], [0.25, 0.0]])
    assert close((y, g), (y, g))
    assert not close((y, g * 1.001), (y, g))                             # values beyond fp32 rounding
    assert not close((y, torch.tensor([[0.0, 0.5], [0.25, 0.01]])), (y, g))  # one more active expert
    assert close((y, torch.tensor([[0.0, 0.5], [0.25, 1e-7]])), (y, g))  # a gate on the threshold, either side
    assert not close((y * 1.02, g), (y, g))                              # y beyond the bf16 bound
    assert not close((torch.full_like(y, float("nan")), g), (y, g))


def test_runner_never_writes_a_config_slower_than_the_default():
    assert _tune(FakeBench({0: 5.0, 1: 6.0, 2: 7.0}), 3)["config"] == {"id": 0}
    # the winner was a lucky measurement: timed again it loses to the default, which stays
    res = _tune(FakeBench({0: 5.0, 1: 4.9}, remeasure={1: 5.5}), 2)
    assert res["config"] == {"id": 0} and res["us"] <= res["default_us"]


def test_runner_stops_at_the_deadline_but_always_measures_the_default():
    clock = iter(range(1, 100))                         # already past the deadline after the default
    res = _tune(FakeBench({i: 10.0 - i for i in range(5)}), 5, deadline=0.5, clock=lambda: next(clock))
    assert res["stopped"] and [r["config"]["id"] for r in res["candidates"]] == [0]
    assert res["config"] == {"id": 0} and res["us"] == 10.0


def test_runner_stops_the_tune_when_the_context_is_lost():
    with pytest.raises(runner.ContextLost):
        _tune(FakeBench({0: 1.0, 1: 1.0}, fail={1}), 2, healthy=lambda: False)


# ---------------------------------------------------------------- search space and cost model

def test_candidates_start_with_the_default_and_fit_the_device():
    for T, path in ((1, "small_batch"), (8, "small_batch"), (64, "small_batch"), (512, "grouped")):
        cands = space.candidates(path, T, *GEOM, torch.bfloat16, ORIN, limit=50)
        assert cands[0] == space.default_config(path, T, torch.bfloat16)
        assert len(cands) == 50 and len({tuple(sorted(c.items())) for c in cands}) == 50
        assert all(space.fits(path, c, T, *GEOM, 2, ORIN) is None for c in cands[1:])
    assert any(c["rows"] != 64 for c in space.candidates("small_batch", 8, *GEOM, torch.bfloat16, H100))
    # 5-8 tokens: both the tensor-core and the register-FMA kernels compete; from 9 on tensor cores only
    kinds = {c["use_dot"] for c in space.candidates("small_batch", 8, *GEOM, torch.bfloat16, H100)}
    assert kinds == {True, False}
    assert {c["use_dot"] for c in space.candidates("small_batch", 64, *GEOM, torch.bfloat16, H100)} == {True}
    # 3 stages of [64 + 64, 256] and [64 + 16, 256] bf16 tiles: fit an H100's 227 KB, not Orin's 163 KB
    big = dict(space.default_config("small_batch", 64, torch.bfloat16), up_stages=3, block_k=256, rows=64)
    assert space.fits("small_batch", big, 64, *GEOM, 2, H100) is None
    assert "shared memory" in space.fits("small_batch", big, 64, *GEOM, 2, ORIN)
    # presum is searched where there are partials to sum (split_k > 1) and never duplicates a config without
    dots = [c for c in space.candidates("small_batch", 16, *GEOM, torch.bfloat16, H100) if c["use_dot"]]
    assert {c["presum"] for c in dots if c["split_k"] > 1} == {True, False}
    assert not any(c["presum"] for c in dots if c["split_k"] == 1)
    # a tensor-core entry cached before the key existed is still a tuned choice (run with presum off)
    legacy = {k: v for k, v in space.default_config("small_batch", 16, torch.bfloat16).items() if k != "presum"}
    assert not space.missing_keys("small_batch", legacy, 16, torch.bfloat16)


def test_a_retune_measures_the_incumbent_right_after_the_default(tmp_path):
    from deco_kernels.autotune import tune
    task = dict(path="small_batch", T=16, geom=GEOM)
    cands = space.candidates("small_batch", 16, *GEOM, torch.bfloat16, H100, limit=40)
    held = dict(cands[7])
    seeded, pinned = tune.with_incumbent(cands, held, task, torch.bfloat16)
    assert pinned == 2 and seeded[:2] == [cands[0], held] and len(seeded) == len(cands)
    order = tune.order_candidates(seeded, [None, None] + [1.0] * (len(seeded) - 2), seed=3, pinned=2)
    assert order[:2] == [cands[0], held] and sorted(map(space._freeze, order)) == sorted(map(space._freeze, seeded))
    # one outside the space (another tile) is added; the default or a config of an earlier kernel is not seeded
    other = {**cands[0], "block_d": 8}
    assert tune.with_incumbent(cands, other, task, torch.bfloat16) == ([cands[0], other] + cands[1:], 2)
    assert tune.with_incumbent(cands, dict(cands[0]), task, torch.bfloat16) == (cands, 1)
    old = {k: v for k, v in held.items() if k != "split_k"}
    assert tune.with_incumbent(cands, old, task, torch.bfloat16) == (cands, 1)
    # incumbents come from the measured cache of this device in the output directory
    info = dict(name="GPU", capability="9.0", sms=132, memory_gb=80, fingerprint="gpu_sm90_132sm")
    key = buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 16)
    assert tune.incumbents(str(tmp_path), info) == {}
    cache.merge_entries(str(tmp_path), info, {key: dict(config=held, us=1.0, default_us=2.0, T=16,
                                                          source="measured", candidates=[])})
    assert tune.incumbents(str(tmp_path), info) == {key: held}


def _work(**kw):
    base = dict(name="k", programs=200, bytes=1e5, flops=1e6, rounds=4, warps=4, ilp=2, tensor_cores=True,
                smem=32768, regs=96)
    return model.Work(**{**base, **kw})


def test_cost_model_more_bytes_or_flops_is_never_faster():
    for prof in (H100, ORIN):
        for field, values in (("bytes", [1e3, 1e4, 1e5, 1e6, 1e7]), ("flops", [1e3, 1e5, 1e7, 1e9]),
                              ("programs", [1, 16, 132, 133, 1000, 5000]), ("rounds", [1, 2, 8, 32])):
            times = [model.kernel_us(_work(**{field: v}), prof) for v in values]
            assert times == sorted(times), (prof.key, field, times)
    assert model.kernel_us(_work(bytes=1e7), ORIN) > model.kernel_us(_work(bytes=1e5), ORIN)
    for prof in (H100, ORIN):
        for p in (1, 132, 133, 1000):
            times = [model.kernel_us(_work(atomics=v, programs=p), prof) for v in (0, 1e4, 1e5, 1e6)]
            assert times == sorted(times), (prof.key, p, times)
        for v in (1e4, 1e6):
            times = [model.kernel_us(_work(atomics=v, programs=p), prof) for p in (1, 132, 133, 1000)]
            assert times == sorted(times), (prof.key, v, times)


def _split_k_works(profile=H100, limit=10):
    """The Works of the tensor-core small-batch kernels (split-K up, expert-group down) for a sample of
    candidates at 8, 16 and 64 tokens, the defaults first."""
    out = []
    for T in (8, 16, 64):
        for cfg in space.candidates("small_batch", T, *GEOM, torch.bfloat16, profile, limit=limit):
            if cfg["use_dot"]:
                out += model.works_of(record("small_batch", cfg, T, *GEOM), T, *GEOM, torch.bfloat16)
    assert {w.name for w in out} == {"_up_kernel", "_union_down_kernel"}
    return out


def test_cost_model_split_k_kernels_more_work_is_never_faster():
    import dataclasses

    scaled = ("bytes", "dram", "flops", "fma_flops", "atomics", "rounds", "syncs", "tail_rounds", "tail_syncs")
    for prof in (H100, ORIN):
        for w in _split_k_works(prof):
            for field in scaled:
                base = getattr(w, field) or 1.0
                times = [model.kernel_us(dataclasses.replace(w, **{field: base * m}), prof) for m in (1, 2, 4)]
                assert times == sorted(times), (prof.key, w.name, field, times)
            times = [model.kernel_us(dataclasses.replace(w, programs=w.programs * m), prof) for m in (1, 2, 4)]
            assert times == sorted(times), (prof.key, w.name, "programs", times)


def test_decode_register_estimates_are_whole_counts_that_grow_with_the_tile():
    """The register-FMA kernels' estimate is the thread's whole count (no REG_BASE, as compiled for sm_90: no MMA
    or pipeline state), and a larger tile per thread never estimates fewer registers."""
    def regs(T=1, k=model.CONSTANTS, **kw):
        cfg = dict(dict(use_dot=False, rows=4, up_warps=4, block_d=16, slots=16, down_warps=8), **kw)
        works = model.works_of(record("small_batch", cfg, T, *GEOM, torch.bfloat16), T, *GEOM, torch.bfloat16)
        return {w.name: model._regs(w, k) for w in works}

    base = regs()
    assert base == regs(k=model.with_constants(reg_base=8.0)) == regs(k=model.with_constants(reg_base=128.0))
    assert all(r <= 255 for r in base.values())
    for kw in (dict(rows=8), dict(rows=16), dict(block_d=32), dict(slots=32)):
        bigger = regs(**kw)
        assert all(bigger[n] >= base[n] for n in base), (kw, base, bigger)
    fewer_threads = regs(up_warps=2, down_warps=4)
    assert all(fewer_threads[n] >= base[n] for n in base)


def test_split_k_works_follow_the_kernels(monkeypatch):
    import dataclasses

    d, n, de, ds = GEOM
    cdiv = lambda a, b: -(-a // b)           # noqa: E731

    def works(T=8, **kw):
        cfg = dict(space.default_config("small_batch", T, torch.bfloat16, True), **kw)
        return cfg, model.works_of(record("small_batch", cfg, T, *GEOM), T, *GEOM, torch.bfloat16)

    cfg, (up, down) = works()
    rows, split, bd, group = cfg["rows"], cfg["split_k"], cfg["block_d"], cfg["group"]
    # up: (shared row block, chunk) + (expert row block, chunk) + one mu program per chunk, averaged into one Work
    assert up.programs == up.grid == (cdiv(ds, rows) + n * (de // rows)) * split + split
    # down: per feature block the shared expert's program and one per group of experts
    nd, ng = cdiv(d, bd), cdiv(n, group)
    assert down.programs == down.grid == nd * (1 + ng)
    # one fp32 atomic add of [T, BLOCK_D] per program (a group adds only when one of its experts is active)
    total = down.atomics * down.programs
    assert nd * (1 + 0.9 * ng) * 8 * bd * 4 < total <= nd * (1 + ng) * 8 * bd * 4
    # larger groups: fewer programs and atomic adds, longer loops
    _, (_, big) = works(group=4 * group)
    assert big.programs < down.programs and big.atomics * big.programs < total and big.rounds > down.rounds
    # more K-chunks: more fp32 partials written by the up kernel; every one of the nd feature blocks re-reads
    # its active experts' partial tiles ...
    _, (up1, down1) = works(split_k=1)
    assert up1.dram < up.dram and down1.dram < down.dram
    assert 0.5 * nd < (down.dram - down1.dram) / (up.dram - up1.dram) <= nd
    # ... unless the up kernel sums them (presum): then the down kernel reads one h tile per expert whatever the
    # split (only the small logits and shared partials grow with it), and the up kernel has a longer tail
    _, (up_p, down_p) = works(presum=True)
    assert up_p.dram > up.dram and up_p.tail_rounds > up.tail_rounds
    assert (down_p.dram - down1.dram) < 0.5 * (up_p.dram - up1.dram)
    assert works(split_k=1, presum=True)[1] == works(split_k=1)[1]     # nothing to sum with one chunk
    # the shared expert's second K loop and the last arriver's epilogue come once per launch, not per wave
    assert up.tail_rounds > 0 and down.tail_rounds >= 1
    k = model.with_constants(overlap=0.0)
    lat = H100.mem_latency_us
    for w in (up, down):
        for m in (1, 3):                         # one wave or three: the tail adds at most its own time
            many = dataclasses.replace(w, programs=w.programs * m)
            untailed = dataclasses.replace(many, tail_rounds=0, tail_syncs=0)
            added = model.kernel_us(many, H100, k) - model.kernel_us(untailed, H100, k)
            assert 0 <= added <= w.tail_rounds * lat + w.tail_syncs * k.sync_cycles / (H100.clock_ghz * 1e3) + 1e-9


def test_atomics_are_paced_by_the_busiest_sm():
    # 133 programs put two on one SM: its reductions take twice those of a full first wave
    k = model.with_constants(overlap=0.0)
    one, two = (model.kernel_us(_work(programs=p, atomics=1e6, bytes=1e3, flops=1e3), H100, k) for p in (132, 133))
    assert (two - H100.launch_us) == pytest.approx(2 * (one - H100.launch_us), rel=1e-6)


def test_atomics_run_at_the_l2_rate_not_the_dram_rate():
    """The H200 has the H100's L2 and clock and 1.43x its DRAM bandwidth; its measured atomic prefill layers are
    5-10% faster, like its GEMM ones. An atomics-bound launch is predicted alike at any DRAM bandwidth, and
    faster with more SMs or a higher clock."""
    import dataclasses

    k = model.with_constants(overlap=0.0)
    w = _work(programs=264, atomics=1e6, bytes=1e3, flops=1e3)
    times = [model.kernel_us(w, dataclasses.replace(H100, dram_gbps=bw), k) for bw in (1000.0, 3350.0, 4800.0)]
    assert times[0] == pytest.approx(times[1], rel=1e-12) and times[1] == pytest.approx(times[2], rel=1e-12)
    for field, more in (("sms", 264), ("clock_ghz", 2 * H100.clock_ghz)):
        assert model.kernel_us(w, dataclasses.replace(H100, **{field: more}), k) < times[1]


def test_atomics_into_a_buffer_larger_than_the_l2_go_at_half_the_dram_rate():
    """The prefill's [T, d] fp32 accumulator fits the H100's 50 MB L2 at every preset size, not a Jetson Orin's 4 MB
    from ~1k tokens: there each add reads and writes DRAM."""
    import dataclasses

    k = model.with_constants(overlap=0.0)
    w = _work(programs=64, atomics=1e6, bytes=1e3, flops=1e3)
    inside, beyond = (dataclasses.replace(w, atomic_target=t) for t in (ORIN.l2_bytes // 2, 2 * ORIN.l2_bytes))
    bw = ORIN.dram_gbps * 1e3 * model.DRAM_EFFICIENCY
    l2_rate = model.ATOMIC_BYTES_PER_SM_CLOCK * ORIN.sms * ORIN.clock_ghz * 1e3 * k.atomic_efficiency
    for work, rate in ((inside, l2_rate), (beyond, min(l2_rate, bw / 2))):
        expect = ORIN.launch_us + -(-w.programs // ORIN.sms) * min(ORIN.sms, w.programs) * w.atomics / rate
        assert model.kernel_us(work, ORIN, k) == pytest.approx(expect, rel=1e-6)
    assert model.kernel_us(beyond, ORIN, k) > model.kernel_us(inside, ORIN, k)
    assert model.kernel_us(beyond, H100, k) == model.kernel_us(inside, H100, k)   # 8 MB: within the H100's L2


def test_the_model_ranks_the_split_routers_as_measured_on_the_h200():
    """benchmarks/results/h200/probe_router_warps.json: the prefill router alone at 512 tokens. Fewer token blocks
    split K more (32-token blocks: 5-7 chunks at 0.5b and 1.2b, 16-token blocks: 4), and the last arriver of
    each block then sums every chunk's partial tile, at the rate of that one program's loads in flight: with 4
    warps the 32-token blocks took 1.15-1.47x the 16-token ones. Where the two differ by more than 10%, the model
    orders every 4-warp pair as measured, and 6 of the 8 pairs in all (at 8 warps it sees 0.5b at block_k 128 and
    1.2b at 64 within 5%, measured 1.10-1.14x). Before it charged that read (two round trips for any split) it
    ordered 1 of the 8."""
    from deco_kernels import DecoConfig
    from deco_kernels.autotune.launches import record_router

    with open(os.path.join(REPO, "benchmarks/results/h200/probe_router_warps.json")) as f:
        probe = json.load(f)
    prof = devices.profile_of_environment(probe["environment"])

    def predicted(r):
        c = DecoConfig.preset(r["preset"])
        T, d, n = r["T"], c.d_model, c.num_experts
        launches = record_router(T, d, n, r["router_block_t"], r["stages"], r["warps"], r["block_k"])
        return sum(model.kernel_us(w, prof) for w in model.works_of(launches, T, d, n, 64, 128, torch.bfloat16))

    rows = {(r["preset"], r["block_k"], r["warps"], r["router_block_t"]): r for r in probe["rows"] if r["T"] == 512}
    pairs = [(rows[key + (16,)], rows[key + (32,)]) for key in {k[:3] for k in rows}]
    judged = [(a, b) for a, b in pairs if max(a["us"], b["us"]) > 1.1 * min(a["us"], b["us"])]
    assert len(judged) == 8
    right = [(predicted(a) < predicted(b)) == (a["us"] < b["us"]) for a, b in judged]
    assert all(ok for ok, (a, _) in zip(right, judged) if a["warps"] == 4) and sum(right) >= 6, right


def test_every_resident_block_holds_the_reserved_shared_memory():
    # 114 KB programs: two fill the H100's 228 KB exactly, but each block also holds the driver's 1 KB (why a block
    # may use 227 KB), so one is resident: the H200's split-K down kernels at block_d 256 (116736 B compiled for
    # sm_90) ran one program per SM.
    for prof in (H100, ORIN):
        assert prof.smem_per_block + prof.smem_reserved_per_block == prof.smem_per_sm
        half = _work(programs=264, bytes=1e3, flops=1e3, smem=prof.smem_per_sm // 2, regs=32)
        assert model._occupancy(half, prof) == 1
        fits = _work(programs=264, bytes=1e3, flops=1e3, smem=prof.smem_per_sm // 2 - prof.smem_reserved_per_block,
                     regs=32)
        assert model._occupancy(fits, prof) == 2
    # one resident program more is never predicted slower
    k = model.with_constants(overlap=0.0)
    assert model.kernel_us(fits, H100, k) <= model.kernel_us(half, H100, k)


def test_wgmma_keeps_one_more_stage_on_hopper_only():
    import dataclasses

    def up_work(**kw):
        cfg = dict(space.default_config("grouped", 2048, torch.bfloat16), **kw)
        ws = model.works_of(record("grouped", cfg, 2048, *GEOM), 2048, *GEOM, torch.bfloat16)
        return next(w for w in ws if w.name == "_grouped_up_kernel")

    for bm in (32, 64, 128):
        up = up_work(block_m=bm, up_stages=3, block_k=128)
        assert (up.wgmma_smem > 0) == (bm >= 64)
        assert model._occupancy(up, H100) <= model._occupancy(dataclasses.replace(up, wgmma_smem=0), H100)
        assert model._occupancy(up, ORIN) == model._occupancy(dataclasses.replace(up, wgmma_smem=0), ORIN)
    # the estimate is the compiled sm_90 shared memory of every grouped up-projection the H100 cache measured
    path = os.path.join(lookup.SHIPPED_DIR, "validation", "nvidia-h100-80gb-hbm3_sm90_132sm.usage.json")
    with open(path) as f:
        entries = json.load(f)["entries"]
    checked = 0
    for key, u in entries.items():
        k = json.loads(key)
        if k["kernel"] != "_grouped_up_kernel" or k["constexprs"]["DE"] != str(GEOM[2]):
            continue
        c = k["constexprs"]
        up = up_work(block_m=int(c["BLOCK_M"]), block_k=int(c["BLOCK_K"]), up_warps=k["num_warps"],
                     up_stages=k["num_stages"])
        assert up.smem + up.wgmma_smem == u["shared"], (k, u)
        checked += 1
    assert checked > 20


def test_cost_model_more_sms_bandwidth_or_clock_is_never_slower():
    import dataclasses

    def fill_us(w, prof):         # the first stage's fill shares the bandwidth the same way (at most this much)
        return model.kernel_us(w, prof) - model.kernel_us(dataclasses.replace(w, first_load=0.0), prof)

    for w in (_work(), _work(programs=7), _work(programs=4000, bytes=1e6), _work(tensor_cores=False, flops=1e8),
              _work(tail_rounds=3, tail_syncs=20), _work(programs=48, atomics=1e5),
              *_split_k_works(ORIN, limit=6)):
        for field, values in (("sms", [1, 6, 8, 9, 16, 100, 132, 200]), ("dram_gbps", [50, 204.8, 3350]),
                              ("clock_ghz", [0.6, 1.3, 1.9])):
            profs = [dataclasses.replace(ORIN, **{field: v}) for v in values]
            lean = [model.kernel_us(dataclasses.replace(w, atomics=0.0, first_load=0.0), p) for p in profs]
            assert lean == sorted(lean, reverse=True), (field, lean)
            times = [model.kernel_us(w, p) for p in profs]
            for a in range(len(profs) - 1):
                slack = 0.0
                if field == "sms":
                    slack = max(0.0, fill_us(w, profs[a + 1]) - fill_us(w, profs[a]))
                assert times[a + 1] <= times[a] + slack + 1e-9, (field, times)
    # whole paths: the bigger Orin is never predicted slower than the smaller ones
    for T, path in ((1, "small_batch"), (8, "small_batch"), (16, "small_batch"), (64, "small_batch"),
                    (512, "grouped")):
        cfg = space.default_config(path, T, torch.bfloat16)
        t = [model.predict(path, cfg, T, *GEOM, torch.bfloat16, devices.PROFILES[k])
             for k in ("orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb")]
        assert t == sorted(t), (path, t)
        assert model.predict(path, cfg, T, *GEOM, torch.bfloat16, H100) < t[0]


def test_recorded_launches_follow_the_launcher():
    launches = record("small_batch", space.default_config("small_batch", 1, torch.bfloat16), 1, *GEOM)
    assert [ln.name for ln in launches] == ["_up_kernel", "_decode_down_kernel"]
    assert launches[1].grid == ((GEOM[0] + 15) // 16,)
    assert all(t.device.type == "meta" for ln in launches for t in ln.args.values() if isinstance(t, torch.Tensor))
    cfg = space.default_config("grouped", 512, torch.bfloat16)
    names = {down: [ln.name for ln in record("grouped", dict(cfg, down=down), 512, *GEOM)]
             for down in ("gemm", "atomics")}
    assert "_grouped_up_kernel" in names["gemm"] and "_grouped_down_kernel" not in names["gemm"]
    assert "_grouped_up_kernel" in names["atomics"] and "_grouped_down_kernel" in names["atomics"]
    assert cfg["down"] == "gemm"


def test_the_grouped_tune_searches_both_down_projections(monkeypatch):
    """The prefill's down projection is a config key the tune searches: with the GEMM the atomic kernel's tiles
    keep their defaults; the model adds the GEMM's cost (zero fill and cuBLAS) where the atomic kernel's launch
    is not recorded. Cached configs without the key run the GEMM and were measured with the atomics."""
    from deco_kernels.triton import ffn

    assert set(space.GROUPED_ATOMICS) - set(space.GROUPED_GEMM) == set(space.GROUPED_DOWN_KEYS)
    base = space.default_config("grouped", 512, torch.bfloat16)
    cands = space.candidates("grouped", 512, *GEOM, torch.bfloat16, H100, limit=400)
    by_mode = {m: [c for c in cands if c["down"] == m] for m in ("gemm", "atomics")}
    assert len(by_mode["gemm"]) > 10 and len(by_mode["atomics"]) > 10
    assert all(c[k] == base[k] for c in by_mode["gemm"] for k in space.GROUPED_DOWN_KEYS)
    assert {c["block_d"] for c in by_mode["atomics"]} == set(space.GROUPED_ATOMICS["block_d"])

    # The GEMM mode's two library launches are modelled; the atomic kernel is not recorded.
    names = [w.name for w in model.works_of(record("grouped", base, 512, *GEOM), 512, *GEOM, torch.bfloat16)]
    assert "down_gemm (cuBLAS)" in names and "zero_fill (torch)" in names and "_grouped_down_kernel" not in names

    # The key decides unless ffn.DOWN_GEMM forces a mode or the deterministic mode forces the GEMM.
    assert ffn.down_gemm(dict(down="gemm")) and not ffn.down_gemm(dict(down="atomics")) and ffn.down_gemm({})
    monkeypatch.setattr(ffn, "DOWN_GEMM", 1)
    assert ffn.down_gemm(dict(down="atomics"))
    monkeypatch.setattr(ffn, "DOWN_GEMM", 0)
    assert not ffn.down_gemm(dict(down="gemm"))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert ffn.down_gemm(dict(down="atomics"))

    legacy = {k: v for k, v in base.items() if k != "down"}
    assert not space.missing_keys("grouped", legacy, 512, torch.bfloat16)
    assert space.as_measured("grouped", legacy)["down"] == "atomics"
    assert space.as_measured("grouped", base) == base
    assert space.as_measured("small_batch", legacy) == legacy


def probe_ab_down_gemm() -> dict:
    """(preset, T, "gemm" | "atomics") -> µs of the whole prefill layer under CUDA graphs on the H100, default
    tiles (benchmarks/results/h100/probe_ab_down_gemm.json)."""
    with open(os.path.join(REPO, "benchmarks/results/h100/probe_ab_down_gemm.json")) as f:
        return {(r["preset"], r["T"], r["variant"]): r["us"] for r in json.load(f)["rows"]}


def test_the_model_ranks_the_down_projections_as_measured_on_the_h100():
    """benchmarks/results/h100/probe_ab_down_gemm.json: the whole prefill layer under CUDA graphs with each down
    projection (default tiles), 0.1b and 1.2b at 128-4096 tokens; the GEMM won everywhere. The model picks the
    faster one at every size and predicts the GEMM's time within 25%."""
    measured = probe_ab_down_gemm()
    geoms = {"0.1b": (768, 42, 64, 128), "1.2b": (1792, 102, 64, 128)}
    cases = sorted({(p, T) for p, T, _ in measured})
    assert len(cases) == 8
    for preset, T in cases:
        pred = {m: model.predict("grouped", dict(space.default_config("grouped", T, torch.bfloat16), down=m), T,
                                 *geoms[preset], torch.bfloat16, H100) for m in ("gemm", "atomics")}
        fast = min(pred, key=pred.get)
        assert fast == min(("gemm", "atomics"), key=lambda m: measured[preset, T, m]), (preset, T, pred)
        assert abs(pred["gemm"] / measured[preset, T, "gemm"] - 1) < 0.25, (preset, T, pred)


def test_the_orin_prefill_choice_survives_the_atomics_measured_cost():
    """The H100 cache holds measured atomics and GEMM candidates at every prefill bucket, and the shipped fit
    puts the H100's 1.2b T=4096 atomic layer within 15% of the 401.7 µs measured (probe_ab_down_gemm.json).
    With the atomics' efficiency set so that this figure is within 5% of the measurement, and with the shipped
    one, the model's choice for Orin's prefill is the same, so the modelled Orin caches rest on neither: at 512
    tokens (the [T, d] fp32 accumulator, 3.7 MB, fits Orin's 4 MB L2) the atomics by at least 5%; at 4096 (29
    MB) the adds go through DRAM at half its rate whatever their efficiency at the L2, and the GEMM wins."""
    measured = probe_ab_down_gemm()["1.2b", 4096, "atomics"]
    geom = (1792, 102, 64, 128)

    def layer(profile, down, constants, T=4096):
        cfg = dict(space.default_config("grouped", T, torch.bfloat16), down=down)
        return model.predict("grouped", cfg, T, *geom, torch.bfloat16, profile, constants=constants)

    lo, hi = 0.05, 5.0        # the atomics' efficiency at which the model meets the measurement (bisection)
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if layer(H100, "atomics", model.with_constants(atomic_efficiency=mid)) < measured \
            else (mid, hi)
    matched = model.with_constants(atomic_efficiency=hi)
    assert abs(layer(H100, "atomics", model.CONSTANTS) / measured - 1) < 0.15
    assert abs(layer(H100, "atomics", matched) / measured - 1) < 0.05
    assert 512 * geom[0] * 4 < ORIN.l2_bytes < 4096 * geom[0] * 4
    for constants in (model.CONSTANTS, matched):
        assert layer(ORIN, "atomics", constants, T=512) < 0.95 * layer(ORIN, "gemm", constants, T=512)
        assert layer(ORIN, "gemm", constants) < layer(ORIN, "atomics", constants)
    assert layer(ORIN, "atomics", matched) == pytest.approx(layer(ORIN, "atomics", model.CONSTANTS), rel=1e-9)


def test_validation_compares_the_model_pick_with_the_measured_best(tmp_path):
    from deco_kernels.autotune import validate

    cfgs = space.candidates("small_batch", 8, *GEOM, torch.bfloat16, H100, limit=4)
    preds = [model.predict("small_batch", c, 8, *GEOM, torch.bfloat16, H100) for c in cfgs]
    pick = min(range(4), key=lambda i: preds[i])
    rows = [{"config": c, "us": 10.0 + i} for i, c in enumerate(cfgs)]
    rows[pick]["us"] = 20.0                                  # the model's favourite is measured slowest
    key = buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 8)
    dev = dict(H100.to_json(), capability=list(H100.capability))
    path = cache.merge_entries(str(tmp_path), dev, {key: {"config": cfgs[0], "candidates": rows, "T": 8}})
    report = validate.validate(path)
    (row,) = report["rows"]
    assert row["pick_us"] == 20.0 and row["best_us"] == min(r["us"] for r in rows) and not row["passed"]
    assert report["summary"]["judged"] == 1 and report["summary"]["passed"] == 0
    assert "NO" in validate.format_table(report)


def test_sweep_report_ranks_the_measured_configs_of_a_sweep(tmp_path):
    from deco_kernels.autotune import validate

    cfgs = space.candidates("small_batch", 8, 768, 42, 64, 128, torch.bfloat16, H100, limit=5)
    preds = [model.predict("small_batch", c, 8, 768, 42, 64, 128, torch.bfloat16, H100) for c in cfgs]
    order = sorted(range(5), key=lambda i: preds[i])
    rows = [dict(T=8, cfg=cfgs[i], us=10.0 + rank) for rank, i in enumerate(order)]    # measured as modelled
    rows[0] = dict(rows[0], us=30.0)                                    # ... but the model's pick is slowest
    rows.append(dict(T=8, cfg=cfgs[0], us=None))                        # a failed config is skipped
    env = dict(gpu=H100.name, capability="9.0", sms=132, memory_bytes=80 * 2**30)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(dict(preset="0.1b", environment=env, rows=rows)))
    (r,) = validate.sweep_report(str(path))
    assert (r["profile"], r["T"], r["configs"]) == ("h100-sxm", 8, 5)
    assert r["ratio"] == pytest.approx(30.0 / 11.0) and r["pick"] == cfgs[order[0]]
    assert r["spearman"] == pytest.approx(1 - 6 * (16 + 4 * 1) / (5 * 24))    # ranks 4,0,1,2,3 against 0..4


def _synthetic_entries(truth):
    """Entries for two geometries whose 'measured' µs come from the model itself with constants `truth`."""
    from deco_kernels.autotune import calibrate

    out = []
    for geom in (GEOM, (1024, 57, 64, 128)):
        for T, path in ((1, "small_batch"), (8, "small_batch"), (512, "grouped")):
            cfgs = space.candidates(path, T, *geom, torch.bfloat16, H100, limit=12)
            works = [model.works_of(record(path, c, T, *geom), T, *geom, torch.bfloat16) for c in cfgs]
            us = [sum(model.kernel_us(w, H100, truth) for w in ws) for ws in works]
            key = buckets.entry_key(path, *geom, torch.bfloat16, T)
            out.append(calibrate.Entry(key, path, key.split("/")[1], T, cfgs, us, works))
    return out


def test_calibration_fit_never_worsens_the_objective():
    from deco_kernels.autotune import calibrate

    truth = model.with_constants(tc_efficiency=0.5, sync_cycles=400.0, overlap=0.1)
    entries = _synthetic_entries(truth)
    assert calibrate.judge(entries, H100, truth)["passed"] == len(entries)      # the truth picks every best
    for start in (calibrate.START, model.with_constants(sync_cycles=20.0, overlap=0.9, reg_base=10.0)):
        before = calibrate.judge(entries, H100, start, anchors=[])
        k, after = calibrate.fit(entries, H100, start, anchors=[])
        assert (after["passed"], -after["mean_log_ratio"]) >= (before["passed"], -before["mean_log_ratio"])
        assert after == calibrate.judge(entries, H100, k, anchors=[])
        for name, (lo, hi) in calibrate.BOUNDS.items():
            assert lo <= getattr(k, name) <= hi
    # with anchors the absolute measurements come first: the fit leaves no more of them off than its start
    anchors = calibrate.default_anchors()
    start = model.with_constants(atomic_efficiency=0.3)
    before = calibrate.judge(entries, H100, start, anchors=anchors)
    k, after = calibrate.fit(entries, H100, start, sweeps=1, anchors=anchors)
    assert before["anchors_off"] and len(after["anchors_off"]) <= len(before["anchors_off"])
    assert calibrate._score(after) <= calibrate._score(before)


def test_the_shipped_fit_keeps_the_measured_prefill_layers_within_the_anchor_tolerance():
    """The 16 whole-layer measurements of results/h100/probe_ab_down_gemm.json anchor the constants' scale: the
    shipped ones predict each within 30%; a ranking-only refit of 2026-12-05 (atomic_efficiency 0.30) did not."""
    from deco_kernels.autotune import calibrate

    anchors = calibrate.default_anchors()
    assert len(anchors) == 16 and {a.profile.key for a in anchors} == {"h100-sxm"}
    assert {a.label for a in anchors} >= {"1.2b T=4096 atomics", "0.1b T=128 gemm"}
    assert calibrate.anchors_off(anchors) == []
    off = calibrate.anchors_off(anchors, model.with_constants(atomic_efficiency=0.30))
    assert "1.2b T=4096 atomics" in dict(off) and dict(off)["1.2b T=4096 atomics"] > 1.3


def test_soft_regret_moves_with_the_predictions_where_the_pick_does_not():
    from deco_kernels.autotune import calibrate

    us = [10.0, 12.0, 20.0]                     # measured: the first candidate is the best
    assert calibrate.soft_regret([1.0, 10.0, 10.0], us, 0.1) == pytest.approx(0.0, abs=1e-9)
    assert calibrate.soft_regret([10.0, 1.0, 10.0], us, 0.1) == pytest.approx(math.log(1.2), rel=1e-6)
    # the second candidate stays the pick while the best's prediction comes closer: the regret falls, smoothly
    regrets = [calibrate.soft_regret([p, 1.0, 5.0], us, 0.1) for p in (1.5, 1.2, 1.05, 1.0001)]
    assert math.log(1.2) > regrets[0] > regrets[1] > regrets[2] > regrets[3] > 0
    assert regrets[3] == pytest.approx(math.log(1.2) / 2, rel=1e-3)      # a tie: half of each
    entries = _synthetic_entries(model.CONSTANTS)
    res = calibrate.judge(entries, H100, model.CONSTANTS)
    # the truth itself picks every best and ranks the fast candidates first (not exactly zero: candidates within
    # 10% of its pick share the weight); far-off constants rank slow ones ahead
    assert res["passed"] == len(entries) and res["soft_regret"] < 0.1
    for wrong in (dict(fma_efficiency=0.02), dict(sync_cycles=10.0)):
        assert calibrate.judge(entries, H100, model.with_constants(**wrong))["soft_regret"] > res["soft_regret"]


def test_held_out_split_never_leaks_the_held_out_geometry(monkeypatch):
    from deco_kernels.autotune import calibrate

    entries = _synthetic_entries(model.CONSTANTS)
    geoms = calibrate.geometries(entries)
    assert len(geoms) == 2
    for g in geoms:
        train, test = calibrate.split(entries, g)
        assert test and all(e.geometry == g for e in test)
        assert train and all(e.geometry != g for e in train)
        assert len(train) + len(test) == len(entries)
    seen = []
    real_fit = calibrate.fit

    def spy(train, *a, **kw):
        seen.append({e.geometry for e in train} | {x.geometry for x in kw["anchors"]})
        return real_fit(train, *a, sweeps=1, **{k: v for k, v in kw.items() if k != "sweeps"})
    monkeypatch.setattr(calibrate, "fit", spy)
    # anchors of both geometries: each goes out with its geometry
    anchors = [a for a in calibrate.default_anchors() if a.label.endswith("T=512 gemm")]
    for a, g in zip(anchors, geoms):
        monkeypatch.setattr(a, "geometry", g)
    monkeypatch.setattr(calibrate, "_ANCHORS", anchors)
    ho = calibrate.held_out(entries, H100)
    assert [f["held_out"] for f in ho["folds"]] == geoms
    assert seen == [set(geoms) - {g} for g in geoms]                 # each fit saw every geometry but its own
    assert ho["judged"] == len(entries) and 0 <= ho["passed"] <= ho["judged"]


def test_joint_fit_models_each_entry_on_its_device_and_holds_a_geometry_out_on_every_device(monkeypatch):
    import dataclasses

    from deco_kernels.autotune import calibrate

    h200 = devices.PROFILES["h200"]
    truth = model.with_constants(tc_efficiency=0.5, sync_cycles=400.0, overlap=0.1)
    entries = []
    for prof in (H100, h200):
        for e in _synthetic_entries(truth):
            us = [sum(model.kernel_us(w, prof, truth) for w in ws) for ws in e.works]
            entries.append(dataclasses.replace(e, us=us, profile=prof, cache=prof.key + ".json"))
    res = calibrate.judge(entries, None, truth)
    assert res["passed"] == len(entries)                          # each entry judged on its own profile
    assert {r["device"] for r in res["rows"]} == {"h100-sxm", "h200"}
    assert calibrate.by_device(res) == {p.key: dict(passed=len(entries) // 2, judged=len(entries) // 2,
                                                    worst_ratio=1.0) for p in (H100, h200)}
    seen = []
    real_fit = calibrate.fit

    def spy(train, *a, **kw):
        seen.append({(e.geometry, e.device) for e in train})
        return real_fit(train, *a, sweeps=1, **{k: v for k, v in kw.items() if k != "sweeps"})
    monkeypatch.setattr(calibrate, "fit", spy)
    ho = calibrate.held_out(entries)
    geoms = calibrate.geometries(entries)
    # each fold trains on both devices' entries of every other geometry and none of the held-out one
    assert seen == [{(g2, d) for g2 in geoms if g2 != g for d in ("h100-sxm", "h200")} for g in geoms]
    assert ho["judged"] == len(entries)
    assert all(set(f["by_device"]) == {"h100-sxm", "h200"} for f in ho["folds"])


def test_shipped_constants_are_the_joint_fit_on_the_measured_caches():
    from deco_kernels.autotune import calibrate

    paths = calibrate.fit_cache_paths()
    assert all(os.path.exists(p) for p in paths) and len(paths) >= 2
    for p in paths:      # what the validation tables (deco-kernels tune --validate-cache) say in-sample
        with open(os.path.join(os.path.dirname(p), "validation", os.path.basename(p))) as f:
            s = json.load(f)["summary"]
        assert s["constants"] == model.CONSTANTS.to_json()
        assert sorted(s["held_out"]["fitted_on"]) == sorted(os.path.basename(q) for q in paths)
    # the docstring's figures are those of the validation tables (calibrate --ship writes both)
    tables = []
    for p in paths:
        with open(os.path.join(os.path.dirname(p), "validation", os.path.basename(p))) as f:
            tables.append(json.load(f))
    assert " ".join(calibrate.fit_paragraph(tables).split()) in " ".join(model.__doc__.split())


def test_ship_rewrites_the_constants_and_the_fit_paragraph_only(tmp_path):
    from deco_kernels.autotune import calibrate

    path = str(tmp_path / "model.py")
    with open(model.__file__) as f:
        before = f.read()
    with open(path, "w") as f:
        f.write(before)
    k = calibrate.rounded(model.with_constants(tc_efficiency=0.123456, sync_cycles=321.987))
    assert (k.tc_efficiency, k.sync_cycles) == (0.1235, 322.0)
    calibrate.write_constants(k, path)
    calibrate.write_fit_paragraph("Current fit (test): 1/1.", path)
    with open(path) as f:
        after = f.read()
    ns = {}
    exec(compile(after, path, "exec"), ns)
    assert ns["Constants"]().to_json() == k.to_json()
    assert "Current fit (test): 1/1.\n\n" in after and ns["__doc__"].count("Current fit") == 1
    def rest(src):      # the source without the constants' defaults and the fit paragraph
        import re

        start = src.index("Current fit (")
        src = src[:start] + src[src.index("\n\n", start):]
        return re.sub(r"^    \w+: float = \S+$", "", src, flags=re.M)
    assert rest(after) == rest(before)


def test_grouped_warps_beyond_the_row_tile_split_columns_and_wait_more():
    def work(kernel, **kw):
        cfg = dict(space.default_config("grouped", 512, torch.bfloat16), **kw)
        ws = model.works_of(record("grouped", dict(cfg, down="atomics"), 512, *GEOM), 512, *GEOM, torch.bfloat16)
        return next(w for w in ws if w.name == kernel)

    for kernel, warps in (("_grouped_down_kernel", "down_warps"), ("_grouped_up_kernel", "up_warps")):
        base = work(kernel, block_m=128, **{warps: 4})
        assert work(kernel, block_m=128, **{warps: 8}).syncs == base.syncs      # 8 warps x 16 rows = 128
        assert work(kernel, block_m=32, **{warps: 8}).syncs == 2 * work(kernel, block_m=32, **{warps: 4}).syncs


def test_usage_cache_hits_misses_atomic_write_and_corrupt_file(tmp_path, monkeypatch):
    from deco_kernels.autotune import compile as C

    calls = []

    def fake_compile(ln, capability):
        calls.append((ln.name, capability))
        if ln.name == "_union_down_kernel":
            raise ValueError("out of resources")          # a config that does not compile
        return dict(shared=1024, regs=64, spills=0, num_warps=ln.options.get("num_warps", 4))

    cfg = space.default_config("small_batch", 8, torch.bfloat16)
    launches = record("small_batch", cfg, 8, *GEOM)
    names = {ln.name for ln in launches}
    path = tmp_path / "validation" / "dev.usage.json"
    uc = C.UsageCache(str(path), (9, 0), fake_compile)
    first = uc.usage(launches)
    assert uc.compiled == len(launches) and uc.hits == 0 and len(calls) == len(launches)
    assert set(first) == names - {"_union_down_kernel"}     # the failed kernel is left to the model's estimate
    # d and N are runtime arguments: another geometry with the same tiles and divisibility is the same binary
    assert uc.usage(record("small_batch", cfg, 8, 1024, 57, 64, 128)) == first and len(calls) == len(launches)
    uc.save()
    assert sorted(os.listdir(path.parent)) == ["dev.usage.json"]          # no temporary file left behind
    again = C.UsageCache(str(path), (9, 0), lambda *a: pytest.fail("recompiled a cached binary"))
    assert again.usage(launches) == first and again.hits == len(launches) and again.compiled == 0
    assert C.UsageCache(str(path), (8, 7), fake_compile).usage(launches) and calls[-1][1] == (8, 7)  # arch: a miss

    # A write that dies half-way leaves the old file whole.
    before = path.read_text()
    uc = C.UsageCache(str(path), (8, 0), fake_compile)
    uc.usage(launches)

    def broken_dump(obj, f, **kw):
        f.write('{"format": 1, "entr')
        raise OSError("disk full")
    monkeypatch.setattr(C.json, "dump", broken_dump)
    with pytest.raises(OSError):
        uc.save()
    monkeypatch.undo()
    assert path.read_text() == before and sorted(os.listdir(path.parent)) == ["dev.usage.json"]

    # A corrupt file is ignored with a warning: everything recompiles and the next save replaces it.
    path.write_text('{"format": 1, "entries": {"trunc')
    calls.clear()
    with pytest.warns(UserWarning, match="unreadable"):
        uc = C.UsageCache(str(path), (9, 0), fake_compile)
    assert uc.usage(launches) == first and len(calls) == len(launches)
    uc.save()
    assert json.loads(path.read_text())["format"] == C.UsageCache.FORMAT

    # Where nothing can be compiled, the usage is empty (the model estimates) and nothing is written.
    def unavailable(ln, capability):
        raise C.CompileUnavailable("no compiler here")
    empty = tmp_path / "empty.usage.json"
    uc = C.UsageCache(str(empty), (9, 0), unavailable)
    assert uc.usage(launches) == {} and uc.unavailable == "no compiler here"
    uc.save()
    assert not empty.exists()


def test_compiled_usage_replaces_the_estimates():
    cfg = space.default_config("small_batch", 1, torch.bfloat16)
    launches = record("small_batch", cfg, 1, *GEOM)
    usage = {ln.name: dict(shared=0, regs=32, spills=0) for ln in launches}
    spilled = {ln.name: dict(shared=0, regs=255, spills=512) for ln in launches}
    lean, heavy = (model.predict("small_batch", cfg, 1, *GEOM, torch.bfloat16, H100, usage=u, launches=launches)
                   for u in (usage, spilled))
    assert heavy > lean                                   # spills and fewer resident programs never help
    for w in model.works_of(launches, 1, *GEOM, torch.bfloat16, spilled):
        assert w.regs == 255 and w.spills == 512


# ---------------------------------------------------------------- shipped caches and the CLI

def test_no_shipped_cache_entry_was_tuned_for_an_earlier_kernel():
    """A kernel change that adds a config key (or drops one) must come with re-tuned or removed shipped entries:
    the lookup ignores an entry lacking a key its kernel reads or holding one it does not know."""
    from deco_kernels.autotune.validate import parse_key

    files = sorted(f for f in os.listdir(lookup.SHIPPED_DIR) if f.endswith(".json"))
    assert len(files) >= 6
    for f in files:
        data = cache.load(os.path.join(lookup.SHIPPED_DIR, f), check_versions=False)
        for key, e in data["entries"].items():
            path, d, n, de, ds, dtype, bucket = parse_key(key)
            T = e.get("T") or buckets.representative_t(bucket)
            assert not space.missing_keys(path, e["config"], T, dtype), (f, key)
            assert set(e["config"]) <= lookup._known_keys(path, T, dtype), (f, key)


def test_shipped_orin_caches_are_modelled_and_cover_the_presets():
    shipped = [f for f in os.listdir(lookup.SHIPPED_DIR) if f.startswith("orin")]
    assert sorted(shipped) == sorted(f"{k}.json" for k in devices.ORIN_KEYS)
    for f in shipped:
        data = cache.load(os.path.join(lookup.SHIPPED_DIR, f))
        assert data["source"] == "modelled" and data["device"]["capability"] == [8, 7]
        assert len(data["entries"]) == 4 * len(buckets.BUCKETS)
        for e in data["entries"].values():
            assert e["source"] == "modelled" and isinstance(e["config"], dict)


def test_cli_tune_modelled_writes_a_cache_and_a_table(tmp_path, capsys):
    from deco_kernels import cli

    rc = cli.main(["tune", "--shape", "128,8,16,32", "--tokens", "1,100", "--modelled", "orin-nano-8gb",
                   "--compile-top", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "small_batch" in out and "grouped" in out and "t65-512" in out
    data = cache.load(str(tmp_path / "orin-nano-8gb.json"))
    assert data["source"] == "modelled" and len(data["entries"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cli_tune_measured_without_a_gpu_says_so(tmp_path):
    from deco_kernels import cli

    with pytest.raises(SystemExit, match="no CUDA GPU"):
        cli.main(["tune", "--preset", "0.1b", "--tokens", "1", "--out", str(tmp_path)])


# ---------------------------------------------------------------- compile-only for sm_87

COMPILE_SCRIPT = """
import sys, torch
from deco_kernels.autotune import compile as C, devices, model, space
from deco_kernels.autotune.launches import record
orin = devices.PROFILES["orin-agx-64gb"]
try:
    for path, T, name, down in (("small_batch", 1, "_decode_down_kernel", None),
                                ("grouped", 512, "_grouped_down_kernel", "atomics"),
                                ("grouped", 512, "_grouped_up_kernel", "gemm")):
        cfg = dict(space.default_config(path, T, torch.bfloat16), **({"down": down} if down else {}))
        (ln,) = [l for l in record(path, cfg, T, 768, 42, 64, 128) if l.name == name]
        u = C.compile_launch(ln, (8, 7))
        assert 0 < u["shared"] <= orin.smem_per_block, u
        assert u["regs"] is None or 0 < u["regs"] <= 255, u
        assert C.check_fits(dict(u, shared=orin.smem_per_block + 1), orin).startswith("shared memory")
        print(name, u)
    # the cost model's shared memory of the split-K small-batch kernels is what sm_87 compiles
    for T in (8, 64):
        launches = record("small_batch", space.default_config("small_batch", T, torch.bfloat16), T, 768, 42, 64, 128)
        for ln, w in zip(launches, model.works_of(launches, T, 768, 42, 64, 128, torch.bfloat16)):
            u = C.compile_launch(ln, (8, 7))
            assert w.smem == u["shared"], (T, ln.name, w.smem, u)
            print(T, ln.name, u)
except C.CompileUnavailable as e:
    print("UNAVAILABLE", e)
"""


def test_compile_only_for_sm87():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(COMPILE_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=300)
    if "UNAVAILABLE" in proc.stdout or "PTXASError" in proc.stderr or "ptxas" in proc.stderr.lower():
        pytest.skip(f"Triton cannot compile for sm_87 here: {proc.stdout[-300:]}{proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "_decode_down_kernel" in proc.stdout and "_grouped_down_kernel" in proc.stdout


def test_recording_several_modules_at_once():
    """One recording over several modules (nested recordings would wait on one lock) restores every kernel."""
    pytest.importorskip("triton")
    from deco_kernels.autotune.launches import recording
    from deco_kernels.triton import means, swiglu

    before = (swiglu._swiglu_fwd_kernel, means._expert_mean_kernel)
    with recording(swiglu, means) as launches:
        swiglu._swiglu_fwd_kernel[(3,)](1, 2, BLOCK=4)
        means._expert_mean_kernel[(2, 1)](5)
    assert [(ln.name, ln.grid) for ln in launches] == [("_swiglu_fwd_kernel", (3,)), ("_expert_mean_kernel", (2, 1))]
    assert (swiglu._swiglu_fwd_kernel, means._expert_mean_kernel) == before


# ---------------------------------------------------------------- GPU: a tuned cache is picked up and used

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuned_cache_is_picked_up_and_used(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from deco_kernels.autotune.launches import recording
    from deco_kernels.triton import ffn

    info = devices.describe_device(torch.cuda.current_device())
    cfg = dict(space.default_config("small_batch", 1, torch.bfloat16), block_d=32, slots=8)
    key = buckets.entry_key("small_batch", *GEOM, torch.bfloat16, 1)
    cache.merge_entries(str(tmp_path), info, {key: {"config": cfg, "us": 1.0}})
    monkeypatch.setenv("DECO_KERNELS_TUNE_DIR", str(tmp_path))
    lookup.clear()
    try:
        assert lookup.config_for("small_batch", torch.device("cuda"), 1, torch.bfloat16, *GEOM) == cfg
        x, w = meta_layer(1, *GEOM, torch.bfloat16, device="cuda")
        with recording(ffn) as launches, torch.no_grad():
            ffn.deco_ffn(x.normal_(), **{k: v.normal_() for k, v in w.items()})
        (down,) = [ln for ln in launches if ln.name == "_decode_down_kernel"]
        assert down.args["BLOCK_D"] == 32 and down.args["SLOTS"] == 8     # the launcher used the cached config
    finally:
        lookup.clear()
