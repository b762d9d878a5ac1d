"""Argument checks shared by every backend: one place, clear ValueErrors that name the argument."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference.ops import WEIGHT_NAMES  # noqa: F401  (re-exported: tests import it from here)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Weights that enter a matmul with x must share its dtype; the router, its scale and gamma are read in fp32.
SAME_DTYPE_AS_X = ("w_up", "w_down", "ws_gate", "ws_up", "ws_down")


@dataclass(frozen=True)
class LayerShape:
    d: int
    num_experts: int
    expert_dim: int
    shared_dim: int


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")


def _check_shape(name, t, shape, sizes_from=None):
    """``sizes_from()`` says which argument fixed the expected sizes, so a mismatch names both sides; it is a
    callable so the message is built only on failure (this check runs on every layer call)."""
    if t.shape != shape:
        why = f" ({sizes_from()})" if sizes_from else ""
        raise ValueError(f"{name}: expected shape {tuple(shape)}{why}, got {tuple(t.shape)}")


def check_layer(x, weights: dict) -> LayerShape:
    """Validate x [..., d] and the canonical weights of one DECO layer (SPEC §1); return the sizes. Without
    "w_router" in ``weights`` (a layer given its gates), N comes from router_scale."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d], got a 0-d tensor")
    names = [name for name in WEIGHT_NAMES if name != "w_router" or "w_router" in weights]
    for name in names:
        _check_tensor(name, weights[name])
    d = x.shape[-1]
    w_up, ws_gate = weights["w_up"], weights["ws_gate"]
    if "w_router" in weights:
        w_router = weights["w_router"]
        if w_router.dim() != 2:
            raise ValueError(f"w_router: expected shape [N, d], got {tuple(w_router.shape)}")
        n = w_router.shape[0]
        _check_shape("w_router", w_router, (n, d), lambda: f"d={d} from x {tuple(x.shape)}")
        _check_shape("router_scale", weights["router_scale"], (n,),
                     lambda: f"N={n} from w_router {tuple(w_router.shape)}")
    else:
        if weights["router_scale"].dim() != 1:
            raise ValueError(f"router_scale: expected shape [N], got {tuple(weights['router_scale'].shape)}")
        n = weights["router_scale"].shape[0]
    if w_up.dim() != 2 or n == 0 or w_up.shape[0] % n != 0 or w_up.shape[0] == 0:
        raise ValueError(f"w_up: expected shape [N*de, d] with N={n}, got {tuple(w_up.shape)}")
    de = w_up.shape[0] // n
    source = "w_router" if "w_router" in weights else "router_scale"

    def sizes():
        return f"N={n} from {source}, de={de} from w_up {tuple(w_up.shape)}, d={d} from x"
    _check_shape("w_up", w_up, (n * de, d), lambda: f"d={d} from x {tuple(x.shape)}")
    _check_shape("gamma", weights["gamma"], (de,), sizes)
    _check_shape("w_down", weights["w_down"], (d, n * de), sizes)
    if ws_gate.dim() != 2:
        raise ValueError(f"ws_gate: expected shape [ds, d], got {tuple(ws_gate.shape)}")
    ds = ws_gate.shape[0]

    def shared_sizes():
        return f"ds={ds} from ws_gate {tuple(ws_gate.shape)}, d={d} from x"
    _check_shape("ws_gate", ws_gate, (ds, d), shared_sizes)
    _check_shape("ws_up", weights["ws_up"], (ds, d), shared_sizes)
    _check_shape("ws_down", weights["ws_down"], (d, ds), shared_sizes)
    for name in names:
        if weights[name].device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (the device of x), got {weights[name].device}")
    for name in SAME_DTYPE_AS_X:
        if weights[name].dtype != x.dtype:
            raise ValueError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {weights[name].dtype}")
    return LayerShape(d=d, num_experts=n, expert_dim=de, shared_dim=ds)


def check_knobs(bias, threshold, max_active, num_experts: int, device) -> None:
    """Elastic knobs of SPEC §4: bias a number or a tensor of shape [] or [N]; threshold >= 0; max_active
    None or an int >= 1."""
    if isinstance(bias, torch.Tensor):
        if bias.shape not in ((), (num_experts,)):
            raise ValueError(f"bias: expected a number or a tensor of shape [] or [{num_experts}], "
                             f"got shape {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias: expected device {device}, got {bias.device}")
    elif not isinstance(bias, (int, float)):
        raise ValueError(f"bias: expected a number or a tensor, got {type(bias).__name__}")
    if isinstance(threshold, torch.Tensor):
        raise ValueError("threshold: expected a Python number >= 0, got a tensor")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0 \
            or threshold == float("inf"):
        raise ValueError(f"threshold: expected a finite number >= 0, got {threshold!r}")
    if max_active is not None and (isinstance(max_active, bool) or not isinstance(max_active, int)
                                   or max_active < 1):
        raise ValueError(f"max_active: expected None or an integer >= 1, got {max_active!r}")


def check_gate_stats(g, lam, num_layers) -> None:
    """The regulariser's arguments (SPEC §2): gates g [..., N] floating with N >= 1; lam a number or a 0-d
    floating tensor on g's device; num_layers an int >= 1."""
    _check_tensor("g", g)
    if g.dim() < 1 or g.shape[-1] < 1:
        raise ValueError(f"g: expected gates of shape [..., N] with N >= 1, got {tuple(g.shape)}")
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0 or not lam.is_floating_point() or lam.device != g.device:
            raise ValueError(f"lam: expected a number or a 0-d floating tensor on {g.device} (g's device), got "
                             f"{lam.dtype} of shape {tuple(lam.shape)} on {lam.device}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise ValueError(f"lam: expected a number or a 0-d tensor, got {type(lam).__name__}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers: expected an int >= 1 (the model's layer count), got {num_layers!r}")
