"""Checkpoint reading: layouts, reading by ownership, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh.core.checkpoint import Checkpoint, CheckpointError, expert_keys
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from tests.helpers import prompt_logits

SMALL = dict(vocab_size=32000, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, num_experts=4)


@pytest.fixture()
def small(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ck", seed=3, max_shard_bytes=1 << 16, **SMALL)


def test_consolidated_layout_gives_the_same_logits_as_hub(tmp_path):
    hub = write_tiny_checkpoint(tmp_path / "hub", seed=5, **SMALL)
    consolidated = write_tiny_checkpoint(tmp_path / "cons", seed=5, layout="consolidated", **SMALL)
    assert Checkpoint(consolidated).layout == "consolidated"
    raw = load_file(consolidated / "consolidated.safetensors")
    assert "layers.0.feed_forward.experts.3.w2.weight" in raw and "layers.1.attention.wq.weight" in raw
    prompt = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734]
    a = prompt_logits(Engine.local(hub), prompt)
    b = prompt_logits(Engine.local(consolidated), prompt)
    assert torch.equal(a, b)


def _interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hub (half-split RoPE) q/k rows -> Mistral's interleaved rows, written out row by row from the
    definition: in each head, hub row i pairs with row i + Dh/2; Mistral keeps a pair side by side."""
    head_dim = w.shape[0] // n_heads
    rows = []
    for h in range(n_heads):
        for r in range(head_dim):
            pair, second = divmod(r, 2)  # Mistral row r is the first or second element of pair r // 2
            rows.append(w[h * head_dim + pair + second * head_dim // 2])
    return torch.stack(rows)


def test_consolidated_reader_against_an_independently_permuted_checkpoint(tmp_path):
    """A consolidated checkpoint made here from a hub one (names by our map, q/k rows by the test's
    own permutation, not our writer's) reads back as the hub tensors and gives identical logits."""
    from expertmesh.core.checkpoint import hub_to_consolidated_name

    hub = write_tiny_checkpoint(tmp_path / "hub", seed=6, **SMALL)
    cons = write_tiny_checkpoint(tmp_path / "cons", seed=99, layout="consolidated", **SMALL)  # params.json
    hub_tensors = {k: v for f in sorted(hub.glob("*.safetensors")) for k, v in load_file(f).items()}
    heads = {"q_proj": SMALL["num_heads"], "k_proj": SMALL["num_kv_heads"]}
    rewritten = {}
    for name, tensor in hub_tensors.items():
        proj = name.split(".")[-2]
        rewritten[hub_to_consolidated_name(name)] = _interleave_rows(tensor, heads[proj]) if proj in heads else tensor
    assert set(rewritten) == set(load_file(cons / "consolidated.safetensors"))
    save_file(rewritten, cons / "consolidated.safetensors")
    read = Checkpoint(cons).read_dense(torch.float32)
    for layer in range(SMALL["num_layers"]):
        for proj in heads:
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert torch.equal(read[key], hub_tensors[key]), key
    prompt = [1, 415, 2936, 9060, 285, 1142, 28705, 28770, 28734]
    assert torch.equal(prompt_logits(Engine.local(hub), prompt), prompt_logits(Engine.local(cons), prompt))


def test_hub_checkpoint_from_transformers_reads_every_key(hf_checkpoint):
    model, path = hf_checkpoint
    checkpoint = Checkpoint(path)
    assert checkpoint.layout == "hub"
    assert len(list(path.glob("model-*.safetensors"))) > 1  # really sharded
    assert set(checkpoint.locations) == set(json.loads(
        (path / "model.safetensors.index.json").read_text())["weight_map"])


def test_read_experts_reads_only_owned_pairs(small):
    checkpoint = Checkpoint(small)
    got = checkpoint.read_experts([(1, 2), (0, 3)])
    assert set(got) == {(1, 2), (0, 3)}
    w1, w2, w3 = got[(1, 2)]
    assert w1.shape == (48, 32) and w2.shape == (32, 48) and w3.shape == (48, 32)
    dense = checkpoint.read_dense()
    assert not any(".experts." in name for name in dense)
    assert "model.layers.1.block_sparse_moe.gate.weight" in dense
    with pytest.raises(KeyError):
        checkpoint.read_experts([(0, 4)])


def test_single_file_checkpoint(small, tmp_path):
    single = tmp_path / "single"
    shutil.copytree(small, single)
    tensors = {}
    for shard in single.glob("model-*.safetensors"):
        tensors |= load_file(shard)
        shard.unlink()
    (single / "model.safetensors.index.json").unlink()
    save_file(tensors, single / "model.safetensors")
    assert torch.equal(Checkpoint(single).read_experts([(0, 1)])[(0, 1)][0],
                       Checkpoint(small).read_experts([(0, 1)])[(0, 1)][0])


def _shard_holding(path, key):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path / index[key]


def test_missing_shard_names_the_file(small):
    victim = _shard_holding(small, expert_keys(1, 1)[0])
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(small)


def test_truncated_shard_names_the_file(small):
    victim = _shard_holding(small, expert_keys(0, 2)[1])
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim.name}.*unreadable"):
        Checkpoint(small)


def _rewrite_shard(path, key, edit):
    shard = _shard_holding(path, key)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return shard


def test_wrong_shape_names_key_and_file(small):
    key = "model.layers.0.self_attn.k_proj.weight"
    shard = _rewrite_shard(small, key, lambda t: t.__setitem__(key, torch.zeros(7, 32)))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*'{key}' has shape \[7, 32\], expected \[16, 32\]"):
        Checkpoint(small)


def test_unknown_key_names_key_and_file(small):
    key = "model.layers.0.self_attn.q_proj.weight"
    shard = _rewrite_shard(small, key, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*unexpected tensor 'model.layers.0.mystery.weight'"):
        Checkpoint(small)


def test_missing_tensor_is_named(small):
    key = expert_keys(1, 3)[2]
    _rewrite_shard(small, key, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"'{key}' is missing"):
        Checkpoint(small)


def test_wrong_model_type_is_refused(small):
    config = json.loads((small / "config.json").read_text())
    config["model_type"] = "llama"
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type.*'llama'"):
        Checkpoint(small)


def test_tiny_checkpoints_are_deterministic(tmp_path):
    """Pods of the CPU deployment each write the tiny model; they must all hold the same weights."""
    a = write_tiny_checkpoint(tmp_path / "a", seed=9, **SMALL)
    b = write_tiny_checkpoint(tmp_path / "b", seed=9, **SMALL)
    for shard in sorted(a.glob("*.safetensors")):
        assert shard.read_bytes() == (b / shard.name).read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
