"""The scheduler alone (no model): every step within the token budget and the seat cap, blocks
reserved before the step that needs them, preemption when the pool runs short, nothing leaked."""

from __future__ import annotations

import hashlib
import random

import pytest

from expertmesh.core.config import MixtralConfig
from expertmesh.router.engine import Sequence
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.scheduler import Scheduled, Scheduler

CONFIG = MixtralConfig(vocab_size=100, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=8, num_experts=2, experts_per_token=1)


def drive(scheduler: Scheduler, wants: dict[int, int], rng: random.Random, arrivals: list[Scheduled]) -> list:
    """Run the scheduler as the serving loop does, with made-up tokens, until every request has its
    wants[id] new tokens; check the invariants of every step. Returns the steps' batches."""
    cache = scheduler.cache
    done, batches = [], []
    while arrivals or scheduler.has_work():
        for _ in range(rng.randrange(0, 3)):  # requests keep arriving between steps
            if arrivals:
                scheduler.add(arrivals.pop(0))
        batch = scheduler.schedule()
        if not batch:
            continue
        batches.append([(id(r), n) for r, n in batch])
        assert sum(n for _, n in batch) <= scheduler.max_batch_tokens
        assert len(scheduler.running) <= scheduler.max_seqs
        assert len({id(r) for r, _ in batch}) == len(batch)
        for request, n in batch:
            seq = request.seq
            assert 0 < n <= len(seq.token_ids) - seq.num_cached
            assert len(seq.block_table) * cache.block_size >= seq.num_cached + n  # reserved first
        # running requests' blocks, and the prefix blocks the queue's head already shares
        used = {b for r in [*scheduler.running, *scheduler.waiting] for b in r.seq.block_table}
        assert cache.free_blocks + len(used) == cache.num_blocks  # shared prefix blocks counted once
        for request, _ in scheduler.update_from_output(batch):
            request.seq.token_ids.append(rng.randrange(3, 100))
            if len(request.seq.token_ids) - request.prompt_len >= wants[id(request)]:
                scheduler.finish(request)
                done.append(request)
    assert cache.free_blocks == cache.num_blocks
    return batches


@pytest.mark.parametrize("seed", range(4))
def test_every_step_keeps_the_budget_seat_cap_and_pool(seed):
    rng = random.Random(seed)
    cache = KVCache(CONFIG, num_blocks=24, block_size=4)  # 96 tokens: the pool runs short
    scheduler = Scheduler(cache, max_batch_tokens=16, max_seqs=5)
    requests, wants = [], {}
    for _ in range(30):
        prompt = [1] + [rng.randrange(3, 100) for _ in range(rng.randrange(1, 30))]
        request = Scheduled(Sequence(prompt), len(prompt))
        wants[id(request)] = rng.randrange(1, 20)
        requests.append(request)
    batches = drive(scheduler, wants, rng, list(requests))
    assert any(sum(n for _, n in b) == 16 for b in batches)  # the budget is reached, not just respected
    assert any(len(b) == 5 for b in batches)  # so is the seat cap
    assert scheduler.preemptions > 0  # and the small pool forced recomputes


def test_prompt_longer_than_the_budget_is_computed_in_chunks():
    cache = KVCache(CONFIG, num_blocks=64, block_size=4)
    scheduler = Scheduler(cache, max_batch_tokens=10, max_seqs=4)
    request = Scheduled(Sequence(list(range(3, 40))), 37)
    scheduler.add(request)
    chunks = []
    while True:
        batch = scheduler.schedule()
        chunks.append(batch[0][1])
        if scheduler.update_from_output(batch):
            break
    assert chunks == [10, 10, 10, 7]
    scheduler.finish(request)
    assert cache.free_blocks == cache.num_blocks


def test_finished_prompt_blocks_are_found_by_the_next_request():
    cache = KVCache(CONFIG, num_blocks=16, block_size=4)
    scheduler = Scheduler(cache, max_batch_tokens=64, max_seqs=4)
    prompt = list(range(3, 14))  # 11 tokens: 2 full blocks and 3 more
    first = Scheduled(Sequence(list(prompt)), len(prompt))
    scheduler.add(first)
    scheduler.update_from_output(scheduler.schedule())
    scheduler.finish(first)
    second = Scheduled(Sequence(list(prompt)), len(prompt))
    scheduler.add(second)
    assert scheduler.schedule() == [(second, 3)]  # only the tokens past the shared full blocks
    assert second.cached_prompt_tokens == 8


def _prefill(cache: KVCache, prompt: list[int], salt: str = "") -> Scheduled:
    """Admit and compute one prompt alone; returns it (its blocks still held)."""
    scheduler = Scheduler(cache, max_batch_tokens=64, max_seqs=4)
    request = Scheduled(Sequence(list(prompt), cache_salt=salt), len(prompt))
    scheduler.add(request)
    scheduler.update_from_output(scheduler.schedule())
    return request


def test_a_name_collision_never_shares_another_prompts_blocks():
    """Every block name collides (a constant stands in for the hash): a prompt that differs finds
    nothing, because each block's own record (tokens, salt, parent) is compared before sharing."""
    cache = KVCache(CONFIG, num_blocks=16, block_size=4, name_block=lambda parent, tokens, salt: b"same")
    first = _prefill(cache, list(range(3, 14)))
    assert cache._name_of  # the first prompt's first block is named (the name every block has)
    for other in ([50, 51, 52, 53, 54, 55, 56, 57, 58], [3, 4, 5, 99, 7, 8, 9, 10, 11]):
        assert cache.match_prefix(other) == [], other
    assert cache.match_prefix(list(range(3, 14))) == first.seq.block_table[:1]  # its own block, checked


def test_prefix_blocks_are_shared_only_under_the_same_cache_salt():
    cache = KVCache(CONFIG, num_blocks=16, block_size=4)
    prompt = list(range(3, 14))
    first = _prefill(cache, prompt, salt="tenant-a")
    assert cache.match_prefix(prompt) == []  # no salt: another namespace
    assert cache.match_prefix(prompt, "tenant-b") == []
    shared = cache.match_prefix(prompt, "tenant-a")
    assert shared == first.seq.block_table[:2]


def test_a_block_is_shared_only_behind_the_block_it_was_computed_after():
    """Names that ignore the tokens (a weak hash: every prompt's k-th block gets the same name).
    Prompt A's first block is handed out again and prompt B's first block takes its name; A's
    second block holds the same tokens as B's would, but its keys and values were computed after
    A's first block, so a prompt that starts like B must not get it."""
    cache = KVCache(CONFIG, num_blocks=8, block_size=4,
                    name_block=lambda parent, tokens, salt: hashlib.sha256(parent).digest())
    a = _prefill(cache, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    a0, a1, a2 = a.seq.block_table
    cache.release([a0, a2])  # a1 stays held (another request shares it)
    while cache._free[0] != a0:
        cache.release([cache.allocate()])
    cache.release([cache.allocate()])  # a0 handed out again: its name is gone
    b = _prefill(cache, [50, 51, 52, 53, 60, 61, 62, 63, 64])
    b0 = b.seq.block_table[0]
    shared = cache.match_prefix([50, 51, 52, 53, 5, 6, 7, 8, 99])
    assert shared == [b0]  # b's first block, and not a1 behind it


def test_blocks_named_one_step_at_a_time_are_found_whole():
    """A prompt computed 4 tokens (one block) a step names each block as it fills, resuming its
    chain where the last step stopped; a later identical prompt then shares every full block."""
    cache = KVCache(CONFIG, num_blocks=16, block_size=4)
    scheduler = Scheduler(cache, max_batch_tokens=4, max_seqs=4)
    prompt = list(range(3, 24))  # 21 tokens: 5 full blocks and 1 more
    first = Scheduled(Sequence(list(prompt)), len(prompt))
    scheduler.add(first)
    while first.seq.num_cached < len(prompt):
        scheduler.update_from_output(scheduler.schedule())
    assert cache.match_prefix(prompt) == first.seq.block_table[:5]
