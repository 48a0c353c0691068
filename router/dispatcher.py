"""Dispatch and combine: the router's side of the expert data path, over one epoch's pairs.

router -> dispatch (rows grouped by worker, then expert; replicas share an expert's rows)
       -> experts on the workers -> combine (weighted sum back on the router).
Dispatch and combine live in one object because they must agree on the row order.

A worker lost mid-step (its pair fails: it died, or was fenced for missing heartbeats) costs only
its own rows: they go again to surviving copies of their experts, the step goes on, and the
workers lost are reported (on_lost) so that the control plane replaces them off the serving path.
Only an expert with no surviving copy fails the step (ExpertPathError).

A worker whose reply is late (LATE_FACTOR times what replies of its size usually take, at least
LATE_MIN_S) is not waited for where its experts have other live copies: its rows go to those, and it
gets no rows until its late replies are in (a stopped or dying worker stalls a step by that much,
not by the seconds its death takes to show; the heartbeats still fence a stopped one). Over gloo,
each worker's replies are waited for on a thread of its own (`_ReplyWaiter`), so the stepping thread
can stop waiting without giving up the pair: gloo's timed wait closes the pair when it expires. (NCCL's
wait only orders the waiting thread's CUDA stream: it stays on the stepping thread, and a late
worker is found by heartbeats alone.)
Shape legend: T tokens, K experts per token, N = T*K rows, D hidden, W workers, E experts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from expertmesh.core import wire
from expertmesh.core.config import MixtralConfig
from expertmesh.core.moe_math import combine_rows, sort_by_expert

log = logging.getLogger("expertmesh.dispatcher")

Pair = tuple[int, int]  # (layer, expert)
Pieces = list[list[tuple[int, int, int]]]  # per worker: (expert, first row, rows), in expert order
HOST_PLAN_MAX_ROWS = 64  # up to this many rows per layer (tokens x top-k) the plan is made on the host
LATE_FACTOR = 4.0  # a reply this many times slower than usual for its size is late
LATE_MIN_S = 0.25  # and none sooner: a busy host's hiccups (here single steps of 2-3x their median)
USUAL_WEIGHT = 0.1  # an on-time reply's weight in the usual time for its size (a moving average)


class ExpertPathError(RuntimeError):
    """The experts cannot serve this step: a worker was lost and some expert has no other copy."""


@dataclass(eq=False)
class Part:
    """One worker's share of an exchange."""
    span: slice  # its rows' place in the exchange's rows
    counts: list[int]  # its rows per expert (E,)
    works: list = field(default_factory=list)  # send/receive handles
    posted: float = 0.0  # time.monotonic() when its messages went out
    done: threading.Event = field(default_factory=threading.Event)  # its works are over (error or not)
    error: Exception | None = None
    late: bool = False  # its rows went to other copies: its reply is no longer waited for


@dataclass
class Exchange:
    """One layer's messages in flight: rows out to the workers, their results back."""
    layer: int
    rows: torch.Tensor  # (N, D) sent, grouped by worker, then expert
    received: torch.Tensor  # (N, D) the experts' outputs, same order
    parts: dict[int, Part] = field(default_factory=dict)  # by worker
    keep: list = field(default_factory=list)  # tensors the pending sends read from


def _wait_out(part: Part) -> None:
    """Wait for part's works; a failure is part.error. part.done after."""
    try:
        for work in part.works:
            work.wait()
    except Exception as exc:  # noqa: BLE001 - gloo/nccl report a dead or fenced peer so
        part.error = exc
    part.done.set()


@dataclass
class ReplyRecord:
    """What the data path learns of the workers' replies; the cluster keeps one across epochs (a new
    epoch's first steps, right after a loss, are when workers are busiest)."""
    usual: dict[int, float] = field(default_factory=dict)  # a part's rows' bit length -> seconds its reply takes
    late: int = 0  # replies not waited for (their rows went to other copies), all told


class _ReplyWaiter:
    """Waits out one worker's parts in the order they were posted (its pair delivers in order), on
    a thread of its own; `answered(worker, part)` after each (on that thread)."""

    def __init__(self, worker: int, answered: Callable[[int, Part], None]):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, args=(worker, answered), name=f"expertmesh-replies-{worker}",
                         daemon=True).start()

    def put(self, part: Part | None) -> None:
        """Wait for this part next (None: no more parts; the thread ends)."""
        self._queue.put(part)

    def _run(self, worker: int, answered: Callable[[int, Part], None]) -> None:
        while (part := self._queue.get()) is not None:
            _wait_out(part)
            answered(worker, part)


@dataclass
class InFlight:
    exchange: Exchange
    pairs: torch.Tensor  # (N,) flattened (token, slot) pair of each sent row
    weights: torch.Tensor  # (T, K) gate weights
    num_tokens: int


def split_among_replicas(counts: list[int], holders: list[tuple[int, ...]], num_workers: int) -> Pieces:
    """Which rows of one layer go to which worker.

    counts[e]: rows for expert e, stored expert after expert; holders[e]: the workers holding a copy
    of expert e. Replicas of an expert split its rows into contiguous, nearly equal parts; when the
    rows do not divide evenly the odd ones go to the holders with the fewest rows so far in this
    layer (ties in holder order), so that at small batch a token's experts spread over their copies'
    workers instead of all landing on the first holders. Returns per worker its pieces (expert,
    first row, rows), in expert order; a worker with no rows gets [].
    """
    pieces: Pieces = [[] for _ in range(num_workers)]
    load = [0] * num_workers  # rows given to each worker so far in this layer
    start = 0
    for e, count in enumerate(counts):
        base, extra = divmod(count, len(holders[e]))
        favoured = set(sorted(holders[e], key=load.__getitem__)[:extra])  # a stable sort: ties in order
        for w in holders[e]:
            n = base + (w in favoured)
            if n:
                pieces[w].append((e, start, n))
                load[w] += n
            start += n
    return pieces


def piece_rows(pieces: Pieces) -> torch.Tensor:
    """The rows of `pieces` in send order (worker after worker, expert after expert): (N,) int64."""
    segments = [torch.arange(start, start + n) for items in pieces for _, start, n in items]
    return torch.cat(segments) if segments else torch.empty(0, dtype=torch.int64)


class ExpertDispatcher:
    def __init__(self, config: MixtralConfig, holders: Mapping[Pair, tuple[int, ...]], num_workers: int,
                 device: torch.device, pairs: list, backend: str, keepalive_s: float = 2.0,
                 expert_rows: torch.Tensor | None = None, on_lost: Callable[[list[int]], None] | None = None,
                 replies: ReplyRecord | None = None):
        """pairs[w]: this epoch's process group of two with worker w (core/wire.py); holders:
        (layer, expert) -> the workers holding a copy; on_lost(workers): called (on the stepping
        thread) when workers are lost on the data path; replies: what replies usually take, carried
        from the epoch before."""
        assert len(pairs) == num_workers, (len(pairs), num_workers)
        self.config = config
        self.pairs = pairs
        self.num_workers = num_workers
        self.lost: set[int] = set()  # workers whose pair failed in this epoch: no more rows for them
        self.late: set[int] = set()  # workers with a late reply still out: no rows for them meanwhile
        self._late_parts: dict[int, set[Part]] = {}  # worker -> its late parts still out
        self.replies = replies if replies is not None else ReplyRecord()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()  # late parts answered, for the stepping thread
        self.on_lost = on_lost
        self.use_plan(holders)
        self.device = device
        self.inline = wire.inlines_rows(backend)  # rows in the header's message (gloo)
        # gloo: a receive posted before the sends lets the results flow without a rendezvous. NCCL
        # runs the ops to one peer in order on one stream: a receive first would block the sends.
        self.receive_first = backend == "gloo"
        # rows routed to each (layer, expert), across epochs: the controller's load (L, E)
        self.expert_rows = expert_rows if expert_rows is not None else torch.zeros(
            config.num_layers, config.num_experts, dtype=torch.int64)
        self._lock = threading.Lock()  # one message group on the wire at a time
        self._pending: list[Exchange] = []  # exchanges posted and not yet collected
        self._last_send = [time.monotonic()] * num_workers  # a worker may sit out many layers
        self._closed = threading.Event()
        self.broken = False  # an expert has no live copy left; only tearing it down is left
        self._keepalive = threading.Thread(target=self._keep_alive, args=(keepalive_s,), daemon=True)
        self._keepalive.start()
        # gloo's waits block the host: one thread per worker waits, so that a late one can be given
        # up (see the module's docstring); NCCL's order the waiting thread's stream: the stepping thread
        self._waiters = [_ReplyWaiter(w, self._answered) for w in range(num_workers)] if backend == "gloo" else None

    def use_plan(self, holders: Mapping[Pair, tuple[int, ...]]) -> None:
        """Send the next step's rows by these holders (same workers; called between steps)."""
        # per layer, per expert: the live workers holding a copy, the late ones only where no other does
        self.holders = [[self._prompt(holders[(layer, e)]) for e in range(self.config.num_experts)]
                        for layer in range(self.config.num_layers)]
        self._plan = holders

    def _prompt(self, workers: tuple[int, ...]) -> tuple[int, ...]:
        live = tuple(w for w in workers if w not in self.lost)
        return tuple(w for w in live if w not in self.late) or live

    def _lose(self, worker: int, exc: Exception) -> None:
        """Worker's pair failed: no more rows for it in this epoch."""
        if worker in self.lost:
            return
        log.warning("the worker in place %d of this epoch was lost on the data path: %s", worker, exc)
        self.lost.add(worker)
        self.use_plan(self._plan)
        if self.on_lost is not None:
            self.on_lost([worker])

    def _send(self, worker: int, op: int, layer: int = 0, counts: list[int] | None = None,
              rows: torch.Tensor | None = None) -> tuple[list, list[torch.Tensor]]:
        """Post one message to `worker` (see core/wire.py); returns (works, tensors they read)."""
        inline = rows is not None and self.inline and rows.shape[0] <= wire.INLINE_MAX_ROWS
        head = wire.header(op, layer, inline, counts, self.config.num_experts)
        tensors = [wire.pack(head, rows)] if inline else [head.to(self.device)] + ([] if rows is None else [rows])
        self._last_send[worker] = time.monotonic()
        return [self.pairs[worker].send([t], wire.WORKER_RANK, 0) for t in tensors], tensors

    def _keep_alive(self, interval: float) -> None:
        """Ping each worker that has had no message for `interval`, so its wait never times out."""
        while not self._closed.wait(interval / 2):
            if self._lock.acquire(blocking=False):
                try:
                    idle = [w for w, t in enumerate(self._last_send)
                            if w not in self.lost and time.monotonic() - t >= interval]
                    works = [work for w in idle if not self._closed.is_set() for work in self._send(w, wire.OP_PING)[0]]
                    for work in works:
                        work.wait()
                except Exception as exc:  # noqa: BLE001 - a lost worker surfaces on the next step
                    log.warning("keep-alive ping failed (the next step will report it): %s", exc)
                finally:
                    self._lock.release()

    def _pieces(self, layer: int, counts: list[int]) -> Pieces:
        """Split a layer's rows (counts per expert) among the live copies of their experts."""
        holders = self.holders[layer]
        uncovered = [e for e, n in enumerate(counts) if n and not holders[e]]
        if uncovered:
            raise self._fail(f"workers {sorted(self.lost)} lost and expert ({layer}, {uncovered[0]}) has "
                             "no other copy")
        return split_among_replicas(counts, holders, self.num_workers)

    def _exchange(self, layer: int, rows: torch.Tensor, pieces: Pieces) -> Exchange:
        """Post each worker's rows (`rows` in pieces' send order) and a receive for its results."""
        ex = Exchange(layer, rows, torch.empty_like(rows), keep=[rows])
        offset = 0
        with self._lock:
            self._pending.append(ex)
            for w, items in enumerate(pieces):
                n = sum(n for _, _, n in items)
                if not n:
                    continue  # nothing for this worker in this layer: no message at all
                counts = [0] * self.config.num_experts
                for e, _, m in items:
                    counts[e] = m
                part = ex.parts[w] = Part(slice(offset, offset + n), counts, posted=time.monotonic())
                offset += n
                try:
                    if self.receive_first:
                        part.works.append(self.pairs[w].recv([ex.received[part.span]], wire.WORKER_RANK, 0))
                    sends, tensors = self._send(w, wire.OP_LAYER, layer, counts, rows[part.span])
                    ex.keep += tensors
                    part.works += sends
                    if not self.receive_first:
                        part.works.append(self.pairs[w].recv([ex.received[part.span]], wire.WORKER_RANK, 0))
                except Exception as exc:  # noqa: BLE001 - a closed pair fails at once: rows go again
                    part.error = exc
                    self._lose(w, exc)
                if self._waiters is not None:
                    self._waiters[w].put(part)
        return ex

    def _answered(self, worker: int, part: Part) -> None:
        """(On worker's replies thread.) An on-time reply updates the usual time for its size; a
        late one goes to the stepping thread (`_catch_up`)."""
        if part.late:
            self._answers.put((worker, part))
        elif part.error is None:
            seconds, size = time.monotonic() - part.posted, (part.span.stop - part.span.start).bit_length()
            usual = self.replies.usual.get(size)
            self.replies.usual[size] = seconds if usual is None else usual + USUAL_WEIGHT * (seconds - usual)

    def _catch_up(self) -> None:
        """Late replies that came in: a worker with none left out gets rows again; a failed one is lost."""
        back = False
        while True:
            try:
                w, part = self._answers.get_nowait()
            except queue.Empty:
                break
            self._late_parts.get(w, set()).discard(part)
            if part.error is not None:
                self._lose(w, part.error)
            elif w in self.late and not self._late_parts.get(w):
                log.warning("the worker in place %d of this epoch answered again: rows go to it again", w)
                self.late.discard(w)
                back = True
        if back:
            self.use_plan(self._plan)

    def _deadline(self, part: Part) -> float | None:
        """When part's reply is late, from the usual time of replies its size or (not yet known) the
        next larger size known; None while neither is known."""
        size = (part.span.stop - part.span.start).bit_length()
        known = [seconds for at, seconds in list(self.replies.usual.items()) if at >= size]
        usual = self.replies.usual.get(size, min(known, default=None))
        return None if usual is None else part.posted + max(LATE_MIN_S, LATE_FACTOR * usual)

    def _give_up_on(self, worker: int, layer: int, part: Part) -> bool:
        """part's reply missed its deadline: True (the worker is late, its rows go again) where every
        expert it has rows of has another live copy and the reply is still out; else False (wait)."""
        if any(n and not [h for h in self.holders[layer][e] if h != worker and h not in self.late]
               for e, n in enumerate(part.counts)):
            return False
        part.late = True
        if part.done.is_set():  # came in meanwhile: take it (_answered may have queued it too: harmless)
            part.late = False
            return False
        self._late_parts.setdefault(worker, set()).add(part)
        self.replies.late += 1
        if worker not in self.late:
            log.warning("the worker in place %d of this epoch is late (%.2fs for %d rows): its rows go to other "
                        "copies until it answers", worker, time.monotonic() - part.posted, sum(part.counts))
            self.late.add(worker)
            self.use_plan(self._plan)
        return True

    def _collect(self, ex: Exchange, give_up: bool = True) -> list[int]:
        """Wait for every worker's part of ex; returns the workers whose rows must go again: those that
        failed it (now lost) and, with give_up, those late where their experts have other copies."""
        for part in ex.parts.values() if self._waiters is None else ():
            _wait_out(part)
        deadlines = {w: self._deadline(part) for w, part in ex.parts.items()} if give_up else {}
        late = []  # earliest deadline first: no part's wait delays the check of one due sooner
        for w in sorted((w for w, at in deadlines.items() if at is not None), key=deadlines.__getitem__):
            part = ex.parts[w]
            if not part.done.wait(max(0.0, deadlines[w] - time.monotonic())) and self._give_up_on(w, ex.layer, part):
                late.append(w)
        again = list(late)
        for w, part in ex.parts.items():
            if w in late:
                continue
            part.done.wait()  # gloo's or NCCL's own timeout ends a wait on a peer that never answers
            if part.error is not None:
                self._lose(w, part.error)
            if w in self.lost:
                again.append(w)
        with self._lock:
            self._pending.remove(ex)
        return again

    def _complete(self, ex: Exchange) -> torch.Tensor:
        """ex's results (N, D), in its rows' order; rows of a worker lost on the way go again to
        surviving copies of their experts."""
        failed = self._collect(ex)
        if not failed:
            return ex.received
        if any(ex.parts[w].late for w in failed):  # its reply may still land in ex.received: use a copy
            ex.received = ex.received.clone()
        e_count = self.config.num_experts
        parts = [ex.parts[w] for w in failed]
        # the failed rows' positions in ex.rows, and their experts (each worker's are by expert)
        at = torch.cat([torch.arange(part.span.start, part.span.stop) for part in parts])
        experts = torch.cat([torch.repeat_interleave(torch.arange(e_count), torch.tensor(part.counts))
                             for part in parts])
        at = at[torch.argsort(experts, stable=True)]  # grouped by expert, as split_among_replicas wants
        pieces = self._pieces(ex.layer, torch.bincount(experts, minlength=e_count).tolist())
        take = at[piece_rows(pieces)].to(ex.rows.device)
        again = self._exchange(ex.layer, ex.rows.index_select(0, take), pieces)
        ex.received.index_copy_(0, take, self._complete(again))
        return ex.received

    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> InFlight:
        """Send x's rows to the workers holding their experts; returns without waiting."""
        c = self.config
        k, num_experts = c.experts_per_token, c.num_experts
        assert x.dim() == 2 and x.shape[1] == c.hidden_size, x.shape  # (T, D)
        assert weights.shape == ids.shape == (x.shape[0], k), (weights.shape, ids.shape)  # (T, K)
        self._catch_up()
        if x.device.type == "cpu" and ids.numel() <= HOST_PLAN_MAX_ROWS:
            # A few rows (decode at small batch): sorted and planned on the host, where a handful of
            # tensor ops would cost more than the rows themselves.
            flat = ids.reshape(-1).tolist()
            order_list = sorted(range(len(flat)), key=flat.__getitem__)  # stable, as argsort's
            counts_list = [0] * num_experts
            for e in flat:
                counts_list[e] += 1
            counts = torch.tensor(counts_list)
        else:
            order, counts = sort_by_expert(ids, num_experts)  # (N,), (E,)
            counts_list = counts.tolist()  # (E,) on the host, for the plan of the messages
            order_list = None
        pieces = self._pieces(layer, counts_list)
        self.expert_rows[layer] += counts.cpu()
        if order_list is not None:
            pairs = torch.tensor([order_list[row] for items in pieces for _, start, n in items
                                  for row in range(start, start + n)], dtype=torch.int64)
        else:
            pairs = order[piece_rows(pieces).to(x.device)]
        # pairs (N,): the flattened (token, slot) of each row, grouped by worker, then expert
        send = x.index_select(0, pairs // k).to(self.device)  # (N, D)
        return InFlight(self._exchange(layer, send, pieces), pairs, weights, x.shape[0])

    def _fail(self, why: str) -> ExpertPathError:
        """The step cannot go on: wait out every exchange still posted (no receive may be left
        pointing at a buffer that goes away), then report."""
        self.broken = True
        self._closed.set()
        for ex in list(self._pending):
            self._collect(ex, give_up=False)
        for waiter in self._waiters or []:
            waiter.put(None)
        return ExpertPathError(f"expert data path failed: {why}")

    def finish(self, flight: InFlight) -> torch.Tensor:
        """Wait for the experts' results and combine them: -> (T, D) fp32."""
        received = self._complete(flight.exchange).to(flight.pairs.device)
        assert received.shape == (flight.pairs.shape[0], self.config.hidden_size), received.shape  # (N, D)
        return combine_rows(received, flight.pairs, flight.weights, flight.num_tokens, self.config.experts_per_token)

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, x, weights, ids))

    def end_epoch(self, next_epoch: int | None, moving: set[int] = frozenset()) -> list[int]:
        """The last messages of this epoch: OP_SWITCH to `next_epoch` for the workers in `moving`,
        OP_SHUTDOWN for the others (next_epoch None: all leave). Best effort: a worker that is gone
        is skipped. Returns the workers that could not be told."""
        self._closed.set()
        for w, parts in self._late_parts.items():
            for part in parts if next_epoch is not None and w in moving else ():
                # its reply must be sent before its old pair closes; a worker leaving (or fenced:
                # killed, its sockets closing only once its memory is freed) is not waited for
                part.done.wait()
        for waiter in self._waiters or []:
            waiter.put(None)
        failed = sorted(self.lost)
        with self._lock:  # after this no keep-alive ping is in flight
            sent = []
            for w in range(self.num_workers):
                if w in self.lost:
                    continue
                switch = next_epoch is not None and w in moving
                try:
                    sent.append((w, self._send(w, wire.OP_SWITCH if switch else wire.OP_SHUTDOWN,
                                               next_epoch if switch else 0)[0]))
                except Exception:  # noqa: BLE001 - a dead worker's connection is closed
                    failed.append(w)
            for w, works in sent:
                try:
                    for work in works:
                        work.wait()
                except Exception:  # noqa: BLE001
                    failed.append(w)
        return sorted(failed)

    def shutdown_workers(self) -> None:
        """Tell the workers' serve loops to return."""
        self.end_epoch(None)
