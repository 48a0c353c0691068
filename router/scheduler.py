"""Continuous batching, and the one owner of request and KV-block state.

`schedule()` picks the next step and reserves its blocks; `update_from_output()` takes the step's
result (sequences advance, full blocks get their prefix names) and says which requests sample now;
`finish()` frees a request's blocks. Nothing else allocates, grows or frees blocks (as vLLM's
scheduler owns its KV-cache manager); the engine only computes.

Every step: running requests first, oldest first (a decode token each, or their next prompt chunk),
then waiting requests in arrival order while the token budget, the seat cap and the KV pool allow.
When the pool cannot hold a running request's next token, the newest running request is preempted:
its blocks are freed and it goes back to the front of the queue, to be recomputed later from its
prompt and the tokens it already produced (so its output is unchanged).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from expertmesh.core.settings import DEFAULTS
from expertmesh.router.engine import Sequence
from expertmesh.router.kv_cache import KVCache


@dataclass(eq=False)
class Scheduled:
    """What the scheduler needs of a request."""
    seq: Sequence
    prompt_len: int
    cached_prompt_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    share_prefix: bool = True  # False: compute the whole prompt (its every position's logits are wanted)


Batch = list[tuple[Scheduled, int]]  # (request, tokens it computes this step), in row order


class Scheduler:
    def __init__(self, cache: KVCache, max_batch_tokens: int = DEFAULTS.max_batch_tokens,
                 max_seqs: int = DEFAULTS.max_seqs):
        assert max_batch_tokens >= 1 and max_seqs >= 1, (max_batch_tokens, max_seqs)
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Scheduled] = deque()
        self.running: list[Scheduled] = []
        self.preemptions = 0

    def add(self, request: Scheduled) -> None:
        """A new request joins the end of the queue (the serving loop bounds the queue)."""
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _fits(self, seq: Sequence, n: int) -> bool:
        return self.cache.blocks_needed(seq.num_cached + n) - len(seq.block_table) <= self.cache.free_blocks

    def _free_blocks_of(self, request: Scheduled) -> None:
        self.cache.release(request.seq.block_table)
        request.seq.block_table = []

    def _preempt(self, request: Scheduled) -> None:
        self._free_blocks_of(request)
        request.seq.num_cached = 0
        self.preemptions += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    def finish(self, request: Scheduled) -> None:
        """A finished or cancelled request leaves; its blocks go back to the pool at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_blocks_of(request)

    def schedule(self) -> Batch:
        """The next step: (request, tokens to compute) pairs, with the blocks for them reserved."""
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
                seq.block_table = self.cache.match_prefix(seq.token_ids, seq.cache_salt) if request.share_prefix else []
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
        return batch

    def update_from_output(self, batch: Batch) -> list[tuple[Scheduled, int]]:
        """The step of `batch` ran: its sequences advance and their full blocks become findable by
        later prompts. Returns (request, logits row) of the requests whose every token is now
        computed: they sample their next token."""
        ready = []
        for row, (request, n) in enumerate(batch):
            seq = request.seq
            seq.num_cached += n
            self.cache.name_full_blocks(seq.block_table, seq.token_ids, seq.num_cached, seq.cache_salt)
            if seq.num_cached == len(seq.token_ids):
                ready.append((request, row))
        return ready
