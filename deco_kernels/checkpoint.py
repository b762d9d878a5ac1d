"""Checkpoints of DecoForCausalLM: this library's format and the authors' HF export naming (SPEC §3).

Native (``save_pretrained``): config.json = {"format": "deco_kernels", "dense_twin": ..., **DecoConfig} and
model.safetensors with the DecoForCausalLM state_dict names.

HF export (``export_hf``): an HF-style config.json (hidden_size, num_hidden_layers, ..., num_experts,
moe_ffn_hidden_size, moe_shared_expert_intermediate_size, expert_act_func) and model.safetensors with Llama
names plus the authors' DECO names under model.layers.{i}.mlp. (moe_router, router_norm, expert_up_proj,
expert_act.rms_norm, expert_down_proj, shared_experts.{gate,up,down}_proj). The authors' converter
(tools/checkpoint/dist_ckpt_to_hf_minicpm.py) writes pytorch_model.bin; it is read too.

``from_pretrained`` tells the two apart by config.json. Missing or unexpected tensors and shape mismatches
raise ValueError naming the key.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import DecoConfig
from .modules import DecoForCausalLM

FORMAT = "deco_kernels"
CONFIG_NAME, WEIGHTS_NAME, TORCH_WEIGHTS_NAME = "config.json", "model.safetensors", "pytorch_model.bin"

# DecoMoE parameter -> the authors' name under model.layers.{i}.mlp.
HF_DECO_NAMES = {
    "w_router": "moe_router.weight", "router_scale": "router_norm.weight", "w_up": "expert_up_proj.weight",
    "gamma": "expert_act.rms_norm.weight", "w_down": "expert_down_proj.weight",
    "ws_gate": "shared_experts.gate_proj.weight", "ws_up": "shared_experts.up_proj.weight",
    "ws_down": "shared_experts.down_proj.weight",
}
# DecoConfig field <-> HF config.json key.
HF_CONFIG_KEYS = {
    "d_model": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "head_dim": "head_dim", "d_ff": "intermediate_size", "vocab_size": "vocab_size", "num_experts": "num_experts",
    "expert_dim": "moe_ffn_hidden_size", "shared_dim": "moe_shared_expert_intermediate_size",
    "activation": "expert_act_func", "norm_eps": "rms_norm_eps", "rope_base": "rope_theta",
    "max_seq_len": "max_position_embeddings",
}
# The authors' converter copies a base config.json and then overwrites it with Megatron-named arguments, so
# on import these keys win over the HF ones when present.
MEGATRON_KEYS = {"num_layers": "num_layers", "d_ff": "ffn_hidden_size", "norm_eps": "norm_epsilon",
                 "head_dim": "kv_channels"}
# Written by export_hf, optional on import (defaults from SPEC §3).
HF_OPTIONAL = ("head_dim", "activation", "norm_eps", "rope_base", "max_seq_len")
# The authors export gamma only for the activations that have it.
GAMMA_ACTIVATIONS = ("norm_silu", "norm_silu_nomean")


# ---------------------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------------------
def save_pretrained(model: DecoForCausalLM, directory) -> None:
    """Write config.json and model.safetensors (this library's naming) into ``directory``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "dense_twin": model.dense_twin, **model.config.to_dict()}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(_contiguous(model.state_dict()), str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def from_pretrained(directory, *, device=None, dtype=None) -> DecoForCausalLM:
    """Load a model from ``directory`` in either naming. ``dtype`` defaults to the stored embeddings' dtype;
    ``device`` to the CPU."""
    path = Path(directory)
    raw = json.loads((path / CONFIG_NAME).read_text())
    tensors = _read_weights(path)
    if raw.get("format") == FORMAT:
        config, dense_twin = DecoConfig.from_dict(raw), bool(raw.get("dense_twin", False))
        model = DecoForCausalLM(config, dense_twin=dense_twin)
    elif "hidden_size" in raw:
        config, dense_twin = config_from_hf(raw)
        model = DecoForCausalLM(config, dense_twin=dense_twin)
        tensors = state_dict_from_hf(tensors, model, tie_word_embeddings=bool(raw.get("tie_word_embeddings")))
    else:
        raise ValueError(f"directory: {path / CONFIG_NAME} is neither this library's format (\"format\": "
                         f"\"{FORMAT}\") nor an HF-style config (no \"hidden_size\")")
    load_checked(model, tensors)
    stored = tensors.get("embed_tokens.weight")
    return model.to(device=device, dtype=dtype or (stored.dtype if stored is not None else None))


def load_checked(model: DecoForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """model.load_state_dict after checking that the names and shapes match exactly (ValueError naming the
    first offending key)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"checkpoint: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"checkpoint: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"checkpoint: key {k!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(expected[k].shape)}")
    model.load_state_dict(tensors, strict=True)


# ---------------------------------------------------------------------------------------------------------
# The authors' HF export naming
# ---------------------------------------------------------------------------------------------------------
def hf_name(name: str) -> str:
    """DecoForCausalLM state_dict name -> the authors' HF export name."""
    if name == "lm_head.weight":
        return name
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] == "mlp" and parts[3] in HF_DECO_NAMES:
        return f"model.layers.{parts[1]}.mlp.{HF_DECO_NAMES[parts[3]]}"
    return "model." + name  # Llama names: embed_tokens, layers.i.self_attn.*, *_layernorm, mlp.*_proj, norm


def _exported(name: str, config: DecoConfig) -> bool:
    return not (name.endswith(".mlp.gamma") and config.activation not in GAMMA_ACTIVATIONS)


def state_dict_to_hf(model: DecoForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under the authors' names."""
    return {hf_name(k): t for k, t in model.state_dict().items() if _exported(k, model.config)}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], model: DecoForCausalLM,
                       tie_word_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Tensors in the authors' naming -> ``model``'s state_dict naming. A gamma the activation does not
    export is ones; a missing lm_head is the embeddings when tie_word_embeddings."""
    out, used = {}, set()
    for name, like in model.state_dict().items():
        key = hf_name(name)
        if key in tensors:
            if tensors[key].shape != like.shape:
                raise ValueError(f"checkpoint: key {key!r} has shape {tuple(tensors[key].shape)}, expected "
                                 f"{tuple(like.shape)}")
            out[name] = tensors[key]
            used.add(key)
        elif not _exported(name, model.config):
            out[name] = torch.ones_like(like)
        elif name == "lm_head.weight" and tie_word_embeddings and "model.embed_tokens.weight" in tensors:
            out[name] = tensors["model.embed_tokens.weight"]
        else:
            raise ValueError(f"checkpoint: missing key {key!r}")
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise ValueError(f"checkpoint: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    return out


def config_to_hf(config: DecoConfig, dense_twin: bool = False) -> dict:
    """HF-style config.json for ``config``; moe_layer_freq marks which layers are DECO (0: dense)."""
    out = {"architectures": ["DecoForCausalLM"], "model_type": "deco"}
    out.update({key: getattr(config, field) for field, key in HF_CONFIG_KEYS.items()})
    out.update(num_key_value_heads=config.num_heads, tie_word_embeddings=False, hidden_act="silu",
               router_act_func="relu",
               moe_layer_freq=[0] * config.num_layers if dense_twin else [0] + [1] * (config.num_layers - 1))
    return out


def config_from_hf(raw: dict) -> tuple[DecoConfig, bool]:
    """(DecoConfig, dense_twin) from an HF-style config.json; unsupported variants raise ValueError."""
    fields = {}
    for field, hf_key in HF_CONFIG_KEYS.items():
        key = next((k for k in (MEGATRON_KEYS.get(field), hf_key) if k and raw.get(k) is not None), None)
        if key is not None:
            fields[field] = raw[key]
        elif field == "head_dim" and "hidden_size" in raw and raw.get("num_attention_heads"):
            fields[field] = raw["hidden_size"] // raw["num_attention_heads"]
        elif field not in HF_OPTIONAL:
            raise ValueError(f"config.json: missing key {hf_key!r}")
    kv_heads = raw.get("num_query_groups") or raw.get("num_key_value_heads") or fields["num_heads"]
    if kv_heads != fields["num_heads"]:
        raise ValueError(f"num_key_value_heads: expected {fields['num_heads']} (MHA), got {kv_heads}")
    if raw.get("use_mup"):
        raise ValueError("use_mup: muP-scaled checkpoints are not supported (expected false)")
    if raw.get("router_act_func", "relu") != "relu":
        raise ValueError(f"router_act_func: expected 'relu', got {raw['router_act_func']!r}")
    num_layers = fields["num_layers"]
    freq = _layer_freq(raw.get("moe_layer_freq"), num_layers)
    if freq == [0] * num_layers:
        return DecoConfig(**fields), True
    if freq != [0] + [1] * (num_layers - 1):
        raise ValueError(f"moe_layer_freq: expected layer 0 dense and the others DECO ([0] + [1] * "
                         f"{num_layers - 1}) or all dense, got {freq}")
    return DecoConfig(**fields), False


def _layer_freq(value, num_layers: int) -> list[int]:
    """moe_layer_freq as a list; the authors' Megatron args may hold a string like "[0]*1+[1]*15", parsed
    here without eval (lists of ints, + and *)."""
    if value is None:
        return [0] + [1] * (num_layers - 1)
    if isinstance(value, str):
        try:
            value = _list_expr(ast.parse(value, mode="eval").body)
        except (SyntaxError, ValueError, TypeError):
            raise ValueError(f"moe_layer_freq: expected a list or a list expression, got {value!r}") from None
    if not isinstance(value, list) or len(value) != num_layers:
        raise ValueError(f"moe_layer_freq: expected a list of {num_layers} entries, got {value!r}")
    return value


def _list_expr(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_list_expr(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        a, b = _list_expr(node.left), _list_expr(node.right)
        return a + b if isinstance(node.op, ast.Add) else a * b
    raise ValueError("unsupported expression")


def export_hf(model: DecoForCausalLM, directory) -> None:
    """Write ``model`` in the authors' HF export naming: config.json + model.safetensors."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config, model.dense_twin)
    config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(_contiguous(state_dict_to_hf(model)), str(path / WEIGHTS_NAME), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------
def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().contiguous() for k, t in tensors.items()}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).exists():
        return load_file(str(path / WEIGHTS_NAME), device="cpu")
    if (path / TORCH_WEIGHTS_NAME).exists():
        return torch.load(path / TORCH_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"directory: neither {WEIGHTS_NAME} nor {TORCH_WEIGHTS_NAME} in {path}")
