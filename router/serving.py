"""The serving engine: requests in, streamed outputs out, one loop stepping the model.

submit() and cancel() may be called from any thread; they only touch the inbox. The engine loop
(run(), on a thread of its own or on the caller's) drains the inbox at every step boundary, asks
the scheduler for the next batch, runs one model step, samples, detokenises, applies stop
conditions and hands each request its output chunk.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from cluster.tokenizer import IncrementalDetokenizer, TextTokenizer
from router.engine import Engine, Sequence
from router.sampling import InvalidRequest, RequestSampler, SamplingParams, TokenLogprobs
from router.scheduler import QueueFull, Scheduled, Scheduler

log = logging.getLogger("expertmesh.serving")

FINISH_STOP, FINISH_LENGTH, FINISH_EOS, FINISH_CANCELLED, FINISH_ERROR = (
    "stop", "length", "eos", "cancelled", "error")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass
class RequestOutput:
    """One streamed chunk of a request; the last one has finish_reason and usage."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass(eq=False)
class Request(Scheduled):
    request_id: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    sampler: RequestSampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    sink: Callable[[RequestOutput], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (stop strings not yet cut)
    emitted: int = 0  # characters of `text` already sent
    finished: bool = False


class ServingEngine:
    def __init__(self, engine: Engine, tokenizer: TextTokenizer, max_batch_tokens: int = 2048,
                 max_seqs: int = 64, max_queue: int = 1024, own_thread: bool = True,
                 engine_threads: int | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = engine.config
        self.scheduler = Scheduler(engine.cache, max_batch_tokens, max_seqs, max_queue)
        self._inbox: deque = deque()  # ("add", request) | ("cancel", request_id)
        self._wake = threading.Condition()
        self._requests: dict[str, Request] = {}  # live requests, by id (engine thread only)
        self._stopping = False
        self.healthy = True
        self.steps = 0
        self.last_prompt_tokens_computed = 0  # of the last finished request: prefix-cache checks
        # torch (OpenMP) threads of the loop. Thread counts are per calling thread, and a second
        # OpenMP team beside the one that loaded the model halved step speed on a 2-core machine;
        # so a loop on its own thread defaults to 1, and the fastest set-up runs the loop on the
        # thread that loaded the model (own_thread=False, as `expertmesh serve` does).
        self.engine_threads = engine_threads if engine_threads is not None else (1 if own_thread else None)
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="expertmesh-engine", daemon=True)
            self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[RequestOutput], None],
               request_id: str | None = None) -> str:
        """Queue a request; raises InvalidRequest or QueueFull at once instead of dropping it."""
        c = self.config
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        bad = next((t for t in prompt_ids if not 0 <= t < c.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {c.vocab_size})")
        params.validate(c.vocab_size)
        total = len(prompt_ids) + params.max_new_tokens
        if len(prompt_ids) >= c.max_position_embeddings:
            raise InvalidRequest(f"prompt has {len(prompt_ids)} tokens; the context is "
                                 f"{c.max_position_embeddings}")
        if total > c.max_position_embeddings:
            raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt_ids)} "
                                 f"tokens exceeds the context of {c.max_position_embeddings}")
        cache = self.engine.cache
        if cache.blocks_needed(total) > cache.num_blocks:
            raise InvalidRequest(f"max_new_tokens {params.max_new_tokens} with a prompt of {len(prompt_ids)} "
                                 f"tokens needs more KV cache than the pool holds "
                                 f"({cache.num_blocks * cache.block_size} tokens)")
        request = Request(seq=Sequence(list(prompt_ids)), prompt_len=len(prompt_ids),
                          request_id=request_id or uuid.uuid4().hex, params=params,
                          sampler=RequestSampler(params, prompt_ids, c.vocab_size),
                          detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids), sink=sink)
        with self._wake:
            if not self.healthy:
                raise RuntimeError("the engine is not serving (its expert path failed)")
            if len(self._inbox) + len(self.scheduler.waiting) >= self.scheduler.max_queue:
                raise QueueFull(f"queue is full ({self.scheduler.max_queue} waiting)")
            self._inbox.append(("add", request))
            self._wake.notify()
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Abort a request; its blocks return to the pool at the next step boundary."""
        with self._wake:
            self._inbox.append(("cancel", request_id))
            self._wake.notify()

    def stop(self) -> None:
        """Ask the loop to cancel what is left and return (callable from any thread)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def shutdown(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
                 timeout: float = 600) -> list[list[RequestOutput]]:
        """Submit all prompts and wait for all: each request's output chunks, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        chunks: list[list[RequestOutput]] = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(out: RequestOutput):
                chunks[i].append(out)
                if out.finish_reason is not None:
                    done.release()
            return sink

        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self.submit(prompt, p, sink_for(i))
        if self._thread is None:  # no loop of its own: drive it here until these are done
            self.run(until=lambda: all(c and c[-1].finish_reason is not None for c in chunks))
        deadline = time.monotonic() + timeout
        for _ in prompts:
            if not done.acquire(timeout=max(deadline - time.monotonic(), 0)):
                raise TimeoutError("requests did not finish in time")
        return chunks

    # ---- engine loop -------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._requests[item.request_id] = item
                self.scheduler.waiting.append(item)
            elif item in self._requests:
                self._finish(self._requests[item], FINISH_CANCELLED)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The engine loop: until stop() (or until `until()` is true)."""
        if self.engine_threads is not None:
            torch.set_num_threads(self.engine_threads)  # for this thread (OpenMP)
        while until is None or not until():
            with self._wake:
                self._drain_inbox()
                if self._stopping:
                    for request in list(self._requests.values()):
                        self._finish(request, FINISH_CANCELLED)
                    return
                if not self.scheduler.has_work():
                    self._wake.wait(timeout=0.5)
                    continue
            batch = self.scheduler.schedule()
            if not batch:
                continue
            try:
                logits = self.engine.step([r.seq for r, _ in batch], [n for _, n in batch])
            except Exception as exc:  # noqa: BLE001 - every request in flight learns why
                log.exception("step failed")
                self.healthy = False
                for request in list(self._requests.values()):
                    self._finish(request, FINISH_ERROR, error=f"{type(exc).__name__}: {exc}")
                continue
            self.steps += 1
            ready = []  # (request, row of logits) of requests whose prompt is fully computed: they sample
            for row, (request, _) in enumerate(batch):
                seq = request.seq
                self.engine.cache.name_full_blocks(seq.block_table, seq.token_ids, seq.num_cached)
                if seq.num_cached == len(seq.token_ids):
                    ready.append((request, row))
            # Plain greedy requests share one argmax over the step's logits (S, V): no row copies.
            best = logits.argmax(-1).tolist() if any(r.sampler.plain_greedy for r, _ in ready) else []
            for request, row in ready:
                if request.sampler.plain_greedy:
                    request.sampler.accept(best[row])
                    self._advance(request, best[row], None)
                else:
                    self._advance(request, *request.sampler.sample(logits[row]))

    def _advance(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """Append a sampled token: stream its text, apply the stop conditions."""
        p = request.params
        request.seq.token_ids.append(token)
        request.output_ids.append(token)
        request.text += request.detokenizer.add([token])
        finish = None
        if token == self.config.eos_token_id and not p.ignore_eos:
            finish = FINISH_EOS
        elif token in p.stop_token_ids:
            finish = FINISH_STOP
        if finish is None and len(request.output_ids) >= p.max_new_tokens:
            finish = FINISH_LENGTH
        if finish is not None:
            request.text += request.detokenizer.flush()
        end = len(request.text)
        for stop in p.stop:  # the earliest stop string wins; sent text never holds one, so look after it
            at = request.text.find(stop, request.emitted)
            if at != -1 and at < end:
                end, finish = at, FINISH_STOP
        if finish is None:
            end -= _held_back(request.text, p.stop)  # might be the start of a stop string
        delta = request.text[request.emitted:end]
        request.emitted = max(request.emitted, end)
        out = RequestOutput(request.request_id, [token], delta, [logprobs] if logprobs else [])
        if finish is not None:
            self._finish(request, finish, out)
        else:
            request.sink(out)

    def _finish(self, request: Request, reason: str, out: RequestOutput | None = None,
                error: str | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        self.last_prompt_tokens_computed = request.prompt_tokens_computed
        self.scheduler.remove(request)
        self._requests.pop(request.request_id, None)
        out = out or RequestOutput(request.request_id, [], "")
        out.finish_reason, out.error = reason, error
        out.usage = Usage(request.prompt_len, len(request.output_ids), max(request.cached_prompt_tokens, 0))
        request.sink(out)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


