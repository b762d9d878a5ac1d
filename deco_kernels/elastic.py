"""Calibration of the elastic knobs (SPEC §4): per-layer bias or threshold for a target active ratio.

``calibrate`` runs the model once on a calibration batch. A forward pre-hook on every DECO layer bisects
that layer's knob on the layer's actual input, sets it, and lets the layer run with it, so each later layer
is calibrated on inputs that already reflect the earlier layers' new values (forward order). The bisection
only re-applies the knobs to the router logits (reference.apply_knobs), never the experts; the achieved
ratio in the report is the one the layer itself measured (``DecoMoE.active_ratio``) in that forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .modules import DecoForCausalLM, DecoMoE, _check_ids
from .reference import ops as ref

KNOBS = ("bias", "threshold")


@dataclass
class LayerCalibration:
    """layer: index into model.layers; value: the bias or threshold set; active_ratio: measured by the layer
    on the batch with that value; iterations: bisection steps; reached: |active_ratio - target| <= tol."""
    layer: int
    value: float
    active_ratio: float
    iterations: int
    reached: bool


@dataclass
class CalibrationReport:
    knob: str
    target_ratio: float
    tol: float
    layers: list[LayerCalibration]

    @property
    def values(self) -> dict[int, float]:
        """{layer index: the calibrated value}."""
        return {c.layer: c.value for c in self.layers}

    @property
    def reached(self) -> bool:
        return all(c.reached for c in self.layers)

    def __str__(self) -> str:
        rows = [f"calibrated {self.knob} for active ratio {self.target_ratio:.4f} ± {self.tol:.4f}",
                "layer  value        active_ratio  iterations  reached"]
        rows += [f"{c.layer:<6} {c.value:<12.6g} {c.active_ratio:<13.4f} {c.iterations:<11} {c.reached}"
                 for c in self.layers]
        return "\n".join(rows)


def calibrate(model: DecoForCausalLM, batch: torch.Tensor, target_ratio: float, *, knob: str = "bias",
              tol: float = 0.01, max_iter: int = 50, layers=None, strict: bool = True) -> CalibrationReport:
    """Set the per-layer ``knob`` ("bias" or "threshold") of the DECO layers so that each layer's active
    ratio on ``batch`` (input_ids [B, S]) is within ``tol`` of ``target_ratio`` (in (0, 1]).

    Layers are calibrated in forward order, each by bisection on its own input; the other knobs keep the
    values they have on each layer (a per-expert tensor bias is replaced by the scalar found when knob is
    "bias"). ``layers``: indices into model.layers (None: every DECO layer); the others keep their knobs.
    Runs in eval mode under torch.no_grad and restores every module's mode afterwards.

    A threshold can only lower the ratio (threshold >= 0), and max_active caps it at max_active / N: a target
    out of reach, or one that ties in the router logits make the bisection miss, raises (ValueError and
    RuntimeError) with ``strict``, and the knobs are then left as they were; with ``strict=False`` the layer
    keeps the closest value found and its report row says ``reached=False``.
    """
    if not isinstance(model, DecoForCausalLM):
        raise ValueError(f"model: expected a DecoForCausalLM, got {type(model).__name__}")
    _check_ids("batch", batch)
    if batch.numel() == 0:
        raise ValueError(f"batch: expected at least one token, got shape {tuple(batch.shape)}")
    if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio: expected a number in (0, 1], got {target_ratio!r}")
    if knob not in KNOBS:
        raise ValueError(f"knob: expected one of {KNOBS}, got {knob!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol: expected a number in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: expected an integer >= 1, got {max_iter!r}")
    selected = model.elastic_state(layers)  # validates ``layers``
    if not selected:
        raise ValueError("model: the dense twin has no DECO layers to calibrate")
    modules = {layer.layer_idx: layer for layer in model.deco_layers() if layer.layer_idx in selected}

    found: dict[int, tuple[float, int, bool]] = {}

    def hook(layer: DecoMoE, args):
        if layer.layer_idx in found:  # a layer run twice in one forward keeps its first calibration
            return
        value, iterations, feasible = _bisect_layer(layer, args[0], knob, float(target_ratio), tol, max_iter)
        if strict and not feasible:
            reason = ("a threshold can only lower it (threshold >= 0); use knob='bias'" if knob == "threshold"
                      else f"max_active={layer.max_active} caps it at {layer.max_active}/{layer.config.num_experts}")
            raise ValueError(f"target_ratio: {target_ratio} is out of reach for layer {layer.layer_idx}: its "
                             f"highest active ratio on this batch is below target_ratio - tol, and {reason}")
        layer.set_elastic(**{knob: value})
        found[layer.layer_idx] = (value, iterations, feasible)

    saved = model.elastic_state()
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    try:
        model.eval()
        with torch.no_grad():
            model(batch)
        report = CalibrationReport(knob, float(target_ratio), float(tol), [])
        for i, layer in modules.items():
            value, iterations, _ = found[i]
            ratio = layer.active_ratio.item()
            report.layers.append(LayerCalibration(i, value, ratio, iterations, abs(ratio - target_ratio) <= tol))
        if strict and not report.reached:
            raise RuntimeError(f"calibrate: some layers missed target_ratio ± tol (ties in the router logits, or "
                               f"max_iter={max_iter} too small); knobs left unchanged\n{report}")
    except BaseException:
        model.load_elastic_state(saved)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return report


def _bisect_layer(layer: DecoMoE, x: torch.Tensor, knob: str, target: float, tol: float,
                  max_iter: int) -> tuple[float, int, bool]:
    """Bisection of one layer's ``knob`` on its input x. Returns (value, iterations, feasible): the first
    value whose ratio is within tol of target, else the closest one seen; feasible is False when even the
    knob's extreme value leaves the ratio below target - tol."""
    # The logits as the layer's forward shifts them (router_offset, DecoConfig.offset_step); the knob found is
    # the user-facing one on top of that shift.
    r = ref.router_logits(x.reshape(-1, x.shape[-1]), layer.w_router) + layer.router_offset_value
    knobs = layer.elastic_state()
    if isinstance(knobs["bias"], torch.Tensor):
        knobs["bias"] = knobs["bias"].to(r.device)

    def ratio_at(value: float) -> float:
        return ref.active_ratio(ref.apply_knobs(r, **{**knobs, knob: value})).item()

    if knob == "bias":  # the ratio grows with the bias: from none active to every gate above the threshold
        low, high = -r.max().item() - 1.0, knobs["threshold"] - r.min().item() + 1.0
        most = high
    else:  # the ratio falls as the threshold grows: from the ratio at 0 to none active
        low, high = 0.0, ref.apply_knobs(r, knobs["bias"]).max().item() + 1.0
        most = low
    best = (most, ratio_at(most))
    if best[1] < target - tol:
        return most, 0, False
    if abs(best[1] - target) <= tol:
        return most, 0, True
    for iteration in range(1, max_iter + 1):
        mid = (low + high) / 2
        ratio = ratio_at(mid)
        if abs(ratio - target) < abs(best[1] - target):
            best = (mid, ratio)
        if abs(ratio - target) <= tol:
            return mid, iteration, True
        if (ratio < target) == (knob == "bias"):
            low = mid
        else:
            high = mid
    return best[0], max_iter, True
