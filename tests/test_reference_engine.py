"""The reference engine against transformers' MixtralForCausalLM on checkpoints it saved."""

from __future__ import annotations

import torch

from expertmesh.router.engine import Engine
from tests.helpers import greedy_tokens, prompt_logits


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_logits_match_transformers(hf_checkpoint):
    model, path = hf_checkpoint
    engine = Engine.local(path)
    prompt = _prompt(17, 0)  # longer than the sliding window of 6
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]
    ours = prompt_logits(engine, prompt)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < 1e-4


def test_greedy_generation_matches_transformers(hf_checkpoint):
    model, path = hf_checkpoint
    engine = Engine.local(path)
    prompt = _prompt(9, 1)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False)[0, len(prompt):].tolist()
    assert greedy_tokens(engine, [prompt], 32)[0] == expected


def test_cached_decoding_agrees_with_full_prefill(hf_checkpoint):
    _, path = hf_checkpoint
    engine = Engine.local(path)
    prompt = _prompt(5, 2)
    generated = greedy_tokens(engine, [prompt], 24)[0]
    full = prompt_logits(engine, prompt + generated)  # (n, V): logits after every position
    # The greedy token after each prefix, recomputed without the cache, is the one we generated.
    assert full[len(prompt) - 1:-1].argmax(-1).tolist() == generated


def test_batched_prompts_of_different_lengths_equal_each_alone(hf_checkpoint):
    _, path = hf_checkpoint
    engine = Engine.local(path)
    prompts = [_prompt(n, 10 + n) for n in (3, 11, 7, 1)]
    together = greedy_tokens(engine, prompts, 12)
    alone = [greedy_tokens(engine, [p], 12)[0] for p in prompts]
    assert together == alone
    assert engine.cache.free_blocks == engine.cache.num_blocks  # nothing leaked


def test_bfloat16_runs_and_tracks_float32(hf_checkpoint):
    _, path = hf_checkpoint
    prompt = _prompt(12, 3)
    fp32 = prompt_logits(Engine.local(path, torch.float32), prompt)
    bf16 = prompt_logits(Engine.local(path, torch.bfloat16), prompt)
    assert bf16.dtype == torch.float32  # logits always come out in fp32
    # bf16 keeps ~3 significant digits: the distributions stay close.
    p32, p16 = fp32.softmax(-1), bf16.softmax(-1)
    assert (p32 - p16).abs().sum(-1).max().item() < 0.1
