"""What a client may ask for, checked once, at the boundary (the gateway, the CLI's `run`).

`validate_request` turns raw prompt ids and sampling parameters into a `ValidRequest`, or raises
`InvalidRequest` naming the field. Below the boundary (serving loop, scheduler, sampling) a
ValidRequest is taken as given: they assert, never re-check.

Ranges are the ones that are numerically safe, not just of the right sign (a temperature of 1e-40
passes "> 0" and overflows the logits it divides), and every list a client sends is bounded, so that
no request can cost the server more than its share. Error messages quote at most QUOTE_CHARS of
what the client sent: an error must fit in gRPC's trailer, whatever the client sent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expertmesh.router.sampling import MAX_LOGPROBS, SamplingParams

# Bounds. Each one is generous for real use and keeps one request's cost small.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0  # below 0.01 (but not 0) logits / T can overflow fp32
MIN_PENALTY, MAX_PENALTY = 1e-2, 100.0  # repetition penalty divides logits too
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 512  # every new token is matched against each of them
MAX_STOP_TOKEN_IDS = 128
MAX_CHAT_MESSAGES = 256
MAX_REQUEST_ID_CHARS = 128  # echoed in every response
MAX_CACHE_SALT_CHARS = 256  # a tenant's prefix-cache namespace
CHARS_PER_CONTEXT_TOKEN = 16  # a prompt longer than this x the context cannot fit (SentencePiece
#                               merges at most 16 spaces into one piece): refused before tokenising
QUOTE_CHARS = 80


class InvalidRequest(ValueError):
    """A request the server cannot serve as asked; `field` names what is wrong (our name for it:
    each door maps it to its own, e.g. the HTTP API's max_tokens for max_new_tokens)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def quote(value) -> str:
    """repr(value), cut to QUOTE_CHARS: what error messages echo of a client's input."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


@dataclass(frozen=True)
class RequestLimits:
    """What the model and the serving engine can take."""
    vocab_size: int
    max_context: int  # prompt + new tokens, the model's context
    kv_tokens: int  # tokens the whole KV pool holds: one request may not need more

    @property
    def max_prompt_chars(self) -> int:
        return CHARS_PER_CONTEXT_TOKEN * self.max_context


@dataclass(frozen=True)
class Resume:
    """Where a stream stands that another router began (and lost): it goes on from here."""
    output_ids: tuple[int, ...]  # tokens the client already has, in order
    sent_chars: int  # characters of their text the client already has (a stop string's start may be held)


@dataclass(frozen=True)
class ValidRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    cache_salt: str = ""  # requests share prefix-cache blocks only under the same salt
    grammar: object = None  # a compiled grammar its answer must follow (router/structured.py)
    resume: Resume | None = None  # a continuation: the prompt's answer so far (the gateway's record)


def _check_params(p: SamplingParams, vocab_size: int) -> None:
    def bad(name: str, why: str):
        raise InvalidRequest(f"{name} {why}, got {quote(getattr(p, name))}", name)

    if not (p.temperature == 0 or MIN_TEMPERATURE <= p.temperature <= MAX_TEMPERATURE):
        bad("temperature", f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
    if not 0 < p.top_p <= 1:  # also refuses NaN
        bad("top_p", "must be in (0, 1]")
    if p.top_k < 0:
        bad("top_k", "must be >= 0 (0 disables it)")
    if not 0 <= p.min_p <= 1:
        bad("min_p", "must be in [0, 1]")
    if not MIN_PENALTY <= p.repetition_penalty <= MAX_PENALTY:
        bad("repetition_penalty", f"must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}]")
    if not -2 <= p.presence_penalty <= 2:
        bad("presence_penalty", "must be in [-2, 2]")
    if not -2 <= p.frequency_penalty <= 2:
        bad("frequency_penalty", "must be in [-2, 2]")
    if p.max_new_tokens < (0 if p.prompt_logprobs is not None else 1):
        bad("max_new_tokens", "must be >= 1 (0 only when the prompt's logprobs are asked for)")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(p.stop)} strings; at most {MAX_STOP_STRINGS}", "stop")
    for i, s in enumerate(p.stop):
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"stop_token_ids has {len(p.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}",
                             "stop_token_ids")
    bad_id = next((t for t in p.stop_token_ids if not 0 <= t < vocab_size), None)
    if bad_id is not None:
        raise InvalidRequest(f"stop_token_ids must be token ids in [0, {vocab_size}), got {quote(bad_id)}",
                             "stop_token_ids")
    if p.logprobs is not None and not 0 <= p.logprobs <= MAX_LOGPROBS:
        bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
    if p.prompt_logprobs is not None and not 0 <= p.prompt_logprobs <= MAX_LOGPROBS:
        bad("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}]")
    if p.seed is not None and not 0 <= p.seed < 2 ** 64:
        bad("seed", "must be in [0, 2**64)")
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        assert math.isfinite(getattr(p, name)), name  # the ranges above admit no inf or NaN


def validate_request(prompt_ids, params: SamplingParams, limits: RequestLimits,
                     cache_salt: str = "", grammar=None) -> ValidRequest:
    """Check a prompt and its parameters against the model and the pool; -> ValidRequest."""
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequest(f"cache_salt has {len(cache_salt)} characters; at most {MAX_CACHE_SALT_CHARS}",
                             "cache_salt")
    prompt = tuple(prompt_ids)
    if not prompt:
        raise InvalidRequest("prompt is empty", "prompt")
    if len(prompt) >= limits.max_context:
        raise InvalidRequest(f"prompt has {len(prompt)} tokens; the context is {limits.max_context}", "prompt")
    bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {quote(bad)} is outside the vocabulary [0, {limits.vocab_size})", "prompt")
    _check_params(params, limits.vocab_size)
    total = len(prompt) + params.max_new_tokens
    if total > limits.max_context:
        raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt)} tokens "
                             f"exceeds the context of {limits.max_context}", "max_new_tokens")
    if total > limits.kv_tokens:
        raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt)} tokens "
                             f"needs more KV cache than the pool holds ({limits.kv_tokens} tokens)", "max_new_tokens")
    if grammar is not None and params.ignore_eos:
        raise InvalidRequest("ignore_eos cannot go with structured output: the answer ends where its grammar "
                             "does", "ignore_eos")
    return ValidRequest(prompt, params, cache_salt, grammar)
