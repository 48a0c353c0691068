"""A stream continued from its emitted tokens (what the gateway does when a router is lost) goes on
exactly as it would have: same tokens for greedy and seeded sampling, stop strings, logprobs and
grammars; the text holds no repeat and no gap; usage counts the request once."""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import replace

import pytest

from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.router.requests import InvalidRequest, Resume, validate_request
from expertmesh.router.sampling import SamplingParams, draw_seed
from expertmesh.router.serving import ServingEngine
from expertmesh.router.structured import StructureSpec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("continue"), seed=21, init_std=0.1,
                                 hidden_size=64, intermediate_size=96, num_experts=4)


@pytest.fixture(scope="module")
def engines(model_dir):
    """Two engines, as two routers: the stream begins on one and goes on on the other."""
    tokenizer = load_tokenizer(model_dir)
    pair = [ServingEngine(Engine.local(model_dir, kv_blocks=256), tokenizer, ServingConfig()) for _ in range(2)]
    yield pair
    for e in pair:
        e.shutdown()


def run(engine: ServingEngine, valid, timeout: float = 120):
    done, chunks = [], []

    def sink(out):
        chunks.append(out)
        if out.finish_reason is not None:
            done.append(True)

    engine.submit(valid, sink)
    import time
    deadline = time.monotonic() + timeout
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done, "the request did not finish"
    return chunks


def tokens(chunks):
    return [t for c in chunks for t in c.token_ids]


def text(chunks):
    return "".join(c.text for c in chunks)


def prompts(n: int):
    rng = random.Random(3)
    return [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


CASES = {
    "greedy": SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True),
    "seeded": SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=11, max_new_tokens=24, ignore_eos=True),
    "seeded penalties and logprobs": SamplingParams(temperature=1.2, seed=5, max_new_tokens=24, ignore_eos=True,
                                                    frequency_penalty=0.8, presence_penalty=0.5, logprobs=2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cut", [1, 7, 23])
def test_a_continuation_gives_the_tokens_and_text_of_the_whole_run(engines, name, cut):
    first, second = engines
    for prompt in prompts(3):
        valid = validate_request(prompt, CASES[name], first.limits)
        whole = run(first, valid)
        assert len(tokens(whole)) == 24
        head = whole[:cut]  # what the client had when the router was lost
        resumed = replace(valid, resume=Resume(tuple(tokens(head)), len(text(head))))
        rest = run(second, resumed)
        assert tokens(head) + tokens(rest) == tokens(whole)
        assert text(head) + text(rest) == text(whole)  # no repeat, no gap
        # the continuation's first position is prefilled where the whole run decoded it: logprobs
        # agree to fp32 rounding (docs/architecture.md), the tokens exactly
        got, want = [lp for c in head + rest for lp in c.logprobs], [lp for c in whole for lp in c.logprobs]
        assert [(g.token_id, [t for t, _ in g.top]) for g in got] == [(w.token_id, [t for t, _ in w.top]) for w in want]
        assert all(abs(g.logprob - w.logprob) < 1e-4 for g, w in zip(got, want))
        assert rest[-1].usage.prompt_tokens == whole[-1].usage.prompt_tokens == len(prompt)
        assert rest[-1].usage.completion_tokens == 24
        assert rest[-1].finish_reason == whole[-1].finish_reason


def test_a_stop_string_held_back_when_the_router_was_lost_still_stops_the_stream(engines, model_dir):
    first, second = engines
    tokenizer = load_tokenizer(model_dir)
    prompt = prompts(1)[0]
    plain = run(first, validate_request(prompt, CASES["greedy"], first.limits))
    ids = tokens(plain)
    # A stop string over the end of token 5's text and the start of token 6's: after token 5 the
    # router holds back what might begin it; the loss comes right then.
    piece5 = tokenizer.decode(prompt + ids[:6])[len(tokenizer.decode(prompt + ids[:5])):]
    piece6 = tokenizer.decode(prompt + ids[:7])[len(tokenizer.decode(prompt + ids[:6])):]
    assert piece5 and piece6
    stop = piece5[-2:] + piece6[:2]
    valid = validate_request(prompt, replace(CASES["greedy"], stop=(stop,)), first.limits)
    whole = run(first, valid)
    assert whole[-1].finish_reason == "stop"
    head = whole[:6]
    assert not text(head).endswith(piece5[-2:])  # held back, as it might be a stop string's start
    rest = run(second, replace(valid, resume=Resume(tuple(tokens(head)), len(text(head)))))
    assert text(head) + text(rest) == text(whole)
    assert rest[-1].finish_reason == "stop"


def test_a_grammar_goes_on_from_the_emitted_tokens_and_crosses_processes_as_its_spec(engines):
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar (expertmesh[structured])")
    first, second = engines
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
              "required": ["a", "b"]}
    compiled = first.grammars.compile(StructureSpec("json_schema", json.dumps(schema)))
    shipped = pickle.loads(pickle.dumps(compiled))  # as a router in another process receives it
    assert shipped.grammar is None and shipped.spec == compiled.spec
    params = SamplingParams(temperature=0.8, seed=9, max_new_tokens=60)
    valid = validate_request(prompts(1)[0], params, first.limits, grammar=compiled)
    whole = run(first, valid)
    json.loads(text(whole))
    head = whole[:4]
    rest = run(second, replace(valid, grammar=shipped, resume=Resume(tuple(tokens(head)), len(text(head)))))
    assert tokens(head) + tokens(rest) == tokens(whole)
    # Tokens the grammar cannot have produced: refused by name, never a silent change of output.
    bad = replace(valid, resume=Resume((tokens(whole)[0], 2, 2), 0))
    with pytest.raises(InvalidRequest, match="grammar"):
        second.submit(bad, lambda out: None)


def test_seeded_draws_are_keyed_by_seed_and_position():
    seeds = {draw_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2 ** 63 for s in seeds)
    assert draw_seed(2 ** 64 - 1, 10 ** 6) == draw_seed(2 ** 64 - 1, 10 ** 6)
