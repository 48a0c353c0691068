"""Shared fixtures: checkpoints written by transformers (the oracle) and by our own writer."""

from __future__ import annotations

import os

import pytest

# Keep every Ray node of the tests on loopback (Ray otherwise swaps 127.0.0.1 for the interface address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import torch

HF_CONFIGS = {
    # name: MixtralConfig overrides (vocab, sizes kept tiny; 256 keeps every logit row cheap)
    "gqa1_top2": dict(num_attention_heads=4, num_key_value_heads=4, num_experts_per_tok=2),
    "gqa4_top2": dict(num_attention_heads=8, num_key_value_heads=2, num_experts_per_tok=2),
    "window_top2": dict(num_attention_heads=4, num_key_value_heads=1, num_experts_per_tok=2,
                        sliding_window=6),
    "gqa2_top1": dict(num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=1),
}


def hf_mixtral(overrides: dict, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_local_experts=4, max_position_embeddings=512,
                           **overrides)
    model = MixtralForCausalLM(config).eval()
    # Larger weights than the 0.02 default so routing and greedy choices are far from ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    return model


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """(transformers model, folder it was saved to with save_pretrained, sharded)."""
    model = hf_mixtral(HF_CONFIGS[request.param])
    path = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(path, max_shard_size="100KB")
    return model, path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Mixtral written by our own writer, with the real Mixtral tokenizer."""
    from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)
