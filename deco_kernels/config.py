"""DecoConfig: the shape of a DECO transformer and the paper's presets (SPEC §3)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DecoConfig:
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
