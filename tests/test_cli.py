"""`deco-kernels demo` in-process on the CPU."""
import pytest
import torch

from deco_kernels import backends, cli


def test_demo_runs_on_cpu_and_reports(capsys):
    rc = cli.main(["demo", "--preset", "tiny", "--tokens", "5", "--device", "cpu", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    # "auto" resolves to torch here, or to triton under TRITON_INTERPRET=1 once that backend exists
    assert f"backend: {backends.resolve('auto', torch.device('cpu'))} (requested 'auto')" in out
    assert "relative error vs float64 reference" in out and "active ratio" in out
    assert "time" in out


def test_demo_times_against_the_dense_twin_at_a_paper_width(capsys):
    argv = ["demo", "--preset", "0.1b", "--device", "cpu", "--dtype", "float64", "--backend", "torch",
            "--repeats", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "preset 0.1b: d=768 N=42" in out and "backend: torch" in out
    assert "dense twin" in out and "dense/DECO" in out


def test_demo_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--preset", "7b"])
    assert exc.value.code == 2 and "--preset" in capsys.readouterr().err


def test_bench_without_a_gpu_exits_nonzero_with_a_clear_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "needs a CUDA GPU" in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bench_rejects_unknown_parts_and_a_missing_json(tmp_path, capsys):
    assert cli.main(["bench", "--parts", "layer,speed"]) == 2
    assert "parts" in capsys.readouterr().err
    assert cli.main(["bench", "--plot-only", "--out", str(tmp_path)]) == 1
    assert "bench.json" in capsys.readouterr().err
