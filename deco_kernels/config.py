"""DecoConfig: the shape of a DECO transformer and the paper's presets (SPEC §3)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DecoConfig:
    """Shape, presets and training settings of a DECO transformer.

    Elastic inference knobs (SPEC §4), the model-wide starting values of every DecoMoE (change them per call,
    per layer or for the whole model with ``set_elastic``): ``router_bias``, ``router_threshold``,
    ``max_active``.

    EMoE-style elastic training for ReLU routing (SPEC §4, last paragraph; a proposal, not from the paper's
    code). It acts in training mode (backends "torch" and "triton") and is off by default:

    - ``elastic_prob`` q in [0, 1]: the probability that a training forward of a DECO layer is an elastic
      one (one draw per layer and forward); 0 turns elastic training off.
    - ``elastic_pool_multiplier`` m >= 1: co-activation sampling. On an elastic forward each token keeps
      |A| experts (its number of active ones) drawn at random from the candidate pool of its top
      ceil(m * |A|) experts by router logit; 1 turns the sampling off.
    - ``elastic_budget_range`` (lo, hi) with 0 < lo <= hi, or None (off): random budgets. On an elastic
      forward the router bias gets an extra δ chosen so that a fraction rho * target_active_ratio of the
      layer's gates is active, rho ~ Uniform(lo, hi).

    q > 0 needs at least one of the two (m > 1, or a budget range). The entropy loss and the adaptive λ
    (SparsityController) are unchanged; the layers count their natural gates for λ, so elastic steps do
    not bias the ratio the controller regulates. See reference.elastic_training_gates.

    Two-sided ratio control, off by default (``offset_step`` = 0: SPEC §2 alone):

    - ``offset_step`` s >= 0: each DecoMoE gets a ``router_offset`` (a persistent scalar buffer added to its
      router logits before the knobs: g = relu(r + router_offset + bias)), and SparsityController.step moves
      it by s * (target - A_l) / target per optimizer step, A_l that layer's active ratio. λ only pushes the
      ratio down; under elastic training the routers drift below the target (the sampled gates' δ makes the
      elastic forwards indifferent to the level of r, and nothing pulls it back up), and the offset does.
    """

    vocab_size: int = 73448
    num_layers: int = 16
    d_model: int = 768
    num_heads: int = 6
    head_dim: int = 128
    d_ff: int = 1920                 # dense SwiGLU width of layer 0 and of the dense twin
    num_experts: int = 42            # N routed experts
    expert_dim: int = 64             # de
    shared_dim: int = 128            # ds
    max_seq_len: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "norm_silu"    # one of reference.NORM_SILU_VARIANTS
    # sparsity regulariser and its adaptive coefficient (SPEC §2)
    target_active_ratio: float = 0.2
    lambda0: float = 1e-8
    lambda_multiplier: float = 1.002
    # elastic inference knobs (SPEC §4), model-wide defaults
    router_bias: float = 0.0
    router_threshold: float = 0.0
    max_active: int | None = None
    # EMoE-style elastic training (class docstring), off by default
    elastic_prob: float = 0.0
    elastic_pool_multiplier: float = 2.0
    elastic_budget_range: tuple[float, float] | None = None
    # two-sided ratio control through a per-layer router offset (class docstring), off by default
    offset_step: float = 0.0
    lr: float = 1e-3
    backend: str = "auto"

    def __post_init__(self):
        if self.d_model != self.num_heads * self.head_dim:
            raise ValueError(f"d_model: expected num_heads * head_dim = {self.num_heads * self.head_dim}, "
                             f"got {self.d_model}")
        for name in ("num_layers", "d_model", "num_heads", "head_dim", "d_ff", "num_experts", "expert_dim",
                     "shared_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.max_active is not None and self.max_active < 1:
            raise ValueError(f"max_active: expected None or an integer >= 1, got {self.max_active}")
        self._check_elastic_training()

    def _check_elastic_training(self) -> None:
        q, m, budget = self.elastic_prob, self.elastic_pool_multiplier, self.elastic_budget_range
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise ValueError(f"elastic_prob: expected a probability in [0, 1], got {q!r}")
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 1 <= m < float("inf"):
            raise ValueError(f"elastic_pool_multiplier: expected a finite number >= 1, got {m!r}")
        if budget is not None:
            if (not isinstance(budget, (tuple, list)) or len(budget) != 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in budget)
                    or not 0 < budget[0] <= budget[1] < float("inf")):
                raise ValueError(f"elastic_budget_range: expected None or (lo, hi) with 0 < lo <= hi, got {budget!r}")
            self.elastic_budget_range = (float(budget[0]), float(budget[1]))  # a JSON round trip gives a list
        s = self.offset_step
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < float("inf"):
            raise ValueError(f"offset_step: expected a finite number >= 0, got {s!r}")
        if q > 0 and m == 1 and budget is None:
            raise ValueError("elastic_prob: elastic training needs elastic_pool_multiplier > 1 or an "
                             f"elastic_budget_range; with m = 1 and no range, elastic_prob={q} would do nothing")

    @property
    def num_deco_layers(self) -> int:
        return self.num_layers - 1

    @classmethod
    def preset(cls, name: str, **overrides) -> "DecoConfig":
        """The paper's runs "0.1b", "0.2b", "0.5b", "1.2b", and "tiny" for tests."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecoConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _paper(layers, d, heads, d_ff, n, lr, m):
    return dict(num_layers=layers, d_model=d, num_heads=heads, head_dim=128, d_ff=d_ff, num_experts=n,
                expert_dim=64, shared_dim=128, lr=lr, lambda_multiplier=m)


PRESETS = {
    "0.1b": _paper(16, 768, 6, 1920, 42, 1.1175e-3, 1.002),
    "0.2b": _paper(20, 1024, 8, 2560, 57, 9.3e-4, 1.002),
    "0.5b": _paper(27, 1280, 10, 3360, 77, 7.8e-4, 1.001),
    "1.2b": _paper(32, 1792, 14, 4480, 102, 6.54e-4, 1.001),
    # A few-second CPU model for tests and the demo; N=13 is deliberately prime.
    "tiny": dict(vocab_size=97, num_layers=3, d_model=64, num_heads=4, head_dim=16, d_ff=160, num_experts=13,
                 expert_dim=16, shared_dim=32, max_seq_len=256, lr=3e-3, lambda0=1e-3,
                 lambda_multiplier=1.2),
}
