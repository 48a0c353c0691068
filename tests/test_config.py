"""Config from config.json / params.json: both rope_theta spellings, derived fields, clear errors."""

from __future__ import annotations

import json

import pytest

from expertmesh.core.config import ConfigError, from_hf_config, from_mistral_params

REAL_MIXTRAL_8X7B = {  # config.json of mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}


def _write(tmp_path, raw, name="config.json"):
    (tmp_path / name).write_text(json.dumps(raw))
    return tmp_path


def test_real_mixtral_config(tmp_path):
    c = from_hf_config(_write(tmp_path, REAL_MIXTRAL_8X7B))
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (4096, 32, 32, 8, 128)
    assert (c.num_experts, c.experts_per_token, c.rope_theta, c.sliding_window) == (8, 2, 1e6, None)
    assert c.dtype == "bfloat16" and c.eos_token_id == 2 and not c.tie_word_embeddings


def test_newer_rope_parameters_and_explicit_head_dim(tmp_path):
    raw = dict(REAL_MIXTRAL_8X7B, head_dim=64, sliding_window=4096)
    del raw["rope_theta"]
    raw["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    c = from_hf_config(_write(tmp_path, raw))
    assert (c.rope_theta, c.head_dim, c.sliding_window) == (5e5, 64, 4096)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_local_experts": None}, "num_local_experts"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hidden_size": 4095, "head_dim": None}, "hidden_size"),
    ({"sliding_window": -1}, "sliding_window"),
    ({"rope_theta": None}, "rope_theta"),
    ({"eos_token_id": 40000}, "eos_token_id"),
])
def test_bad_configs_name_the_field(tmp_path, change, message):
    raw = dict(REAL_MIXTRAL_8X7B, **change)
    with pytest.raises(ConfigError, match=message):
        from_hf_config(_write(tmp_path, raw))


def test_mistral_params_json(tmp_path):
    raw = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
           "n_kv_heads": 8, "norm_eps": 1e-05, "vocab_size": 32000, "rope_theta": 1e6,
           "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
    c = from_mistral_params(_write(tmp_path, raw, "params.json"))
    assert (c.num_experts, c.num_kv_heads, c.intermediate_size) == (8, 8, 14336)
    del raw["moe"]
    with pytest.raises(ConfigError, match="moe"):
        from_mistral_params(_write(tmp_path, raw, "params.json"))
