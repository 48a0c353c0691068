"""Model steps driven directly, below the serving loop, for benchmarks that time one step.

The serving path leaves blocks to its scheduler; a benchmark that times bare steps takes blocks from
the pool itself, steps, and gives them back.
"""

from __future__ import annotations

from expertmesh.router.engine import Engine, Sequence


def step(engine: Engine, seqs: list[Sequence]):
    """Compute every uncached token of each sequence in one step; returns its logits (S, V)."""
    num_new = [len(s.token_ids) - s.num_cached for s in seqs]
    for s in seqs:
        engine.cache.grow(s.block_table, len(s.token_ids))
    logits = engine.step(seqs, num_new)
    for s in seqs:
        s.num_cached = len(s.token_ids)
    return logits


def release(engine: Engine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.cache.release(s.block_table)
        s.block_table, s.num_cached = [], 0


def greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """`new_tokens` greedy tokens per prompt, all prompts in every step (a plain static batch)."""
    seqs = [Sequence(list(p)) for p in prompts]
    try:
        for _ in range(new_tokens):
            for s, token in zip(seqs, step(engine, seqs).argmax(-1).tolist()):
                s.token_ids.append(token)
    finally:
        release(engine, seqs)
    return [s.token_ids[len(p):] for s, p in zip(seqs, prompts)]


def prompt_logits(engine: Engine, prompt: list[int]):
    """Logits after every position of one prompt (n, V), one full prefill."""
    seq = Sequence(list(prompt))
    engine.cache.grow(seq.block_table, len(prompt))
    try:
        return engine.step([seq], [len(prompt)], all_logits=True)[0]
    finally:
        release(engine, [seq])
