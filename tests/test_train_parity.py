"""Training parity, backend triton vs torch (benchmarks/train_parity.py; issue 4 part 3).

The GPU test trains the tiny preset for 20 steps with both backends, bf16 and fp32, and asserts that the curves
agree within the drift of torch runs perturbed by one unit roundoff (the rule is in the script's docstring).
It is GPU-only: in the Triton interpreter one training step of the tiny preset takes seconds, so 20 steps
with the noise runs take minutes. The CPU tests check the rule itself: torch against itself agrees, and an
error injected into the candidate's curves is flagged, naming the curve.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from deco_kernels import DecoConfig

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("train_parity", ROOT / "benchmarks" / "train_parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_parity", module)
    spec.loader.exec_module(module)
    return module


tp = load_script()
TINY = DecoConfig.preset("tiny")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_training_matches_torch_within_rounding_drift(dtype):
    result = tp.parity(dtype, TINY, steps=20, batch=16, seq_len=64, device="cuda", noise_runs=3)
    assert result["agree"], result["flags"]
    assert result["first_step_triton_vs_torch"]["loss"] <= tp.FLOORS[dtype]["loss"]
    assert len(result["runs"]["triton"]["loss"]) == 20


def curves(steps=20, seed=0, drift=0.0):
    """Synthetic curves of a run that learns (loss 4.6 -> ~1.5, ratio 0.5 -> ~0.2), plus a drift that grows
    with the step like the real rounding drift does (relative on the loss, absolute on the ratio)."""
    gen = torch.Generator().manual_seed(seed)
    wiggle = (torch.randn(steps, generator=gen) * drift * torch.arange(steps) / steps).tolist()
    loss = [1.5 + 3.1 * 0.9 ** s for s in range(steps)]
    ratio = [0.2 + 0.3 * 0.85 ** s for s in range(steps)]
    return {"loss": [v * (1 + w) for v, w in zip(loss, wiggle)], "ce": [v * (1 + w) - 0.01 for v, w in zip(loss, wiggle)],
            "active_ratio": [v + w for v, w in zip(ratio, wiggle)], "lam": [1e-3] * steps}


def runs_with(candidate, noise_drift=0.01):
    return {"torch": curves(), "triton": candidate,
            **{f"torch_perturbed_{k}": curves(seed=1 + k, drift=noise_drift) for k in range(3)}}


def test_rule_accepts_the_reference_and_a_candidate_inside_the_noise():
    assert tp.judge("fp32", runs_with(curves()))["agree"]
    result = tp.judge("bf16", runs_with(curves(seed=7, drift=0.01)))  # as far off as the noise runs are
    assert result["agree"], result["flags"]
    assert result["first_step_triton_vs_torch"]["loss"] == 0


@pytest.mark.parametrize("curve, step, error", [("loss", 3, 0.02), ("ce", 12, 0.2), ("active_ratio", 2, 0.03)],
                         ids=["loss-early", "ce-late", "active_ratio"])
def test_rule_flags_an_error_above_the_noise(curve, step, error):
    candidate = curves()
    for s in range(step, len(candidate[curve])):
        candidate[curve][s] = candidate[curve][s] * (1 + error) if curve != "active_ratio" else candidate[curve][s] + error
    result = tp.judge("fp32", runs_with(candidate))
    assert not result["agree"]
    assert any(f.startswith(f"{curve}: at step {step}") for f in result["flags"]), result["flags"]


def test_rule_flags_too_much_noise_and_a_run_that_does_not_learn():
    flat = {k: [v[0]] * len(v) for k, v in curves().items()}
    result = tp.judge("fp32", {"torch": flat, "triton": flat, "torch_perturbed_0": flat})
    assert result["flags"] == [f"learning: triton ce {flat['ce'][0]:.4f} -> {flat['ce'][0]:.4f}, less than a 10% drop"]
    result = tp.judge("fp32", runs_with(curves(), noise_drift=0.5))
    assert any(f.startswith("noise:") for f in result["flags"])


def test_perturbation_moves_about_one_unit_roundoff():
    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    tp.perturb_(model, tp.UNIT_ROUNDOFF["fp32"], seed=0)
    rel = ((model.weight - before) / before).abs()
    assert (rel > 0).float().mean() > 0.3  # one ulp is not lost to rounding (1 + 2^-24 == 1 in fp32)
    assert rel.max() < 1e-6
