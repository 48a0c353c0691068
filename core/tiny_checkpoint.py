"""Write a random-initialised Mixtral in exactly the Hugging Face hub layout (or Mistral's own).

The embedded default model of `expertmesh serve`/`run`, and the fixture of many tests: sharded
safetensors with an index, config.json and the real Mixtral tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertmesh.core.checkpoint import (
    INDEX_FILE,
    expected_shapes,
    half_split_to_interleaved,
    hub_to_consolidated_name,
)
from expertmesh.core.config import MixtralConfig
from expertmesh.core.tokenizer import cache_dir, write_tokenizer_files

TINY_DEFAULTS = dict(  # small enough for a 2-core CPU, the real 32000-token vocabulary
    vocab_size=32000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=16, num_experts=8, experts_per_token=2, max_position_embeddings=4096,
)


def random_weights(config: MixtralConfig, seed: int, dtype: torch.dtype,
                   init_std: float = 0.02) -> dict[str, torch.Tensor]:
    """Hub-named tensors: norms at one, everything else normal(0, init_std); 0.02 is transformers'."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * init_std).to(dtype)
    return tensors


def hf_config_dict(config: MixtralConfig) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.experts_per_token, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
        "sliding_window": config.sliding_window, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "hidden_act": "silu", "dtype": config.dtype,
    }


def mistral_params_dict(config: MixtralConfig) -> dict:
    return {
        "dim": config.hidden_size, "n_layers": config.num_layers, "head_dim": config.head_dim,
        "hidden_dim": config.intermediate_size, "n_heads": config.num_heads,
        "n_kv_heads": config.num_kv_heads, "norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
        "sliding_window": config.sliding_window,
        "moe": {"num_experts": config.num_experts, "num_experts_per_tok": config.experts_per_token},
    }


def save_hub(tensors: dict[str, torch.Tensor], config: MixtralConfig, out: Path,
             max_shard_bytes: int) -> None:
    """Sharded model-0000N-of-0000M.safetensors + index + config.json, in key order."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, filename)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))


def save_consolidated(tensors: dict[str, torch.Tensor], config: MixtralConfig, out: Path) -> None:
    """params.json + consolidated.safetensors with Mistral's names and interleaved q/k rows."""
    renamed = {}
    for name, tensor in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            tensor = half_split_to_interleaved(tensor, heads)
        renamed[hub_to_consolidated_name(name)] = tensor.contiguous()
    save_file(renamed, out / "consolidated.safetensors", metadata={"format": "pt"})
    (out / "params.json").write_text(json.dumps(mistral_params_dict(config), indent=2))


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                          layout: str = "hub", max_shard_bytes: int = 4 << 20, init_std: float = 0.02,
                          tokenizer: str = "v1", **overrides) -> Path:
    """Write a random Mixtral with TINY_DEFAULTS (overridable) and the Mixtral tokenizer files:
    tokenizer v1 (Mixtral 8x7B's) or v3 (Mixtral 8x22B Instruct's, 32768 tokens, with tool calls)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"vocab_size": 32768} if tokenizer == "v3" else {}
    config = MixtralConfig(**(TINY_DEFAULTS | vocab | overrides | {"dtype": dtype}))
    tensors = random_weights(config, seed, getattr(torch, dtype), init_std)
    if layout == "hub":
        save_hub(tensors, config, out, max_shard_bytes)
    elif layout == "consolidated":
        save_consolidated(tensors, config, out)
    else:
        raise ValueError(f"layout must be 'hub' or 'consolidated', got {layout!r}")
    write_tokenizer_files(out, tokenizer)
    return out


def default_model_dir() -> Path:
    """The embedded default model: a tiny checkpoint created once in the cache."""
    target = cache_dir() / "tiny-mixtral-v1"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_tiny_checkpoint(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target
