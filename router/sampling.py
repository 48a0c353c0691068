"""Per-request sampling: parameters (checked in router/requests.py), penalties, temperature,
top-k/top-p/min-p, seeds, log-probabilities.

Filters apply in this order, each to the distribution the ones before it left (renormalised):
penalties, temperature, top-k, min-p, top-p (tests/test_sampling.py checks the frequencies).
A seeded request draws each token from a generator keyed by (seed, position in the sequence), so a
seed gives the same tokens whatever else is in the batch, and a stream continued on another router
from its emitted tokens (router/requests.py's Resume) draws what the first router would have drawn.
Log-probabilities are those of the model's own distribution (log-softmax of the raw
logits, before penalties and temperature), so they add up to the sequence's log-likelihood.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens with at least this probability
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token)
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings, never part of the output text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: chosen token's plus the n most likely
    # None: none; n >= 0: each prompt token's logprob (after the first) plus the n most likely at
    # its position: the prompt's log-likelihood (evaluation harnesses); then max_new_tokens may be 0
    prompt_logprobs: int | None = None


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def position_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprobs]:
    """logits (N, V) fp32, row i the model's prediction for tokens[i] -> each token's logprob
    under it, with the `top` most likely (the prompt's log-likelihood, position by position)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(1, torch.tensor(tokens, dtype=torch.int64)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprobs(t, lp) for t, lp in zip(tokens, chosen)]
    best = torch.topk(logprobs, top, dim=-1)
    return [TokenLogprobs(t, lp, list(zip(ids, values)))
            for t, lp, ids, values in zip(tokens, chosen, best.indices.tolist(), best.values.tolist())]


def draw_seed(seed: int, position: int) -> int:
    """The seed of the draw at `position` (the sequence's length before the token) of a request
    seeded with `seed`: a hash, so neighbouring positions and seeds give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch takes seeds below 2**63 on every build


class RequestSampler:
    """Samples one request's tokens; keeps its output-token counts and, for a grammar, its state."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], vocab_size: int, constraint=None,
                 prior_output: tuple[int, ...] = ()):
        """constraint: router/structured.py's Constraint, when the answer must follow a grammar.
        prior_output: tokens this request already produced elsewhere (a continuation): counted as its
        output and followed by the grammar, as if sampled here."""
        self.params = params
        self.constraint = constraint
        self.prompt_ids = torch.tensor(prompt_ids, dtype=torch.int64)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.position = len(prompt_ids)  # of the next draw, in the whole sequence
        for token in prior_output:
            self._took(token)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits, nothing else: such rows are sampled together, in one op, and
        keep no token counts (only penalties read them)."""
        p = self.params
        return (p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1.0
                and not p.presence_penalty and not p.frequency_penalty and self.constraint is None)

    def _penalised(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            seen = torch.cat([self.prompt_ids, self.output_counts.nonzero().flatten()]).unique()
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            logits -= p.presence_penalty * (self.output_counts > 0) + p.frequency_penalty * self.output_counts
        return logits

    def sample(self, logits: torch.Tensor) -> tuple[int, TokenLogprobs | None]:
        """logits (V,) fp32 of the next position -> token id (and its log-probabilities if asked)."""
        p = self.params
        scores = self._penalised(logits.clone())
        if self.constraint is not None:
            self.constraint.mask(scores)  # tokens the grammar does not allow next: -inf
        if p.temperature == 0:
            token = int(torch.argmax(scores))
        else:
            scores = scores / p.temperature
            if p.top_k and p.top_k < scores.shape[0]:
                kth = torch.topk(scores, p.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if p.min_p > 0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
                probs = probs / probs.sum()  # top-p measures mass within what min-p kept
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of better tokens
                sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            generator = None
            if p.seed is not None:
                generator = torch.Generator().manual_seed(draw_seed(p.seed, self.position))
            token = int(torch.multinomial(probs, 1, generator=generator))
        self._took(token)
        if p.logprobs is None:
            return token, None
        logprobs = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logprobs, p.logprobs) if p.logprobs else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return token, TokenLogprobs(token, float(logprobs[token]), pairs)

    def _took(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.accept(token)
        self.output_counts[token] += 1
        self.position += 1
