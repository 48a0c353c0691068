"""What a client may ask for, checked once, at the boundary (the gateway, the CLI's `run`).

`validate_request` turns raw prompt ids and sampling parameters into a `ValidRequest`, or raises
`InvalidRequest` naming the field. Below the boundary (serving loop, scheduler, sampling) a
ValidRequest is taken as given: they assert, never re-check.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.router.sampling import MAX_LOGPROBS, SamplingParams


class InvalidRequest(ValueError):
    """A request the server cannot serve as asked; the message names the field."""


@dataclass(frozen=True)
class RequestLimits:
    """What the model and the serving engine can take."""
    vocab_size: int
    max_context: int  # prompt + new tokens, the model's context
    kv_tokens: int  # tokens the whole KV pool holds: one request may not need more


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams


def _check_params(p: SamplingParams, vocab_size: int) -> None:
    def bad(name: str, why: str):
        raise InvalidRequest(f"{name} {why}, got {getattr(p, name)!r}")

    if not p.temperature >= 0:
        bad("temperature", "must be >= 0")
    if not 0 < p.top_p <= 1:
        bad("top_p", "must be in (0, 1]")
    if p.top_k < 0:
        bad("top_k", "must be >= 0 (0 disables it)")
    if not 0 <= p.min_p <= 1:
        bad("min_p", "must be in [0, 1]")
    if not p.repetition_penalty > 0:
        bad("repetition_penalty", "must be > 0")
    if not -2 <= p.presence_penalty <= 2:
        bad("presence_penalty", "must be in [-2, 2]")
    if not -2 <= p.frequency_penalty <= 2:
        bad("frequency_penalty", "must be in [-2, 2]")
    if p.max_new_tokens < 1:
        bad("max_new_tokens", "must be >= 1")
    if any(not s for s in p.stop):
        bad("stop", "must not contain an empty string")
    if any(not 0 <= t < vocab_size for t in p.stop_token_ids):
        bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")


def validate_request(prompt_ids, params: SamplingParams, limits: RequestLimits) -> ValidRequest:
    """Check a prompt and its parameters against the model and the pool; -> ValidRequest."""
    prompt = tuple(prompt_ids)
    if not prompt:
        raise InvalidRequest("prompt is empty")
    bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    _check_params(params, limits.vocab_size)
    total = len(prompt) + params.max_new_tokens
    if len(prompt) >= limits.max_context:
        raise InvalidRequest(f"prompt has {len(prompt)} tokens; the context is {limits.max_context}")
    if total > limits.max_context:
        raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt)} tokens "
                             f"exceeds the context of {limits.max_context}")
    if total > limits.kv_tokens:
        raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt)} tokens "
                             f"needs more KV cache than the pool holds ({limits.kv_tokens} tokens)")
    return ValidRequest(prompt, params)
