"""The serving engine: requests in, streamed outputs out, one loop stepping the model.

submit(), cancel() and call() may be called from any thread; they only touch the inbox. The engine
loop (run(), on a thread of its own or on the caller's) is the only thread that touches the engine:
at every step boundary it drains the inbox (requests, cancellations, and calls: the control plane's
commits of a new epoch or plan, prepared elsewhere and applied here), asks the scheduler for the next
batch, runs one model step, hands the result to the scheduler, samples, detokenises, applies stop
conditions and hands each request its output chunk.

When the experts fail a step (a worker died or stalled), the loop reports it to the control plane
and, until the control plane's recovery ends, runs only the calls it posts (the next epoch's
commit); then it runs the same step again from its inputs.

Requests are keyed by the server (a fresh id per submit); a client's own id is only echoed back, so
no client can reach another's request by naming its id.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from expertmesh.core.heap import release_free_heap
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.core.tokenizer import IncrementalDetokenizer, TextTokenizer
from expertmesh.router.engine import Engine, Sequence
from expertmesh.router.requests import InvalidRequest, RequestLimits, ValidRequest, validate_request
from expertmesh.router.sampling import RequestSampler, SamplingParams, TokenLogprobs, position_logprobs
from expertmesh.router.scheduler import Scheduled, Scheduler
from expertmesh.router.structured import Grammars

log = logging.getLogger("expertmesh.serving")

FINISH_STOP, FINISH_LENGTH, FINISH_EOS, FINISH_CANCELLED, FINISH_ERROR = (
    "stop", "length", "eos", "cancelled", "error")
MAX_STEP_ATTEMPTS = 4  # a step's first run and three recoveries (each loses at least one worker)
REPAIR_EVERY_S = 2.0  # while the experts cannot serve, how often the loop asks the control plane again


class ControlPlane(Protocol):
    """What the loop needs of the control plane (cluster/elastic.py's ExpertCluster)."""

    def attach(self, loop: "ServingEngine") -> None:
        """The loop whose call() applies the control plane's commits from now on."""

    def report_failure(self, exc: Exception | None) -> Future:
        """The experts failed a step (exc), or cannot serve yet (None): recover off the loop's thread;
        the future resolves True once the loop can step again (its commit applied through call())."""


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the request was not accepted."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests now (its expert path failed, or it is stopping)."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass
class RequestOutput:
    """One streamed chunk of a request; the last one has finish_reason and usage."""
    request_id: str  # the client's id when it gave one, else the server's key
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None  # with FINISH_ERROR: what failed, for the client (no server internals)
    retryable: bool = False  # the failure was the cluster's (expert path), not this request's
    # with the first output, when asked for: per prompt token its logprob (None for the first)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(eq=False)
class Request(Scheduled):
    key: str = ""  # the server's id of this request
    client_id: str = ""  # echoed in every output
    params: SamplingParams = field(default_factory=SamplingParams)
    sampler: RequestSampler | None = None
    detokenizer: IncrementalDetokenizer | None = None
    sink: Callable[[RequestOutput], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # generated text so far (stop strings not yet cut)
    emitted: int = 0  # characters of `text` already sent
    finished: bool = False
    arrived: float = 0.0  # monotonic time of submit
    last_token_at: float | None = None  # monotonic time of the last token out
    first_step_at: float | None = None  # monotonic time of its first step (the end of its queueing)
    first_token_at: float | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # filled as the prompt is computed
    resumed_tokens: int = 0  # a continuation: output tokens another router produced (in prompt_len here)


class ServingEngine:
    def __init__(self, engine: Engine, tokenizer: TextTokenizer, settings: ServingConfig = DEFAULTS,
                 own_thread: bool = True, engine_threads: int | None = None, control: ControlPlane | None = None):
        self.engine = engine
        self.control = control  # None: a failed step fails the requests in flight
        self.tokenizer = tokenizer
        self.config = engine.config
        # structured output: compiled by the front door (off this loop), masks applied here
        self.grammars = Grammars(tokenizer, engine.config.vocab_size, engine.config.eos_token_id)
        self.max_queue = settings.max_queue
        self.scheduler = Scheduler(engine.cache, settings.max_batch_tokens, settings.max_seqs)
        cache = engine.cache
        self.limits = RequestLimits(self.config.vocab_size, self.config.max_position_embeddings,
                                    cache.num_blocks * cache.block_size)
        self._inbox: deque = deque()  # ("add", request) | ("cancel", key)
        self._calls: deque = deque()  # (fn, Future): run on the loop's thread between steps
        self._owner = threading.Lock()  # held by the thread running the loop
        self._wake = threading.Condition()
        self._waiting = 0  # requests in the scheduler's queue, as of the last step boundary
        self._requests: dict[str, Request] = {}  # live requests, by key (engine thread only)
        self._heap_dirty = False  # a step ran since the loop was last idle
        self._stopping = False
        self.healthy = True
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._next_repair = 0.0
        self.steps = 0
        self.failed_steps = 0  # step runs the experts failed (each then waits for a recovery)
        self.tokens_computed = 0  # token positions run through the model, all steps
        self.metrics = None  # api/metrics.py's Metrics, when the server exports them
        # called on the loop's thread once a step's outputs have all gone to their sinks
        self.outputs_done: Callable[[], None] = lambda: None
        # torch (OpenMP) threads of the loop. Thread counts are per calling thread, and a second
        # OpenMP team beside the one that loaded the model halved step speed on a 2-core machine;
        # so a loop on its own thread defaults to 1, and the fastest set-up runs the loop on the
        # thread that loaded the model (own_thread=False, as `expertmesh serve` does).
        self.engine_threads = engine_threads if engine_threads is not None else (1 if own_thread else None)
        self._thread = None
        if control is not None:
            control.attach(self)
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="expertmesh-engine", daemon=True)
            self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------

    def submit(self, valid: ValidRequest, sink: Callable[[RequestOutput], None], client_id: str = "",
               key: str | None = None) -> str:
        """Queue a request checked by validate_request; returns its key (for cancel: `key`, when the
        caller names it, else a fresh one). Raises QueueFull or EngineUnavailable at once instead of
        dropping it; a continuation its grammar refuses raises InvalidRequest."""
        assert isinstance(valid, ValidRequest), "requests are checked at the boundary (validate_request)"
        prompt_ids, params = list(valid.prompt_ids), valid.params
        key = key or uuid.uuid4().hex
        prior = valid.resume.output_ids if valid.resume is not None else ()
        # every prompt position computed here, none shared (a continuation's client has them already)
        scored = params.prompt_logprobs is not None and not prior
        constraint = None if valid.grammar is None else self.grammars.constraint(valid.grammar)
        try:
            sampler = RequestSampler(params, prompt_ids, self.config.vocab_size, constraint, prior)
        except RuntimeError as exc:  # the grammar refused a token already sent: never a silent change
            raise InvalidRequest(f"the stream cannot go on under its grammar: {exc}", "response_format") from None
        request = Request(seq=Sequence(prompt_ids + list(prior), cache_salt=valid.cache_salt),
                          prompt_len=len(prompt_ids) + len(prior), key=key,
                          share_prefix=not scored, prompt_logprobs=[None] if scored else None,
                          client_id=client_id or key, params=params, sampler=sampler,
                          detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids), sink=sink,
                          output_ids=list(prior), resumed_tokens=len(prior), arrived=time.monotonic())
        for token in prior:  # the text as the first router had it, token by token (the same deltas)
            request.text += request.detokenizer.add([token])
        request.emitted = valid.resume.sent_chars if prior else 0
        with self._wake:
            if not self.healthy or self._stopping:
                raise EngineUnavailable("the engine is not serving (its expert path failed, or it is stopping)")
            if len(self._inbox) + self._waiting >= self.max_queue:
                raise QueueFull(f"queue is full ({self.max_queue} waiting)")
            self._inbox.append(("add", request))
            self._wake.notify()
        return key

    def cancel(self, key: str) -> None:
        """Abort a request by the key submit() returned; its blocks return to the pool at the next
        step boundary."""
        with self._wake:
            self._inbox.append(("cancel", key))
            self._wake.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the loop's thread between two steps (never during one, never on another
        thread); the future holds its result. A call waits for the loop to run (a caller that may
        wait long puts a deadline on the future and cancels it); once the loop has been stopped it
        fails at once."""
        future: Future = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(RuntimeError("the serving loop has stopped"))
                return future
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def _fail_calls(self) -> None:
        """The loop is stopping: the calls it will never run fail (under _wake)."""
        while self._calls:
            _, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the serving loop has stopped"))

    def _run_calls(self) -> None:
        while True:
            with self._wake:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def stalled(self, after_s: float) -> bool:
        """A step has been running for longer than after_s (a stalled worker, a hung device): the
        loop cannot serve now, though nothing has failed yet. Callable from any thread."""
        started = self._step_started
        return started is not None and time.monotonic() - started > after_s

    def server_stats(self) -> dict:
        """Levels for GetServerStats, read from any thread (each a single read of loop-owned state)."""
        cache = self.engine.cache
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": cache.num_blocks, "kv_blocks_free": cache.free_blocks,
                "kv_block_size": cache.block_size, "preemptions": self.scheduler.preemptions,
                "steps": self.steps, "healthy": self.healthy}

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
        """Check, submit and wait for all prompts (the in-process boundary: `expertmesh run`, tests,
        benches): each request's output chunks, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        valid = [validate_request(prompt, p, self.limits) for prompt, p in zip(prompts, params)]
        chunks: list[list[RequestOutput]] = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def sink_for(i):
            def sink(out: RequestOutput):
                chunks[i].append(out)
                if out.finish_reason is not None:
                    done.release()
            return sink

        for i, request in enumerate(valid):
            self.submit(request, sink_for(i))
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
                self._requests[item.key] = item
                self.scheduler.add(item)
            elif item in self._requests:
                self._finish(self._requests[item], FINISH_CANCELLED)
        self._waiting = len(self.scheduler.waiting)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """The engine loop: until stop() (or until `until()` is true)."""
        with self._owner:
            self._loop(until)

    def _loop(self, until: Callable[[], bool] | None) -> None:
        if self.engine_threads is not None:
            torch.set_num_threads(self.engine_threads)  # for this thread (OpenMP)
        while until is None or not until():
            self.outputs_done()  # the last step's outputs (a router actor's outbox sends them on as one)
            self._run_calls()
            self._repair()
            with self._wake:
                self._drain_inbox()
                if self._stopping:
                    for request in list(self._requests.values()):
                        self._finish(request, FINISH_CANCELLED)
                    self.outputs_done()
                    self._fail_calls()
                    return
                if not self.scheduler.has_work():
                    if not self._calls:
                        self.outputs_done()  # cancellations' last outputs
                        if self._heap_dirty:  # idle: what the steps' transients left goes back to the OS
                            self._heap_dirty = False
                            release_free_heap()
                        self._wake.wait(timeout=0.5)
                    continue
            batch = self.scheduler.schedule()
            if not batch:
                continue
            self._step_started = started = time.monotonic()
            for request, _ in batch:
                if request.first_step_at is None:
                    request.first_step_at = started
                    if self.metrics is not None:
                        self.metrics.queue_time.observe(started - request.arrived)
                        # prompt tokens looked up in the prefix cache at admission, and found there
                        self.metrics.prefix_queries.inc(request.prompt_len)
                        self.metrics.prefix_hits.inc(max(request.cached_prompt_tokens, 0))
            self._heap_dirty = True
            try:
                logits = self._step(batch)
            finally:
                self._step_started = None
            if logits is None:
                continue
            if self.metrics is not None:
                self.metrics.step.observe(time.monotonic() - started)
                self.metrics.batch_tokens.observe(sum(n for _, n in batch))
            self.steps += 1
            self.tokens_computed += sum(n for _, n in batch)
            ready = self.scheduler.update_from_output(batch)
            # Plain greedy requests share one argmax over the step's logits (S, V): no row copies.
            # numpy's argmax: 3 us on a 32000-wide row against torch's 28 (same rule: the first maximum)
            best = logits.numpy().argmax(-1).tolist() if any(r.sampler.plain_greedy for r, _ in ready) else []
            for request, row in ready:
                if request.params.max_new_tokens == 0:  # scored only: the prompt's logprobs are the answer
                    self._finish(request, FINISH_LENGTH, RequestOutput(request.client_id, [], "",
                                                                       prompt_logprobs=request.prompt_logprobs))
                    continue
                try:
                    if request.sampler.plain_greedy:
                        self._advance(request, best[row], None)
                    else:
                        self._advance(request, *request.sampler.sample(logits[row]))
                except Exception as exc:  # noqa: BLE001 - one request's failure stays in that request
                    log.exception("request %s failed while sampling", request.key)
                    self._finish(request, FINISH_ERROR, error=f"sampling failed ({type(exc).__name__})")

    def _repair(self) -> None:
        """Not serving (a recovery failed, e.g. no worker could be placed): ask the control plane
        again now and then; serving again as soon as it mends the experts."""
        if self.healthy or self.control is None or time.monotonic() < self._next_repair:
            return
        self._next_repair = time.monotonic() + REPAIR_EVERY_S
        if self._await(self.control.report_failure(None)):
            log.warning("the expert path is whole again: serving")
            self.healthy = True

    def _await(self, recovery: Future) -> bool:
        """Wait for the control plane's recovery, running the calls it posts meanwhile (its commit);
        requests and cancellations wait in the inbox. True when the loop can step again."""
        recovery.add_done_callback(lambda _: self._notify())
        while not recovery.done():
            self._run_calls()
            with self._wake:
                if not self._calls and not recovery.done() and not self._stopping:
                    self._wake.wait(timeout=0.5)
            if self._stopping:
                return False
        self._run_calls()
        try:
            return bool(recovery.result())
        except Exception:  # noqa: BLE001 - a recovery that raised did not recover
            log.exception("recovery failed")
            return False

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _step(self, batch) -> torch.Tensor | None:
        """One model step; when the experts fail it, the control plane (if any) gets to mend them
        and the same step runs again from its inputs. None when it cannot: every request in flight
        then fails with the reason."""
        seqs, num_new = [r.seq for r, _ in batch], [n for _, n in batch]
        # requests whose prompt's logprobs are wanted, computing prompt tokens in this step
        scored = [i for i, (r, _) in enumerate(batch)
                  if r.prompt_logprobs is not None and len(r.prompt_logprobs) < r.prompt_len]
        failure = "unknown"
        for attempt in range(MAX_STEP_ATTEMPTS):
            try:
                if not scored:
                    return self.engine.step(seqs, num_new)
                per_seq = self.engine.step(seqs, num_new, all_logits=scored)  # [(n_i or 1, V)]
                for i in scored:
                    self._score_prompt(batch[i][0], per_seq[i])
                return torch.stack([rows[-1] for rows in per_seq])
            except Exception as exc:  # noqa: BLE001 - recovered below, or every request learns why
                log.warning("step failed (attempt %d): %s: %s", attempt + 1, type(exc).__name__, exc)
                self.failed_steps += 1
                failure = type(exc).__name__
                if (self.control is None or attempt + 1 == MAX_STEP_ATTEMPTS
                        or not self._await(self.control.report_failure(exc))):
                    log.error("step failed for good", exc_info=exc)
                    break
        self.healthy = False
        why = f"the expert path failed ({failure}: a worker died or timed out); retry later"
        for request in list(self._requests.values()):
            self._finish(request, FINISH_ERROR, error=why, retryable=True)
        return None

    def _score_prompt(self, request: Request, logits: torch.Tensor) -> None:
        """This step computed positions [c, c + n) of the request (c = seq.num_cached, not yet
        advanced); row j of logits (n, V) predicts position c + j + 1: keep the prompt's ones."""
        start = request.seq.num_cached
        first, end = len(request.prompt_logprobs), min(request.prompt_len, start + logits.shape[0] + 1)
        if first < start + 1 or first >= end:
            return  # positions already scored (a recompute after preemption), or none in this step
        tokens = request.seq.token_ids[first:end]
        request.prompt_logprobs += position_logprobs(logits[first - start - 1:end - start - 1], tokens,
                                                     request.params.prompt_logprobs)

    def _advance(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """Append a sampled token: stream its text, apply the stop conditions."""
        p = request.params
        request.seq.token_ids.append(token)
        request.output_ids.append(token)
        now = time.monotonic()
        if request.first_token_at is None:
            request.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - request.arrived)
                self.metrics.prefill_time.observe(now - (request.first_step_at or request.arrived))
        elif self.metrics is not None:
            self.metrics.itl.observe(now - request.last_token_at)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
        request.last_token_at = now
        request.text += request.detokenizer.add([token])
        finish = None
        if token == self.config.eos_token_id and not p.ignore_eos:
            finish = FINISH_EOS
        elif token in p.stop_token_ids:
            finish = FINISH_STOP
        if finish is None and request.sampler.constraint is not None and request.sampler.constraint.complete:
            finish = FINISH_STOP  # the grammar is complete (its last token was its stop token)
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
        out = RequestOutput(request.client_id, [token], delta, [logprobs] if logprobs else [],
                            prompt_logprobs=request.prompt_logprobs if len(request.output_ids) == 1 else None)
        if finish is not None:
            self._finish(request, finish, out)
        else:
            request.sink(out)

    def _finish(self, request: Request, reason: str, out: RequestOutput | None = None,
                error: str | None = None, retryable: bool = False) -> None:
        if request.finished:
            return
        request.finished = True
        if self.metrics is not None:
            m, now = self.metrics, time.monotonic()
            m.finished(reason)
            m.e2e.observe(now - request.arrived)
            m.prompt_tokens.inc(request.prompt_len - request.resumed_tokens)
            if request.first_token_at is not None:
                m.decode_time.observe(request.last_token_at - request.first_token_at)
        self.scheduler.finish(request)
        self._requests.pop(request.key, None)
        out = out or RequestOutput(request.client_id, [], "")
        out.finish_reason, out.error, out.retryable = reason, error, retryable
        out.usage = Usage(request.prompt_len - request.resumed_tokens, len(request.output_ids),
                          max(min(request.cached_prompt_tokens, request.prompt_len - request.resumed_tokens), 0))
        try:
            request.sink(out)
        except Exception:  # noqa: BLE001 - a caller that went away must not stop the loop
            log.exception("request %s: its last output could not be delivered", request.key)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


