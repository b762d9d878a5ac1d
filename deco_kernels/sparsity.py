"""The adaptive coefficient λ of the sparsity regulariser (SPEC §2), once per optimizer step.

The DecoMoE layers count active gates and all gates on the device during training forwards (no host sync);
:meth:`SparsityController.step` reads those counters once, sums them over data-parallel ranks when
torch.distributed is initialised (the authors' code forgot this, so each rank drifted on its own ratio),
updates λ with reference.update_lambda and writes it into every layer. With DecoConfig.offset_step > 0 it
also moves each layer's router_offset toward the target by that layer's own ratio (two-sided control).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .modules import DecoMoE
from .reference import ops as ref


class SparsityController:
    """Drive λ of every DecoMoE in ``model`` toward the active ratio ``target``.

    Defaults come from the model's config (``target_active_ratio``, ``lambda_multiplier``, ``lambda0``).
    Attributes: ``lam`` (current λ, float), ``last_active_ratio`` (A of the last step, or None).
    """

    def __init__(self, model: nn.Module, target: float | None = None, multiplier: float | None = None,
                 lam0: float | None = None, *, process_group=None):
        self.layers = [m for m in model.modules() if isinstance(m, DecoMoE)]
        if not self.layers:
            raise ValueError("model: expected a module containing DecoMoE layers, found none")
        config = self.layers[0].config
        self.target = config.target_active_ratio if target is None else float(target)
        self.multiplier = config.lambda_multiplier if multiplier is None else float(multiplier)
        self.lam0 = config.lambda0 if lam0 is None else float(lam0)
        if not 0 <= self.target <= 1:
            raise ValueError(f"target: expected a ratio in [0, 1], got {self.target}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier: expected a number >= 1, got {self.multiplier}")
        if self.lam0 < 0:
            raise ValueError(f"lam0: expected a number >= 0, got {self.lam0}")
        self.process_group = process_group
        self.lam = self.lam0
        self.last_active_ratio: float | None = None
        self._write_lambda()

    def step(self) -> float | None:
        """Update λ from the gates counted since the last step and reset the counters. Returns A, the global
        fraction of active gates, or None (λ unchanged) when no gate was counted on any rank. Under
        torch.distributed this is a collective: every rank calls it once per optimizer step."""
        counts = torch.stack([torch.stack([m.active_count, m.gate_count]) for m in self.layers])  # [L, 2]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=self.process_group)
        per_layer = counts.tolist()  # the one host sync per optimizer step
        for m in self.layers:
            m.reset_counters()
        active, total = (sum(c[i] for c in per_layer) for i in (0, 1))
        if total == 0:
            return None
        ratio = active / total
        self.lam = ref.update_lambda(self.lam, ratio, self.target, self.multiplier, self.lam0)
        self.last_active_ratio = ratio
        self._write_lambda()
        for m, (a, n) in zip(self.layers, per_layer):
            if m.config.offset_step > 0 and n > 0 and self.target > 0:
                m.set_router_offset(m.router_offset_value + m.config.offset_step * (self.target - a / n) / self.target)
        return ratio

    def _write_lambda(self) -> None:
        for m in self.layers:
            m.sparsity_lambda.fill_(self.lam)

    def state_dict(self) -> dict:
        """λ and the last ratio, to resume training (λ is not in the model's state_dict)."""
        return {"lam": self.lam, "last_active_ratio": self.last_active_ratio}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.last_active_ratio = float(state["lam"]), state.get("last_active_ratio")
        self._write_lambda()
