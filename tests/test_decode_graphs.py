"""Decode steps on fixed buffers (router/decode_graphs.py), the code CUDA graphs capture, run eagerly
on the CPU: the same tokens as transformers and as the plain engine, padding rows that touch no real
cache slot, context buckets crossed mid-generation, and the sync-free experts (grouped GEMMs)."""

from __future__ import annotations

import torch

from expertmesh.router import decode_graphs
from expertmesh.router.engine import Engine, Sequence
from tests.helpers import greedy_tokens


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_fixed_buffer_decode_gives_transformers_tokens(hf_checkpoint):
    model, path = hf_checkpoint
    engine = Engine.local(path, graphs=True)
    assert engine.graphs is not None and not engine.graphs.capture  # the CPU runs the buffers eagerly
    prompts = [_prompt(n, 20 + n) for n in (9, 3, 14)]  # 3 sequences: padded to the bucket of 4
    ours = greedy_tokens(engine, prompts, 16)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False)[0, len(prompt):].tolist()
        assert tokens == expected
    assert engine.graphs.replays == 15  # every decode step went through the buffers (not the prefill)
    assert list(engine.graphs._steps) == [(4, decode_graphs.MIN_CONTEXT)]
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_a_context_bucket_crossed_mid_generation(hf_checkpoint):
    _, path = hf_checkpoint
    plain, graphs = Engine.local(path), Engine.local(path, graphs=True)
    prompt = _prompt(decode_graphs.MIN_CONTEXT - 4, 3)  # crosses 256 context slots on the 4th token
    assert greedy_tokens(graphs, [prompt], 10) == greedy_tokens(plain, [prompt], 10)
    assert sorted(graphs.graphs._steps) == [(1, decode_graphs.MIN_CONTEXT), (1, 2 * decode_graphs.MIN_CONTEXT)]


def test_padding_rows_write_only_the_scratch_slot(hf_checkpoint):
    _, path = hf_checkpoint
    engine = Engine.local(path, graphs=True)
    seqs = [Sequence(_prompt(n, 4 + n)) for n in (5, 2, 7)]
    for s in seqs:
        engine.cache.grow(s.block_table, len(s.token_ids) + 1)
    engine.step(seqs, [len(s.token_ids) for s in seqs])  # the prefill: the plain path
    for s in seqs:
        s.num_cached = len(s.token_ids)
        s.token_ids.append(7)
    before = engine.cache.k.clone(), engine.cache.v.clone()
    engine.step(seqs, [1, 1, 1])  # 3 sequences in the bucket of 4: one padding row
    assert engine.graphs.replays == 1
    new = {engine.cache.slots(s.block_table, s.num_cached, s.num_cached + 1).item() for s in seqs}
    for cache, old in zip((engine.cache.k, engine.cache.v), before):  # (L, S + 1, G, Dh)
        changed = set((cache != old).any(-1).any(-1).any(0).nonzero().flatten().tolist())
        assert new <= changed <= new | {engine.cache.scratch_slot}
    assert engine.cache.scratch_slot == engine.cache.num_blocks * engine.cache.block_size  # no block's slot


def test_steps_the_buffers_do_not_cover_run_the_plain_way(hf_checkpoint):
    _, path = hf_checkpoint
    engine = Engine.local(path, graphs=True)
    many = [_prompt(2, 30 + i) for i in range(decode_graphs.BATCH_BUCKETS[-1] + 1)]  # one more than the largest
    greedy_tokens(engine, many, 3)
    assert engine.graphs.replays == 0


def test_sync_free_experts_in_bfloat16_are_as_close_to_float32_as_the_plain_path(hf_checkpoint):
    # bf16 on the CPU: no C kernels, so this runs the torch attention with its mask built from the
    # lengths and the grouped GEMMs: the code a CUDA graph captures on a GPU.
    _, path = hf_checkpoint
    engines = {"fp32": Engine.local(path), "plain": Engine.local(path, dtype=torch.bfloat16),
               "graphs": Engine.local(path, dtype=torch.bfloat16, graphs=True)}
    prompts = [_prompt(n, 40 + n) for n in (6, 11)]
    logits = {}
    for name, engine in engines.items():
        seqs = [Sequence(list(p)) for p in prompts]
        for s in seqs:
            engine.cache.grow(s.block_table, len(s.token_ids) + 1)
        engine.step(seqs, [len(s.token_ids) for s in seqs])
        for s in seqs:
            s.num_cached = len(s.token_ids)
            s.token_ids.append(5)
        logits[name] = engine.step(seqs, [1, 1])
    assert engines["graphs"].graphs.replays == 1 and logits["graphs"].shape == (2, 256)
    # bf16 rounds differently per GEMM shape: the grouped path is as close to fp32 as the plain one
    plain_error = (logits["plain"] - logits["fp32"]).abs().max().item()
    graphs_error = (logits["graphs"] - logits["fp32"]).abs().max().item()
    assert graphs_error <= 2 * plain_error + 1e-3, (graphs_error, plain_error)


def test_the_cuda_graphs_flag_reaches_the_engine(hf_checkpoint):
    import argparse

    from expertmesh.cluster.bringup import start_engine
    from expertmesh.flags import add_engine_flags, serving_config

    _, path = hf_checkpoint
    parser = argparse.ArgumentParser()
    add_engine_flags(parser, default_workers=0)
    assert serving_config(parser.parse_args([])).cuda_graphs  # on by default
    off = serving_config(parser.parse_args(["--no-cuda-graphs", "--kv-cache-memory", "4MiB"]))
    assert off.cuda_graphs is False
    engine, cluster = start_engine(path, off)
    assert cluster is None and engine.graphs is None
    # on by default, but only where graphs can be captured: never on the CPU
    engine, _ = start_engine(path, serving_config(parser.parse_args(["--kv-cache-memory", "4MiB"])))
    assert engine.graphs is None and not decode_graphs.available(torch.device("cpu"), torch.bfloat16)
