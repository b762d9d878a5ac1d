"""Plain functional forward of the full DECO model (SPEC §3): the ground truth for deco_kernels.modules.

Written independently of the modules: its own RoPE (the two halves rotated explicitly), its own attention
(explicit scores, causal mask and softmax, no KV cache), the FFNs through the reference ops. Parameters use the
DecoForCausalLM state_dict naming; a layer is a DECO layer iff ``layers.{i}.mlp.w_router`` is present, so the
dense twin runs too.
"""
from __future__ import annotations

import math

import torch

from . import ops as ref


def rope_tables(seq_len: int, head_dim: int, base: float, dtype, device):
    """cos, sin [S, 1, hd/2] of the angles pos * base^(-2i/hd), computed in float64."""
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(device, dtype)[:, None, :], angles.sin().to(device, dtype)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd]: the pair (x[i], x[i + hd/2]) is rotated by the angle of frequency i."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(x, p: dict, prefix: str, num_heads: int, head_dim: int, cos, sin) -> torch.Tensor:
    """Causal MHA of x [B, S, d] with the weights ``{prefix}{q,k,v,o}_proj.weight``."""
    b, s, _ = x.shape
    q, k, v = ((x @ p[f"{prefix}{n}_proj.weight"].t()).view(b, s, num_heads, head_dim) for n in "qkv")
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, num_heads * head_dim)
    return out @ p[f"{prefix}o_proj.weight"].t()


def ffn(x, p: dict, prefix: str, config, bias=0.0, threshold=0.0, max_active=None) -> torch.Tensor:
    """The DECO layer (reference deco_ffn) if ``{prefix}w_router`` exists, else the dense SwiGLU."""
    if f"{prefix}w_router" in p:
        return ref.deco_ffn(x, **{n: p[prefix + n] for n in ref.WEIGHT_NAMES}, bias=bias, threshold=threshold,
                            max_active=max_active, activation=config.activation)
    return ref.swiglu(x, p[f"{prefix}gate_proj.weight"], p[f"{prefix}up_proj.weight"],
                      p[f"{prefix}down_proj.weight"])


def forward(params: dict[str, torch.Tensor], config, input_ids: torch.Tensor, *, bias=0.0, threshold=0.0,
            max_active=None) -> torch.Tensor:
    """Logits [B, S, V] of input_ids [B, S] (int64), all arithmetic in compute_dtype of the embeddings
    (float64 for float64 parameters, else float32). Elastic knobs apply to every DECO layer. Differentiable in
    every parameter, like the reference ops."""
    cd = ref.compute_dtype(params["embed_tokens.weight"])
    p = {name: t.to(cd) for name, t in params.items()}
    s = input_ids.shape[1]
    cos, sin = rope_tables(s, config.head_dim, config.rope_base, cd, input_ids.device)
    h = p["embed_tokens.weight"][input_ids]
    for i in range(config.num_layers):
        pre = f"layers.{i}."
        x = ref.rms_norm(h, p[pre + "input_layernorm.weight"], config.norm_eps)
        h = h + attention(x, p, pre + "self_attn.", config.num_heads, config.head_dim, cos, sin)
        x = ref.rms_norm(h, p[pre + "post_attention_layernorm.weight"], config.norm_eps)
        h = h + ffn(x, p, pre + "mlp.", config, bias, threshold, max_active)
    return ref.rms_norm(h, p["norm.weight"], config.norm_eps) @ p["lm_head.weight"].t()
