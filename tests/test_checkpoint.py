"""Checkpoints: native round-trip, HF export round-trip, and a checkpoint written by hand in the authors'
naming (SPEC §3)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deco_kernels import DecoConfig, DecoForCausalLM
from deco_kernels import checkpoint as ckpt
from deco_kernels.reference import model as ref_model

TINY = DecoConfig.preset("tiny", backend="torch")
L, D, H, HD, V, DFF, N, DE, DS = 3, 64, 4, 16, 97, 160, 13, 16, 32  # the tiny preset, spelled out
IDS = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))


def build(dense_twin=False, dtype=torch.float32):
    torch.manual_seed(0)
    return DecoForCausalLM(TINY, dense_twin=dense_twin).to(dtype).eval()


def logits(model):
    with torch.no_grad():
        return model.set_backend("torch").eval()(IDS).logits


@pytest.mark.parametrize("dense_twin", [False, True], ids=["deco", "dense_twin"])
def test_save_load_round_trip(tmp_path, dense_twin):
    model = build(dense_twin)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = DecoForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config and loaded.dense_twin == dense_twin
    assert torch.equal(logits(loaded), logits(model))
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


def test_round_trip_keeps_dtype(tmp_path):
    model = build(dtype=torch.bfloat16)
    ckpt.save_pretrained(model, tmp_path)
    loaded = ckpt.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))
    assert ckpt.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("dense_twin", [False, True], ids=["deco", "dense_twin"])
def test_export_hf_round_trip(tmp_path, dense_twin):
    model = build(dense_twin)
    ckpt.export_hf(model, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.2.self_attn.o_proj.weight", "model.layers.2.post_attention_layernorm.weight"} <= names
    if not dense_twin:
        assert {f"model.layers.1.mlp.{n}" for n in ckpt.HF_DECO_NAMES.values()} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
                "vocab_size", "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                "expert_act_func", "rms_norm_eps", "rope_theta", "max_position_embeddings"):
        assert key in config
    loaded = DecoForCausalLM.from_pretrained(tmp_path)
    assert loaded.dense_twin == dense_twin
    assert torch.equal(logits(loaded), logits(model))


# ---------------------------------------------------------------------------------------------------------
# A checkpoint written by hand in the authors' naming
# ---------------------------------------------------------------------------------------------------------
def authors_tensors(seed=3, with_gamma=True):
    """(tensors in the authors' names, the same tensors in DecoForCausalLM names): two tables by hand."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.05, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=gen)

    hf = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": w(D, offset=1.0), "lm_head.weight": w(V, D)}
    native = {"embed_tokens.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
              "lm_head.weight": hf["lm_head.weight"]}
    for i in range(L):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            hf[p + norm + ".weight"] = native[q + norm + ".weight"] = w(D, offset=1.0)
        for proj in "qkvo":
            hf[f"{p}self_attn.{proj}_proj.weight"] = native[f"{q}self_attn.{proj}_proj.weight"] = w(H * HD, D)
        if i == 0:
            hf[p + "mlp.gate_proj.weight"] = native[q + "mlp.gate_proj.weight"] = w(DFF, D)
            hf[p + "mlp.up_proj.weight"] = native[q + "mlp.up_proj.weight"] = w(DFF, D)
            hf[p + "mlp.down_proj.weight"] = native[q + "mlp.down_proj.weight"] = w(D, DFF)
            continue
        hf[p + "mlp.moe_router.weight"] = native[q + "mlp.w_router"] = w(N, D)
        hf[p + "mlp.router_norm.weight"] = native[q + "mlp.router_scale"] = w(N, offset=0.1, scale=0.02)
        hf[p + "mlp.expert_up_proj.weight"] = native[q + "mlp.w_up"] = w(N * DE, D)
        native[q + "mlp.gamma"] = w(DE, offset=1.0) if with_gamma else torch.ones(DE)
        if with_gamma:
            hf[p + "mlp.expert_act.rms_norm.weight"] = native[q + "mlp.gamma"]
        hf[p + "mlp.expert_down_proj.weight"] = native[q + "mlp.w_down"] = w(D, N * DE)
        hf[p + "mlp.shared_experts.gate_proj.weight"] = native[q + "mlp.ws_gate"] = w(DS, D)
        hf[p + "mlp.shared_experts.up_proj.weight"] = native[q + "mlp.ws_up"] = w(DS, D)
        hf[p + "mlp.shared_experts.down_proj.weight"] = native[q + "mlp.ws_down"] = w(D, DS)
    return hf, native


def authors_config(**overrides):
    config = {"architectures": ["MiniCPMForCausalLM"], "hidden_size": D, "num_hidden_layers": L,
              "num_attention_heads": H, "num_key_value_heads": H, "head_dim": HD, "intermediate_size": DFF,
              "vocab_size": V, "num_experts": N, "moe_ffn_hidden_size": DE,
              "moe_shared_expert_intermediate_size": DS, "expert_act_func": "norm_silu", "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}
    config.update(overrides)
    return config


def write(directory, tensors, config, torch_bin=False):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if torch_bin:
        torch.save(tensors, directory / "pytorch_model.bin")
    else:
        save_file(tensors, str(directory / "model.safetensors"))
    return directory


def expected_logits(native, activation="norm_silu"):
    return ref_model.forward(native, DecoConfig.preset("tiny", activation=activation), IDS)


def test_loads_a_hand_written_authors_checkpoint(tmp_path):
    hf, native = authors_tensors()
    model = DecoForCausalLM.from_pretrained(write(tmp_path, hf, authors_config()))
    assert model.config.num_experts == N and model.config.d_ff == DFF and not model.dense_twin
    assert torch.equal(model.layers[1].mlp.w_router, hf["model.layers.1.mlp.moe_router.weight"])
    assert torch.equal(model.layers[2].mlp.router_scale, hf["model.layers.2.mlp.router_norm.weight"])
    out = logits(model)
    assert ((out - expected_logits(native)).norm() / expected_logits(native).norm()) < 1e-5


def test_loads_the_megatron_flavoured_export(tmp_path):
    """What the authors' converter writes: pytorch_model.bin, a base config.json overwritten with Megatron
    argument names (they win over stale HF keys), moe_layer_freq as a Python expression string, no gamma for
    the 'silu' ablation."""
    hf, native = authors_tensors(with_gamma=False)
    config = authors_config(num_hidden_layers=40, num_layers=L, intermediate_size=5120, ffn_hidden_size=DFF,
                            expert_act_func="silu", moe_layer_freq="[0]*1+[1]*2", use_mup=False)
    model = ckpt.from_pretrained(write(tmp_path, hf, config, torch_bin=True))
    assert model.config.num_layers == L and model.config.activation == "silu"
    assert torch.equal(model.layers[1].mlp.gamma, torch.ones(DE))
    ref = expected_logits(native, activation="silu")
    assert ((logits(model) - ref).norm() / ref.norm()) < 1e-5


def _drop(key):
    def edit(hf, config):
        del hf[key]
    return edit


def _add(key, value):
    def edit(hf, config):
        hf[key] = value
    return edit


def _config(**changes):
    def edit(hf, config):
        for k, v in changes.items():
            if v is None:
                del config[k]
            else:
                config[k] = v
    return edit


@pytest.mark.parametrize("edit, match", [
    (_drop("model.layers.1.mlp.moe_router.weight"), "model.layers.1.mlp.moe_router.weight"),
    (_drop("lm_head.weight"), "lm_head.weight"),
    (_add("model.layers.1.mlp.expert_bias", torch.zeros(N)), "model.layers.1.mlp.expert_bias"),
    (_add("model.layers.2.mlp.router_norm.weight", torch.zeros(N + 1)), "model.layers.2.mlp.router_norm.weight"),
    (_config(num_experts=None), "num_experts"),
    (_config(num_key_value_heads=2), "num_key_value_heads"),
    (_config(use_mup=True), "use_mup"),
    (_config(moe_layer_freq=[1, 1, 1]), "moe_layer_freq"),
    (_config(moe_layer_freq="__import__('os')"), "moe_layer_freq"),
], ids=["missing", "missing-lm_head", "unexpected", "shape", "config-key", "gqa", "mup", "layer-freq",
        "layer-freq-expr"])
def test_bad_authors_checkpoint_raises_naming_the_key(tmp_path, edit, match):
    hf, _ = authors_tensors()
    config = authors_config()
    edit(hf, config)
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        ckpt.from_pretrained(write(tmp_path, hf, config))


def test_tied_authors_checkpoint_reuses_the_embeddings(tmp_path):
    hf, _ = authors_tensors()
    del hf["lm_head.weight"]
    model = ckpt.from_pretrained(write(tmp_path, hf, authors_config(tie_word_embeddings=True)))
    assert torch.equal(model.lm_head.weight, hf["model.embed_tokens.weight"])


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("layers.1.mlp.gamma"), "layers.1.mlp.gamma"),
    (lambda t: t.update({"layers.1.mlp.extra": torch.zeros(1)}), "layers.1.mlp.extra"),
    (lambda t: t.update({"norm.weight": torch.ones(D + 1)}), "norm.weight"),
], ids=["missing", "unexpected", "shape"])
def test_bad_native_checkpoint_raises_naming_the_key(tmp_path, edit, match):
    build().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        DecoForCausalLM.from_pretrained(tmp_path)


def test_unknown_directory_format(tmp_path):
    write(tmp_path, {"w": torch.zeros(1)}, {"foo": 1})
    with pytest.raises(ValueError, match="directory"):
        ckpt.from_pretrained(tmp_path)
