"""Dispatch and combine: the router's side of the expert data path, over one epoch's pairs.

router -> dispatch (rows grouped by worker, then expert; replicas share an expert's rows)
       -> experts on the workers -> combine (weighted sum back on the router).
Dispatch and combine live in one object because they must agree on the row order.

A worker lost mid-step (its pair fails: it died, or was fenced for missing heartbeats) costs only
its own rows: they go again to surviving copies of their experts, the step goes on, and the
workers lost are reported (on_lost) so that the control plane replaces them off the serving path.
Only an expert with no surviving copy fails the step (ExpertPathError).
Shape legend: T tokens, K experts per token, N = T*K rows, D hidden, W workers, E experts.
"""

from __future__ import annotations

import logging
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


class ExpertPathError(RuntimeError):
    """The experts cannot serve this step: a worker was lost and some expert has no other copy."""


@dataclass
class Exchange:
    """One layer's messages in flight: rows out to the workers, their results back."""
    layer: int
    rows: torch.Tensor  # (N, D) sent, grouped by worker, then expert
    received: torch.Tensor  # (N, D) the experts' outputs, same order
    # worker -> (send/receive handles, its rows' slice of `rows`, its rows per expert (E,))
    parts: dict[int, tuple[list, slice, list[int]]] = field(default_factory=dict)
    keep: list = field(default_factory=list)  # tensors the pending sends read from


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
                 expert_rows: torch.Tensor | None = None, on_lost: Callable[[list[int]], None] | None = None):
        """pairs[w]: this epoch's process group of two with worker w (core/wire.py); holders:
        (layer, expert) -> the workers holding a copy; on_lost(workers): called (on the stepping
        thread) when workers are lost on the data path."""
        assert len(pairs) == num_workers, (len(pairs), num_workers)
        self.config = config
        self.pairs = pairs
        self.num_workers = num_workers
        self.lost: set[int] = set()  # workers whose pair failed in this epoch: no more rows for them
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

    def use_plan(self, holders: Mapping[Pair, tuple[int, ...]]) -> None:
        """Send the next step's rows by these holders (same workers; called between steps)."""
        # per layer, per expert: the live workers holding a copy
        self.holders = [[tuple(w for w in holders[(layer, e)] if w not in self.lost)
                         for e in range(self.config.num_experts)] for layer in range(self.config.num_layers)]
        self._plan = holders

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
                span, works = slice(offset, offset + n), []
                offset += n
                ex.parts[w] = (works, span, counts)
                try:
                    if self.receive_first:
                        works.append(self.pairs[w].recv([ex.received[span]], wire.WORKER_RANK, 0))
                    sends, tensors = self._send(w, wire.OP_LAYER, layer, counts, rows[span])
                    ex.keep += tensors
                    works += sends
                    if not self.receive_first:
                        works.append(self.pairs[w].recv([ex.received[span]], wire.WORKER_RANK, 0))
                except Exception as exc:  # noqa: BLE001 - a closed pair fails at once: rows go again
                    self._lose(w, exc)
        return ex

    def _collect(self, ex: Exchange) -> list[int]:
        """Wait for every worker's part of ex; returns the workers that failed it (now lost)."""
        failed = []
        for w, (works, _, _) in ex.parts.items():
            try:
                for work in works:
                    work.wait()
            except Exception as exc:  # noqa: BLE001 - gloo/nccl report a dead or slow peer so
                self._lose(w, exc)
            if w in self.lost:
                failed.append(w)
        with self._lock:
            self._pending.remove(ex)
        return failed

    def _complete(self, ex: Exchange) -> torch.Tensor:
        """ex's results (N, D), in its rows' order; rows of a worker lost on the way go again to
        surviving copies of their experts."""
        failed = self._collect(ex)
        if not failed:
            return ex.received
        e_count = self.config.num_experts
        spans = [ex.parts[w] for w in failed]
        # the failed rows' positions in ex.rows, and their experts (each worker's are by expert)
        at = torch.cat([torch.arange(span.start, span.stop) for _, span, _ in spans])
        experts = torch.cat([torch.repeat_interleave(torch.arange(e_count), torch.tensor(counts))
                             for _, _, counts in spans])
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
            self._collect(ex)
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
