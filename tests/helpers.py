"""Small drivers the tests share: greedy generation through the serving loop, and full-prompt logits."""

from __future__ import annotations

import functools
import time

import torch
from tokenizers import Tokenizer

from expertmesh.core.tokenizer import TextTokenizer, mixtral_tokenizer_json
from expertmesh.router.engine import Engine, Sequence
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine


@functools.cache
def _mixtral_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(mixtral_tokenizer_json()))


def text_tokenizer(engine: Engine) -> TextTokenizer:
    """Mixtral's tokenizer, for streaming text of any test checkpoint (their ids are below 32000)."""
    return TextTokenizer(_mixtral_tokenizer(), engine.config.bos_token_id, engine.config.eos_token_id)


def greedy_tokens(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`new_tokens` greedy tokens per prompt (EOS ignored), all prompts batched, through the same
    serving loop as `serve` and `run`, driven on this thread."""
    return serving_greedy(ServingEngine(engine, text_tokenizer(engine), own_thread=False), prompts, new_tokens)


def serving_greedy(serving: ServingEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """As greedy_tokens, through a serving loop the caller made (one that applies a cluster's changes)."""
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    chunks = serving.generate(prompts, params)
    assert all(c[-1].error is None for c in chunks), [c[-1].error for c in chunks]
    return [[t for c in request for t in c.token_ids] for request in chunks]


def assert_prefixes_of_greedy(checkpoint, prompts: list[list[int]], got: list[list[int]]) -> None:
    """Each stream's tokens (cut short when the test stopped it) are the start of the reference
    engine's greedy tokens for its prompt, computed only as far as the longest stream went."""
    from expertmesh.router.engine import Engine

    want = greedy_tokens(Engine.local(checkpoint), prompts, max(len(g) for g in got))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w[:len(g)], (i, next(j for j, (a, b) in enumerate(zip(g, w)) if a != b))


def prompt_logits(engine: Engine, token_ids: list[int]) -> torch.Tensor:
    """Logits after every position of one prompt, (n, V) fp32: one full prefill (no prefix cache),
    on blocks taken from the pool and given back."""
    seq = Sequence(list(token_ids))
    engine.cache.grow(seq.block_table, len(token_ids))
    try:
        return engine.step([seq], [len(token_ids)], all_logits=True)[0]
    finally:
        engine.cache.release(seq.block_table)


def wait_until_idle(stub, timeout: float = 20):
    """Poll a server's stats (a GenerationStub) until nothing runs or waits and every KV block is
    back in the pool; returns those stats. Cancelled requests leave at the next step boundary."""
    from expertmesh.v1 import generation_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        stats = stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
        if stats.running == stats.waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
