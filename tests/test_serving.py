"""The serving engine: continuous batching, preemption, prefix caching, sampling, streaming, cancel."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.router.requests import InvalidRequest, validate_request
from expertmesh.router.sampling import RequestSampler, SamplingParams
from expertmesh.router.serving import QueueFull, ServingEngine
from tests.helpers import prompt_logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # init_std 0.1: sharper distributions than transformers' 0.02, so greedy choices are not near-ties
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve"), seed=21, init_std=0.1,
                                 hidden_size=64, intermediate_size=96, num_experts=4)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def serving(model_dir, tokenizer, kv_blocks=512, **settings) -> ServingEngine:
    return ServingEngine(Engine.local(model_dir, kv_blocks=kv_blocks), tokenizer, ServingConfig(**settings))


def submit(engine: ServingEngine, prompt: list[int], params: SamplingParams, sink) -> str:
    return engine.submit(validate_request(prompt, params, engine.limits), sink)


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks) -> str:
    return "".join(c.text for c in chunks)


@pytest.fixture(scope="module")
def engine(model_dir, tokenizer):
    serving_engine = serving(model_dir, tokenizer, max_batch_tokens=512)
    yield serving_engine
    serving_engine.shutdown()


def test_batch_invariance_greedy_and_seeded(engine):
    prompts = mixed_prompts(32)
    lengths = [5 + (i * 7) % 30 for i in range(32)]
    greedy = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for n in lengths]
    seeded = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_new_tokens=n,
                             ignore_eos=True) for i, n in enumerate(lengths)]
    for params in (greedy, seeded):
        together = engine.generate(prompts, params)
        alone = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
        assert [tokens(c) for c in together] == [tokens(c) for c in alone]
        assert [len(tokens(c)) for c in together] == lengths
    assert engine.engine.cache.free_blocks == engine.engine.cache.num_blocks


def test_preemption_with_a_small_pool_gives_the_same_outputs(model_dir, tokenizer, engine):
    prompts = mixed_prompts(12, seed=1)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    expected = [tokens(c) for c in engine.generate(prompts, params)]
    small = serving(model_dir, tokenizer, kv_blocks=12, max_batch_tokens=256)  # 192 tokens of cache
    try:
        got = [tokens(c) for c in small.generate(prompts, params)]
        assert small.scheduler.preemptions > 0
        assert got == expected
        assert small.engine.cache.free_blocks == small.engine.cache.num_blocks
    finally:
        small.shutdown()


def test_prefix_caching_skips_the_shared_prompt(model_dir, tokenizer):
    fresh = serving(model_dir, tokenizer)
    try:
        prompt = mixed_prompts(1, seed=5)[0][:1] + list(range(500, 539))  # 40 tokens, 2 full blocks + 8
        params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
        computed = []
        outputs = []
        for _ in range(2):
            chunks = fresh.generate([prompt], params)[0]
            outputs.append(tokens(chunks))
            computed.append(chunks[-1].usage.cached_prompt_tokens)
        assert computed == [0, 32]
        assert outputs[0] == outputs[1]
        # Count what the model computed: the 8 prompt tokens past the shared blocks, then one
        # position per new token but the last (which is sampled, never fed back).
        before = fresh.tokens_computed
        chunks = fresh.generate([prompt], params)[0]
        assert chunks[-1].usage.cached_prompt_tokens == 32
        assert fresh.tokens_computed - before == 8 + 9
    finally:
        fresh.shutdown()


def test_stop_string_split_across_tokens_is_never_emitted(engine, tokenizer):
    prompt = mixed_prompts(1, seed=7)[0]
    plain = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))[0]
    full, ids = text(plain), tokens(plain)
    # A stop string made of the end of token 5's text and the start of token 6's.
    piece5 = tokenizer.decode(ids[:6])[len(tokenizer.decode(ids[:5])):]
    piece6 = tokenizer.decode(ids[:7])[len(tokenizer.decode(ids[:6])):]
    assert piece5 and piece6
    stop = piece5[-2:] + piece6[:2]
    chunks = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True,
                                                      stop=(stop,)))[0]
    assert chunks[-1].finish_reason == "stop"
    assert text(chunks) == full[:full.find(stop)]
    assert all(stop not in c.text for c in chunks)


def test_streamed_deltas_concatenate_to_the_full_decode(engine, tokenizer):
    for prompt in mixed_prompts(4, seed=9):
        chunks = engine.generate([prompt], SamplingParams(temperature=0.7, seed=3, max_new_tokens=40))[0]
        whole = tokenizer.decode(prompt + tokens(chunks))
        assert text(chunks) == whole[len(tokenizer.decode(prompt)):]
        for c in chunks:
            c.text.encode("utf-8")


def test_logprobs_sum_to_the_sequence_log_likelihood(engine, model_dir):
    prompt = mixed_prompts(1, seed=11)[0]
    chunks = engine.generate([prompt], SamplingParams(temperature=0.8, seed=1, max_new_tokens=12,
                                                      logprobs=3, ignore_eos=True))[0]
    out = tokens(chunks)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in lps] == out
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= lp.top[0][1] + 1e-6
    full = prompt_logits(Engine.local(model_dir), prompt + out).log_softmax(-1)  # (n, V)
    expected = sum(full[len(prompt) - 1 + i, t].item() for i, t in enumerate(out))
    assert abs(sum(lp.logprob for lp in lps) - expected) < 1e-4


def test_penalties_and_truncation():
    logits = torch.tensor([0.0, 5.0, 4.0, 1.0])
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    # presence: once token 1 is out, a large penalty moves the argmax to token 2
    sampler = RequestSampler(SamplingParams(temperature=0, presence_penalty=2.0), [0], 4)
    assert [sampler.sample(logits)[0] for _ in range(2)] == [1, 2]
    # frequency grows with each occurrence
    sampler = RequestSampler(SamplingParams(temperature=0, frequency_penalty=0.6), [0], 4)
    assert [sampler.sample(logits)[0] for _ in range(3)] == [1, 1, 2]
    # repetition penalty covers prompt tokens too: 5 / 2 < 4
    assert RequestSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [1], 4).sample(logits)[0] == 2
    assert RequestSampler(greedy, [1], 4).sample(logits)[0] == 1
    # top_k=1, a tiny top_p or min_p=1 leave only the best token, whatever the seed
    for params in (SamplingParams(top_k=1, seed=0), SamplingParams(top_p=0.01, seed=1),
                   SamplingParams(min_p=1.0, seed=2)):
        sampler = RequestSampler(params, [0], 4)
        assert {sampler.sample(logits)[0] for _ in range(20)} == {1}


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
    ("max_new_tokens", 0), ("stop", ("",)), ("stop", ("x",) * 17), ("stop_token_ids", (40000,)),
    ("logprobs", 21), ("prompt_logprobs", 21), ("seed", -1),
])
def test_bad_parameters_are_refused_by_name(engine, field, value):
    with pytest.raises(InvalidRequest, match=field) as err:
        validate_request([1, 2, 3], SamplingParams(**{field: value}), engine.limits)
    assert err.value.field == field  # what each door maps to its own name for the field


def test_bad_prompts_are_refused(engine):
    for prompt, params, salt, message, field in (
            ([], SamplingParams(), "", "empty", "prompt"), ([1, 32000], SamplingParams(), "", "32000", "prompt"),
            ([1, 2], SamplingParams(max_new_tokens=5000), "", "max_new_tokens 5000", "max_new_tokens"),
            ([1, 2], SamplingParams(), "s" * 257, "cache_salt", "cache_salt")):
        with pytest.raises(InvalidRequest, match=message) as err:
            validate_request(prompt, params, engine.limits, salt)
        assert err.value.field == field
    with pytest.raises(AssertionError, match="validate_request"):  # below the boundary nothing re-checks
        engine.submit(([1, 2], SamplingParams()), lambda out: None)


def test_random_cancellations_leak_no_blocks(model_dir, tokenizer):
    fresh = serving(model_dir, tokenizer, kv_blocks=64, max_batch_tokens=256)
    rng = random.Random(3)
    finished = {}
    done = threading.Semaphore(0)
    try:
        ids = []
        for i, prompt in enumerate(mixed_prompts(24, seed=13)):
            def sink(out, i=i):
                if out.finish_reason:
                    finished[i] = out.finish_reason
                    done.release()
            ids.append(submit(fresh, prompt, SamplingParams(temperature=0, max_new_tokens=60, ignore_eos=True),
                              sink))
        for request_id in rng.sample(ids, 12):
            time.sleep(rng.random() * 0.05)
            fresh.cancel(request_id)
        for _ in ids:
            assert done.acquire(timeout=60)
        assert list(finished.values()).count("cancelled") >= 1
        assert set(finished.values()) <= {"cancelled", "length"}
        time.sleep(0.1)
        assert fresh.engine.cache.free_blocks == fresh.engine.cache.num_blocks
    finally:
        fresh.shutdown()


def test_full_queue_refuses_at_once_and_loses_nothing(model_dir, tokenizer):
    fresh = serving(model_dir, tokenizer, max_seqs=1, max_queue=2)
    accepted, refused = [], 0
    outs = {}
    done = threading.Semaphore(0)
    try:
        for i in range(10):
            def sink(out, i=i):
                outs.setdefault(i, []).append(out)
                if out.finish_reason:
                    done.release()
            try:
                submit(fresh, [1, 5, 6], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True), sink)
                accepted.append(i)
            except QueueFull:
                refused += 1
        assert refused > 0 and len(accepted) >= 2
        for _ in accepted:
            assert done.acquire(timeout=60)
        assert all(len(tokens(outs[i])) == 50 for i in accepted)
    finally:
        fresh.shutdown()


def test_stop_token_ids_end_a_request(engine):
    """(EOS is shown over gRPC, on a checkpoint whose EOS the greedy path reaches:
    tests/test_gateway_lifecycle.py.)"""
    prompt = mixed_prompts(1, seed=17)[0]
    out = tokens(engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))[0])
    j = next(i for i in range(1, 12) if out[i] not in out[:i])
    stopped = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(out[j],)))[0]
    assert tokens(stopped) == out[:j + 1] and stopped[-1].finish_reason == "stop"


def test_the_loop_serves_again_once_the_control_plane_mends_the_experts(model_dir, tokenizer, monkeypatch):
    """A failed step whose recovery fails: the requests in flight fail retryably, new ones are
    refused while the experts cannot serve, and the loop asks again until it can serve again."""
    from expertmesh.router import serving as serving_module
    from expertmesh.router.serving import EngineUnavailable

    monkeypatch.setattr(serving_module, "REPAIR_EVERY_S", 0.2)
    engine = Engine.local(model_dir)
    experts, state = engine.experts, {"broken": True, "fixable": False, "asked": 0}

    class Failing:  # the experts of a cluster that lost its workers
        def start(self, *args):
            if state["broken"]:
                raise RuntimeError("expert data path failed")
            return experts.start(*args)

        def finish(self, handle):
            return experts.finish(handle)

    class Control:  # the control plane: recovers off the loop's thread, commits through loop.call
        def attach(self, loop):
            self.loop = loop

        def report_failure(self, exc):
            state["asked"] += 1
            done = Future()

            def recover():
                if state["fixable"]:
                    state["mended_by_asks"] = state.get("mended_by_asks", 0) + 1

                    def commit():
                        state["commit_thread"] = threading.current_thread()
                        state["broken"] = False
                    self.loop.call(commit).result()
                done.set_result(state["fixable"])
            threading.Thread(target=recover).start()
            return done

    engine.experts = Failing()
    fresh = ServingEngine(engine, tokenizer, control=Control())
    try:
        params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
        failed = fresh.generate([[1, 5, 6]], params)[0]
        assert failed[-1].finish_reason == "error" and failed[-1].retryable
        assert not fresh.healthy
        with pytest.raises(EngineUnavailable):
            submit(fresh, [1, 5, 6], params, lambda out: None)
        state["fixable"] = True
        deadline = time.monotonic() + 10
        while not fresh.healthy:
            assert time.monotonic() < deadline, "the loop never asked again"
            time.sleep(0.05)
        assert state["mended_by_asks"] >= 1  # an ask made after the failure found it mendable
        assert state["commit_thread"] is fresh._thread  # the commit ran on the loop's own thread
        assert len(tokens(fresh.generate([[1, 5, 6]], params)[0])) == 4
    finally:
        fresh.shutdown()


def test_prompt_logprobs_over_chunked_prefill_and_a_shared_prefix(model_dir, tokenizer):
    """A 40-token prompt computed in 8-token chunks, its first blocks already in the prefix cache
    from an earlier request: each position's logprob equals one full prefill's, the top
    alternative is its argmax, and the request with max_new_tokens 0 ends with no token."""
    engine = serving(model_dir, tokenizer, max_batch_tokens=8)
    try:
        prompt = mixed_prompts(1, seed=5)[0][:1] + [100 + i for i in range(39)]
        engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=2))  # fills the prefix cache
        (chunks,) = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=0, prompt_logprobs=1))
        (only,) = chunks
        assert only.token_ids == [] and only.finish_reason == "length"
        scored = only.prompt_logprobs
        assert scored[0] is None and [lp.token_id for lp in scored[1:]] == prompt[1:]
        full = prompt_logits(engine.engine, prompt).log_softmax(-1)  # (n, V)
        want = full[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert torch.allclose(torch.tensor([lp.logprob for lp in scored[1:]]), want, atol=1e-4)
        assert [lp.top[0][0] for lp in scored[1:]] == full[:-1].argmax(-1).tolist()
        assert only.usage.cached_prompt_tokens == 0  # scored requests compute their whole prompt
        (gen,) = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=3, prompt_logprobs=0))
        assert gen[0].prompt_logprobs is not None and len(gen[0].prompt_logprobs) == len(prompt)
        assert all(out.prompt_logprobs is None for out in gen[1:]) and len(tokens(gen)) == 3
    finally:
        engine.shutdown()


def test_every_position_logits_only_for_the_sequences_that_want_them(model_dir):
    """Engine.step(all_logits=[i, ...]): those sequences get a row per computed token, the others
    their last row only, each equal to a step that computes every row for everyone."""
    from expertmesh.router.engine import Sequence

    def fresh(engine):
        seqs = [Sequence([1, 20, 21, 22, 23]), Sequence([1, 30, 31]), Sequence([1, 40, 41, 42])]
        for s in seqs:
            engine.cache.grow(s.block_table, len(s.token_ids))
        return seqs, [len(s.token_ids) for s in seqs]

    engine = Engine.local(model_dir)
    seqs, num_new = fresh(engine)
    everything = engine.step(seqs, num_new, all_logits=True)
    engine = Engine.local(model_dir)
    seqs, num_new = fresh(engine)
    some = engine.step(seqs, num_new, all_logits=[1])
    assert [t.shape[0] for t in some] == [1, 3, 1]
    assert torch.allclose(some[1], everything[1], atol=1e-5)
    for i in (0, 2):
        assert torch.allclose(some[i][0], everything[i][-1], atol=1e-5)


def test_a_call_runs_only_on_the_loops_thread_and_fails_once_the_loop_stopped(model_dir, tokenizer):
    """The engine is touched by the thread running the loop alone: a call made while no loop runs
    waits for one (it does not run on the caller's thread), and once the loop is stopped a call
    fails at once instead of waiting for ever."""
    loop = ServingEngine(Engine.local(model_dir, kv_blocks=64), tokenizer, own_thread=False)
    ran_on = []
    waiting = loop.call(lambda: ran_on.append(threading.current_thread()) or "done")
    time.sleep(0.2)
    assert not waiting.done() and ran_on == []  # no loop ran: nothing ran
    driver = threading.Thread(target=loop.run, name="the-loop")
    driver.start()
    assert waiting.result(timeout=30) == "done" and [t.name for t in ran_on] == ["the-loop"]
    loop.shutdown()
    driver.join(timeout=30)
    assert not driver.is_alive()
    with pytest.raises(RuntimeError, match="the serving loop has stopped"):
        loop.call(lambda: ran_on.append("after")).result(timeout=5)
    assert len(ran_on) == 1
