"""Continuous batching: which requests run in the next step, and how many tokens each computes.

Every step: running requests first, oldest first (a decode token each, or their next prompt chunk),
then waiting requests in arrival order while the token budget, the seat cap and the KV pool allow.
When the pool cannot hold a running request's next token, the newest running request is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later from its
prompt and the tokens it already produced (so its output is unchanged).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.engine import Sequence
from router.kv_cache import KVCache


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the request was not accepted."""


@dataclass(eq=False)
class Scheduled:
    """What the scheduler needs of a request."""
    seq: Sequence
    prompt_len: int
    preemptions: int = 0
    cached_prompt_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    prompt_tokens_computed: int = 0  # prompt positions run through the model (recomputes included)


class Scheduler:
    def __init__(self, cache: KVCache, max_batch_tokens: int = 2048, max_seqs: int = 64,
                 max_queue: int = 1024):
        if max_batch_tokens < 1 or max_seqs < 1 or max_queue < 0:
            raise ValueError("max_batch_tokens and max_seqs must be >= 1, max_queue >= 0")
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.max_queue = max_queue
        self.waiting: deque = deque()
        self.running: list = []
        self.preemptions = 0

    def add(self, request: Scheduled) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting)")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _fits(self, seq: Sequence, n: int) -> bool:
        return self.cache.blocks_needed(seq.num_cached + n) - len(seq.block_table) <= self.cache.free_blocks

    def _preempt(self, request: Scheduled) -> None:
        self.cache.release(request.seq.block_table)
        request.seq.block_table = []
        request.seq.num_cached = 0
        request.preemptions += 1
        self.preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def remove(self, request: Scheduled) -> None:
        """A finished or cancelled request leaves; its blocks go back to the pool at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.cache.release(request.seq.block_table)
        request.seq.block_table = []

    def schedule(self) -> list[tuple[Scheduled, int]]:
        """The next step: (request, tokens to compute) pairs, in order."""
        budget, batch = self.max_batch_tokens, []
        preempted = False
        for request in list(self.running):
            if request not in self.running or budget == 0:
                continue
            seq = request.seq
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            while not self._fits(seq, n):
                victims = [r for r in self.running if r is not request and all(r is not b for b, _ in batch)]
                self._preempt(victims[-1] if victims else request)
                preempted = True
                if not victims:
                    break
            if request in self.running:
                self.cache.grow(seq.block_table, seq.num_cached + n)  # reserve now, before the next one
                batch.append((request, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and not preempted:
            request = self.waiting[0]
            seq = request.seq
            if not seq.block_table:
                seq.block_table = self.cache.match_prefix(seq.token_ids)
                seq.num_cached = len(seq.block_table) * self.cache.block_size
                if request.cached_prompt_tokens < 0:
                    request.cached_prompt_tokens = seq.num_cached
            n = min(len(seq.token_ids) - seq.num_cached, budget)
            if not self._fits(seq, n):
                if not self.running:  # nothing will free blocks: admit a smaller first chunk
                    n = (self.cache.free_blocks + len(seq.block_table)) * self.cache.block_size - seq.num_cached
                if n <= 0 or not self._fits(seq, n):
                    break
            self.waiting.popleft()
            self.running.append(request)
            self.cache.grow(seq.block_table, seq.num_cached + n)
            batch.append((request, n))
            budget -= n
        for request, n in batch:
            start = request.seq.num_cached
            request.prompt_tokens_computed += max(0, min(start + n, request.prompt_len) - start)
        return batch
