"""nn.Modules: the DECO FFN layer, the dense SwiGLU and the decoder-only model of SPEC §3.

Data flows module -> ``deco_kernels.ops`` -> backend kernel; the modules hold parameters, the elastic knobs
and the training-time sparsity statistics, and do no math of their own beyond attention and norms.

Shapes: B batch, S sequence length, P cached length, d model width, H heads of width hd, V vocabulary,
N routed experts of width de, ds the shared expert's width, L layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._validate import check_knobs
from .config import DecoConfig
from .reference import ops as ref

# Normal(0, INIT_STD) is the SPEC §1 init; output projections get INIT_STD / sqrt(2L) (Megatron's scaled init).
INIT_STD = 0.01
_UNSET = object()
ELASTIC_KNOBS = ("bias", "threshold", "max_active")  # SPEC §4, the attributes set_elastic sets

# KV cache: one (k, v) pair per layer, each [B, H, P, hd].
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def _normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    return nn.init.normal_(t, mean=0.0, std=std)


def _check_ids(name: str, ids, like: torch.Tensor | None = None) -> None:
    """Token ids: an integer tensor [B, S] with S >= 1 (and the shape of ``like`` when given)."""
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: expected dtype torch.int64 (or torch.int32), got {ids.dtype}")
    if like is not None:
        if ids.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of input_ids), "
                             f"got {tuple(ids.shape)}")
    elif ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name}: expected shape [batch, seq_len] with seq_len >= 1, got {tuple(ids.shape)}")


def _check_elastic(config: DecoConfig, bias, threshold, max_active) -> None:
    """Validate the elastic knobs that are given; the ones left _UNSET are checked as their neutral values."""
    bias = 0.0 if bias is _UNSET else bias
    device = bias.device if isinstance(bias, torch.Tensor) else None  # a tensor bias follows x in forward
    check_knobs(bias, 0.0 if threshold is _UNSET else threshold, None if max_active is _UNSET else max_active,
                config.num_experts, device)


# ---------------------------------------------------------------------------------------------------------
# FFN layers
# ---------------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """Dense SwiGLU FFN, y = down(silu(gate(x)) * up(x)): layer 0, and every layer of the dense twin.

    Parameters ``gate_proj``, ``up_proj`` [d_ff, d] and ``down_proj`` [d, d_ff] (nn.Linear, no bias), in
    Normal(0, std); ``out_std`` (default std) for down_proj.
    """

    def __init__(self, d: int, d_ff: int, *, std: float = INIT_STD, out_std: float | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)
        self.std, self.out_std = std, std if out_std is None else out_std
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        _normal_(self.gate_proj.weight, self.std)
        _normal_(self.up_proj.weight, self.std)
        _normal_(self.down_proj.weight, self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> [..., d], x's dtype."""
        return ops.dense_swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _sync_router_offset(module, incompatible_keys) -> None:
    """After load_state_dict: the float mirror of router_offset follows the loaded buffer (one host read)."""
    module.router_offset_value = float(module.router_offset)


class DecoMoE(nn.Module):
    """One DECO FFN layer (SPEC §1) owning exactly the canonical parameters
    w_router [N, d], router_scale [N], w_up [N*de, d], gamma [de], w_down [d, N*de], ws_gate, ws_up [ds, d]
    and ws_down [d, ds].

    Elastic knobs (SPEC §4), plain attributes read on every forward: ``bias`` (number or tensor [N]),
    ``threshold``, ``max_active``; set them with :meth:`set_elastic` to have them validated. With
    ``config.offset_step`` > 0 the layer also has ``router_offset`` (DecoConfig), added to the bias by every
    forward (:meth:`knobs`) and moved by the SparsityController. ``backend`` picks
    the ops backend ("auto" takes a differentiable one whenever autograd needs the layer's gradients).
    After each forward: ``active_ratio`` (detached 0-d, fraction of gates > 0) and, in training mode,
    ``reg_loss`` (the entropy loss of SPEC §2, differentiable through the gates; None in eval). In training
    mode the layer also adds to the device-side counters ``active_count`` and ``gate_count`` (int64 tensors,
    no host sync; per-rank tallies, not buffers, so data-parallel wrappers never broadcast or shard them), which
    :class:`deco_kernels.sparsity.SparsityController` reads before writing λ into the ``sparsity_lambda``
    buffer. reg_loss and the counters come from one ``ops.gate_stats`` call (one launch each way on Triton).
    """

    PARAMETER_NAMES = ref.WEIGHT_NAMES
    NO_WEIGHT_DECAY = ("router_scale", "gamma")  # SPEC §1: learnable gains without weight decay

    def __init__(self, config: DecoConfig, layer_idx: int | None = None):
        super().__init__()
        c = config
        n, de, ds, d = c.num_experts, c.expert_dim, c.shared_dim, c.d_model
        self.config, self.layer_idx = c, layer_idx
        self.w_router = nn.Parameter(torch.empty(n, d))
        self.router_scale = nn.Parameter(torch.empty(n))
        self.w_up = nn.Parameter(torch.empty(n * de, d))
        self.gamma = nn.Parameter(torch.empty(de))
        self.w_down = nn.Parameter(torch.empty(d, n * de))
        self.ws_gate = nn.Parameter(torch.empty(ds, d))
        self.ws_up = nn.Parameter(torch.empty(ds, d))
        self.ws_down = nn.Parameter(torch.empty(d, ds))
        # Not in the state_dict: λ is controller state (SparsityController.state_dict keeps it for resuming).
        self.register_buffer("sparsity_lambda", torch.tensor(float(c.lambda0)), persistent=False)
        self.active_count = torch.zeros((), dtype=torch.int64)
        self.gate_count = torch.zeros((), dtype=torch.int64)
        # Two-sided ratio control (DecoConfig.offset_step): a learned-by-controller shift of the router logits,
        # in the state_dict only when enabled (so checkpoints without it load), mirrored as a float so that
        # forwards never read the device.
        self.router_offset_value = 0.0
        if c.offset_step > 0:
            self.register_buffer("router_offset", torch.zeros((), dtype=torch.float32))
            self.register_load_state_dict_post_hook(_sync_router_offset)
        self.bias, self.threshold, self.max_active = c.router_bias, c.router_threshold, c.max_active
        self.backend, self.activation = c.backend, c.activation
        self.active_ratio: torch.Tensor | None = None
        self.reg_loss: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC §1 init: Normal(0, 0.01), router_scale 0.1, gamma ones, ws_down Normal(0, 0.01/sqrt(2L))."""
        for name in ("w_router", "w_up", "w_down", "ws_gate", "ws_up"):
            _normal_(getattr(self, name), INIT_STD)
        _normal_(self.ws_down, INIT_STD / math.sqrt(2 * self.config.num_layers))
        self.router_scale.fill_(0.1)
        self.gamma.fill_(1.0)

    def _apply(self, fn, recurse=True):
        # model.half() would flush lambda0 = 1e-8 to zero; λ stays at least fp32 wherever the module goes.
        # The gate counters are plain tensors (see the class docstring): they follow the module's moves here.
        lam = self.sparsity_lambda
        super()._apply(fn, recurse)
        self.active_count, self.gate_count = fn(self.active_count), fn(self.gate_count)
        if self.sparsity_lambda.dtype not in (torch.float32, torch.float64):
            self.sparsity_lambda = lam.to(self.sparsity_lambda.device, torch.float32)
        offset = getattr(self, "router_offset", None)
        if offset is not None and offset.dtype != torch.float32:  # a logit shift, kept in fp32 like λ
            self.router_offset = torch.tensor(self.router_offset_value, device=offset.device)
        return self

    def weights(self) -> dict[str, torch.Tensor]:
        """The canonical weights by name, as ``ops.deco_ffn`` takes them."""
        return {name: getattr(self, name) for name in self.PARAMETER_NAMES}

    def no_weight_decay_parameters(self) -> set[str]:
        return set(self.NO_WEIGHT_DECAY)

    def set_elastic(self, *, bias=_UNSET, threshold=_UNSET, max_active=_UNSET) -> "DecoMoE":
        """Set the elastic knobs that are given (validated); the others keep their values. ``bias``: a number,
        or a tensor of shape [] or [N] (per expert; moved to the layer's device here, not on every call)."""
        _check_elastic(self.config, bias, threshold, max_active)
        if bias is not _UNSET:
            self.bias = bias.to(self.w_router.device) if isinstance(bias, torch.Tensor) else bias
        if threshold is not _UNSET:
            self.threshold = threshold
        if max_active is not _UNSET:
            self.max_active = max_active
        return self

    def set_router_offset(self, value: float) -> None:
        """Set router_offset (DecoConfig.offset_step > 0 only; SparsityController.step calls this)."""
        if self.config.offset_step <= 0:
            raise ValueError("value: this layer has no router_offset (DecoConfig.offset_step is 0)")
        self.router_offset_value = float(value)
        self.router_offset.fill_(self.router_offset_value)

    def knobs(self, device=None) -> dict:
        """The knobs a forward applies: the elastic ones, with router_offset added to the bias as the buffer
        itself (a tensor bias, read on the device), so a training step captured into a CUDA graph follows the
        SparsityController's moves; the other knobs are host values, captured as they were."""
        bias = self.bias.to(device) if isinstance(self.bias, torch.Tensor) and device is not None else self.bias
        offset = getattr(self, "router_offset", None)
        if offset is not None:
            bias = offset + bias
        return dict(bias=bias, threshold=self.threshold, max_active=self.max_active)

    def elastic_state(self) -> dict:
        """{"bias", "threshold", "max_active"}: the knobs as set (a tensor bias is copied)."""
        state = {k: getattr(self, k) for k in ELASTIC_KNOBS}
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    def reset_counters(self) -> None:
        self.active_count.zero_()
        self.gate_count.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> y [..., d] in x's dtype; updates active_ratio, reg_loss and the counters."""
        knobs = self.knobs(x.device)
        if self.training and self.config.elastic_prob > 0:
            y, g, natural = self._elastic_training_forward(x, knobs)
        else:
            y, g = ops.deco_ffn(x, **self.weights(), **knobs, backend=self.backend, return_gates=True,
                                activation=self.activation)
            natural = g
        gates = g.detach()
        if not self.training:
            self.active_ratio = ref.active_ratio(gates)
            self.reg_loss = None
            return y
        # The regulariser and the counters see the natural gates (what inference with these knobs would use),
        # so elastic sampling changes neither the sharpening term nor the ratio λ regulates. One op gives both
        # (one launch each way on Triton instead of ~30 small torch ones: the training step is host-bound).
        self.reg_loss, active = ops.gate_stats(natural, self.sparsity_lambda, self.config.num_layers,
                                               backend=self.backend)
        self.active_count += active  # stays on the device: one sync per step
        numel = gates.numel()
        self.gate_count += numel
        if natural is g:
            # the count is exact in int64; fp32 like ref.active_ratio (0 for an empty batch)
            self.active_ratio = (active / numel).float() if numel else g.new_zeros((), dtype=torch.float32)
        else:  # elastic: the ratio of the gates applied (sampled), as in eval
            self.active_ratio = ref.active_ratio(gates)
        return y

    def _elastic_training_forward(self, x, knobs):
        """A training forward with EMoE-style elastic gates (DecoConfig's elastic_* flags, SPEC §4): the gates are
        sampled in torch from the fp32 router logits, the layer after the router runs on the module's backend
        (sparse on Triton). Returns (y, g the gates used, the natural gates of the knobs), all differentiable."""
        c = self.config
        weights = self.weights()
        r = ref.router_logits(x.reshape(-1, x.shape[-1]), weights.pop("w_router"))
        g = ref.elastic_training_gates(r, **knobs, prob=c.elastic_prob, pool_multiplier=c.elastic_pool_multiplier,
                                       budget_range=c.elastic_budget_range, target_ratio=c.target_active_ratio)
        natural = ref.apply_knobs(r, **knobs)
        y = ops.deco_ffn_from_gates(x, g.reshape(*x.shape[:-1], -1), **weights, backend=self.backend,
                                    activation=self.activation)
        return y, g, natural

    def extra_repr(self) -> str:
        c = self.config
        return (f"d={c.d_model}, N={c.num_experts}, de={c.expert_dim}, ds={c.shared_dim}, bias={self.bias}, "
                f"threshold={self.threshold}, max_active={self.max_active}, backend={self.backend!r}")


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32 (fp64 for fp64 input)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = ref.compute_dtype(x)
        return F.rms_norm(x.to(cd), (x.shape[-1],), self.weight.to(cd), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE, rotate-half convention (Llama, Megatron's default): pairs (i, i + hd/2) rotate by pos * base^(-2i/hd)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim: expected an even number for RoPE, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._inv_freq: dict[tuple, torch.Tensor] = {}  # per (device, dtype): not a buffer, so .half() can't round it

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [S] int64 -> (cos, sin) [S, hd], angles in fp32 (fp64 for fp64 models), cast to dtype."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        key = (positions.device, cd)
        if key not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
            self._inv_freq[key] = (self.base ** -exponent).to(positions.device, cd)
        angles = positions.to(cd)[:, None] * self._inv_freq[key][None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, hd] rotated by (cos, sin) [S, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and an optional KV cache; q/k/v/o_proj without biases."""

    def __init__(self, config: DecoConfig):
        super().__init__()
        c = config
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        inner = c.num_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, inner, bias=False)
        self.k_proj = nn.Linear(c.d_model, inner, bias=False)
        self.v_proj = nn.Linear(c.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, c.d_model, bias=False)
        self.out_std = INIT_STD / math.sqrt(2 * c.num_layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            _normal_(proj.weight, INIT_STD)
        _normal_(self.o_proj.weight, self.out_std)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, S, d], (cos, sin) [S, hd] for positions P..P+S-1, past (k, v) [B, H, P, hd] or None.
        Returns (out [B, S, d], (k, v) [B, H, P+S, hd])."""
        b, s, _ = x.shape
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = k.shape[2] - s
        if p == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        elif s == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new query sees the whole cache
        else:
            # is_causal aligns the mask top-left; with a cache query i must see keys 0..P+i (bottom-right).
            mask = torch.ones(s, p + s, dtype=torch.bool, device=x.device).tril(diagonal=p)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), (k, v)


class DecoderBlock(nn.Module):
    """Pre-RMSNorm block: h += attn(norm(h)); h += mlp(norm(h)). ``mlp`` is SwiGLU(d_ff) or DecoMoE."""

    def __init__(self, config: DecoConfig, layer_idx: int, dense: bool):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = (SwiGLU(c.d_model, c.d_ff, out_std=INIT_STD / math.sqrt(2 * c.num_layers)) if dense
                    else DecoMoE(c, layer_idx))

    def forward(self, h, cos, sin, past=None):
        a, present = self.self_attn(self.input_layernorm(h), cos, sin, past)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), present


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CausalLMOutput:
    """loss: CE (+ sum of the DECO layers' reg_loss in training) or None without labels; logits [B, S, V];
    past_key_values: the KV cache with use_cache=True, else None; reg_loss: sum of the DECO layers' entropy
    losses (training mode only, else None; the layers' own ``reg_loss`` is moved into it, left None on them);
    active_ratio: detached 0-d mean over DECO layers (None for the
    dense twin)."""
    loss: torch.Tensor | None
    logits: torch.Tensor
    past_key_values: KVCache | None = None
    reg_loss: torch.Tensor | None = None
    active_ratio: torch.Tensor | None = None


class DecoForCausalLM(nn.Module):
    """The decoder-only model of SPEC §3: embeddings, layer 0 with a dense SwiGLU of width d_ff, layers
    1..L-1 with DecoMoE, final RMSNorm, untied lm_head. ``dense_twin=True`` builds the same architecture with
    SwiGLU(d_ff) in every layer (the baseline of every speed-up). The init draws from torch's global RNG: seed
    it with ``torch.manual_seed`` for reproducible weights.

    Parameter names (state_dict): embed_tokens.weight, layers.{i}.{input_layernorm, post_attention_layernorm}
    .weight, layers.{i}.self_attn.{q,k,v,o}_proj.weight, layers.{i}.mlp.{gate,up,down}_proj.weight (dense) or
    layers.{i}.mlp.<DecoMoE.PARAMETER_NAMES>, norm.weight, lm_head.weight.
    """

    def __init__(self, config: DecoConfig, dense_twin: bool = False):
        super().__init__()
        c = config
        self.config, self.dense_twin = c, dense_twin
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_base)
        self.layers = nn.ModuleList(DecoderBlock(c, i, dense=dense_twin or i == 0) for i in range(c.num_layers))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        with torch.no_grad():
            _normal_(self.embed_tokens.weight, INIT_STD)
            _normal_(self.lm_head.weight, INIT_STD)

    # -- knobs and parameter groups ----------------------------------------------------------------------
    def deco_layers(self) -> Iterator[DecoMoE]:
        """The DecoMoE layers in order (none for the dense twin)."""
        return (layer.mlp for layer in self.layers if isinstance(layer.mlp, DecoMoE))

    def set_elastic(self, *, bias=_UNSET, threshold=_UNSET, max_active=_UNSET,
                    layers=None) -> "DecoForCausalLM":
        """Set the given elastic knobs (SPEC §4) on the DECO layers ``layers`` (indices into self.layers, a
        single index, or None for every DECO layer); the knobs not given keep their values. Validated before
        any layer changes. ``bias`` is a number or a tensor [] / [N] (per expert). The values are plain
        numbers and tensors handed to the ops on every call: changing them recompiles nothing."""
        selected = self._deco_layers_by_index(layers)
        _check_elastic(self.config, bias, threshold, max_active)
        for layer in selected.values():
            layer.set_elastic(bias=bias, threshold=threshold, max_active=max_active)
        return self

    def elastic_state(self, layers=None) -> dict[int, dict]:
        """{layer index: {"bias", "threshold", "max_active"}} of the DECO layers ``layers`` (None: all), to
        save and later restore with :meth:`load_elastic_state` (a tensor bias is copied)."""
        return {i: layer.elastic_state() for i, layer in self._deco_layers_by_index(layers).items()}

    def load_elastic_state(self, state: dict) -> "DecoForCausalLM":
        """Restore knobs from :meth:`elastic_state` (per layer, any subset of the knobs); everything is
        validated before any layer changes."""
        selected = self._deco_layers_by_index(state)
        for i, knobs in state.items():
            if not isinstance(knobs, dict) or not set(knobs) <= set(ELASTIC_KNOBS):
                raise ValueError(f"state: expected {{layer index: dict with keys among {ELASTIC_KNOBS}}}, got "
                                 f"{knobs!r} for layer {i}")
            _check_elastic(self.config, *(knobs.get(k, _UNSET) for k in ELASTIC_KNOBS))
        for i, knobs in state.items():
            selected[i].set_elastic(**knobs)
        return self

    def _deco_layers_by_index(self, layers) -> dict[int, DecoMoE]:
        """{index into self.layers: DecoMoE} for ``layers``: None (every DECO layer), one index or an
        iterable of them."""
        deco = {layer.layer_idx: layer for layer in self.deco_layers()}
        if layers is None:
            return deco
        try:
            indices = [layers] if isinstance(layers, int) else list(layers)
        except TypeError:
            indices = []
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i not in deco]
        if bad or not indices:
            raise ValueError(f"layers: expected None or indices of DECO layers among {sorted(deco)} (layer 0 "
                             f"is dense), got {layers!r}")
        return {i: deco[i] for i in indices}

    def set_backend(self, backend: str) -> "DecoForCausalLM":
        for layer in self.deco_layers():
            layer.backend = backend
        return self

    def no_weight_decay_parameters(self) -> set[str]:
        """Names of the parameters to train without weight decay: every 1-D parameter (RMSNorm weights,
        router_scale, gamma), the Megatron rule; matrices and embeddings decay."""
        return {name for name, p in self.named_parameters() if p.dim() < 2}

    def optimizer_param_groups(self, weight_decay: float) -> list[dict]:
        """Two AdamW groups: matrices with ``weight_decay``, the no-decay parameters with 0."""
        skip = self.no_weight_decay_parameters()
        decay = [p for n, p in self.named_parameters() if n not in skip and p.requires_grad]
        no_decay = [p for n, p in self.named_parameters() if n in skip and p.requires_grad]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False) -> CausalLMOutput:
        """input_ids [B, S] int64 (positions continue after the cache); labels [B, S] int64 with -100 for
        ignored positions, shifted inside (token t predicts labels[t+1]). Returns a CausalLMOutput."""
        _check_ids("input_ids", input_ids)
        if labels is not None:
            _check_ids("labels", labels, like=input_ids)
        past_len = self._check_cache(past_key_values, input_ids.shape[0])
        positions = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            h, present = layer(h, cos, sin, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        logits = self.lm_head(self.norm(h))

        deco = list(self.deco_layers())
        reg_loss = None
        if self.training and deco:
            reg_loss = torch.stack([m.reg_loss for m in deco]).sum()
            # The output carries the step's regulariser from here: a layer that kept its term would keep the
            # step's autograd graph alive past backward, and a CUDA graph captured later on another stream
            # (torch.cuda.graph after eager steps) would reach that graph's AccumulateGrad nodes, made on the
            # eager stream, and be invalidated.
            for m in deco:
                m.reg_loss = None
        active_ratio = torch.stack([m.active_ratio for m in deco]).mean() if deco else None
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shifted.to(ref.compute_dtype(shifted)), labels[:, 1:].reshape(-1).long(),
                                   ignore_index=-100)
            if reg_loss is not None:
                loss = loss + reg_loss
        return CausalLMOutput(loss, logits, tuple(presents) if use_cache else None, reg_loss, active_ratio)

    def _check_cache(self, past: KVCache | None, batch: int) -> int:
        if past is None:
            return 0
        if len(past) != len(self.layers):
            raise ValueError(f"past_key_values: expected {len(self.layers)} (k, v) pairs, one per layer, "
                             f"got {len(past)}")
        k = past[0][0]
        want = (batch, self.config.num_heads, k.shape[2], self.config.head_dim)
        if k.dim() != 4 or tuple(k.shape) != want:
            raise ValueError(f"past_key_values: expected k/v of shape [B, H, P, hd] = {want}, got {tuple(k.shape)}")
        return k.shape[2]

    # -- generation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to input_ids [B, S] (int64); returns [B, S + max_new_tokens].

        Greedy (argmax, lowest id on ties) unless ``do_sample``: then softmax(logits / temperature), restricted
        to the ``top_k`` largest logits if given, sampled with ``generator`` (seed it for reproducibility).
        ``use_cache=False`` re-runs the whole prefix every step (the reference for the cached path).
        """
        _check_ids("input_ids", input_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
        if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
        ids, past, step_ids = input_ids.long(), None, input_ids.long()
        for _ in range(max_new_tokens):
            out = self(step_ids if use_cache else ids, past_key_values=past, use_cache=use_cache)
            logits = out.logits[:, -1, :].float()
            if do_sample:
                nxt = _sample(logits / temperature, top_k, generator)
            else:
                nxt = logits.argmax(dim=-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            past, step_ids = out.past_key_values, nxt[:, None]
        return ids

    # -- checkpoints (deco_kernels.checkpoint) -----------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors in this library's naming; see deco_kernels.checkpoint."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype=None) -> "DecoForCausalLM":
        """Load a directory written by save_pretrained or in the authors' HF export naming (detected)."""
        from .checkpoint import from_pretrained
        return from_pretrained(directory, device=device, dtype=dtype)


def _sample(logits: torch.Tensor, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V] (fp32): top-k filter, softmax, multinomial with ``generator``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
