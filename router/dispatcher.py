"""Dispatch and combine: the router's side of the expert data path, over one epoch's group.

router -> dispatch (rows grouped by worker, then expert; replicas share an expert's rows)
       -> experts on the workers -> combine (weighted sum back on the router).
Dispatch and combine live in one object because they must agree on the row order.
Shape legend: T tokens, K experts per token, N = T*K rows, D hidden, W workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from expertmesh.core import wire
from expertmesh.core.config import MixtralConfig
from expertmesh.core.moe_math import combine_rows, sort_by_expert

log = logging.getLogger("expertmesh.dispatcher")

Pair = tuple[int, int]  # (layer, expert)
HOST_PLAN_MAX_ROWS = 64  # up to this many rows per layer (tokens x top-k) the plan is made on the host


class ExpertPathError(RuntimeError):
    """A worker was lost or timed out on the data path."""


@dataclass
class InFlight:
    works: list  # async send/recv handles, completed in order
    keep: list  # tensors the pending sends read from, alive until they complete
    received: torch.Tensor  # (N, D) expert outputs in send order
    pairs: torch.Tensor  # (N,) flattened (token, slot) pair of each sent row
    weights: torch.Tensor  # (T, K) gate weights
    num_tokens: int


def split_among_replicas(counts: list[int], holders: list[tuple[int, ...]],
                         num_workers: int) -> list[list[tuple[int, int, int]]]:
    """Which rows of one layer go to which worker.

    counts[e]: rows for expert e, stored expert after expert; holders[e]: the workers holding a copy
    of expert e. Replicas of an expert split its rows into contiguous, nearly equal parts; when the
    rows do not divide evenly the odd ones go to the holders with the fewest rows so far in this
    layer (ties in holder order), so that at small batch a token's experts spread over their copies'
    workers instead of all landing on the first holders. Returns per worker its pieces (expert,
    first row, rows), in expert order; a worker with no rows gets [].
    """
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(num_workers)]
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


class ExpertDispatcher:
    def __init__(self, config: MixtralConfig, holders: Mapping[Pair, tuple[int, ...]], num_workers: int,
                 device: torch.device, group, backend: str, keepalive_s: float = 2.0,
                 expert_rows: torch.Tensor | None = None):
        """group: this epoch's process group (core/wire.py), the router its rank 0 and worker w its
        rank w + 1; holders: (layer, expert) -> the workers holding a copy."""
        self.config = config
        self.group = group
        self.num_workers = num_workers
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
        self._last_send = [time.monotonic()] * num_workers  # a worker may sit out many layers
        self._closed = threading.Event()
        self.broken = False  # the group failed; only tearing it down is left
        self._keepalive = threading.Thread(target=self._keep_alive, args=(keepalive_s,), daemon=True)
        self._keepalive.start()

    def use_plan(self, holders: Mapping[Pair, tuple[int, ...]]) -> None:
        """Send the next step's rows by these holders (same workers; called between steps)."""
        # per layer, per expert: the workers holding a copy (worker w is collective rank w + 1)
        self.holders = [[tuple(holders[(layer, e)]) for e in range(self.config.num_experts)]
                        for layer in range(self.config.num_layers)]

    def _send(self, worker: int, op: int, layer: int = 0, counts: list[int] | None = None,
              rows: torch.Tensor | None = None) -> tuple[list, list[torch.Tensor]]:
        """Post one message to `worker` (see core/wire.py); returns (works, tensors they read)."""
        inline = rows is not None and self.inline and rows.shape[0] <= wire.INLINE_MAX_ROWS
        head = wire.header(op, layer, inline, counts, self.config.num_experts)
        tensors = [wire.pack(head, rows)] if inline else [head.to(self.device)] + ([] if rows is None else [rows])
        self._last_send[worker] = time.monotonic()
        return [self.group.send([t], wire.worker_rank(worker), 0) for t in tensors], tensors

    def _keep_alive(self, interval: float) -> None:
        """Ping each worker that has had no message for `interval`, so its wait never times out."""
        while not self._closed.wait(interval / 2):
            if self._lock.acquire(blocking=False):
                try:
                    idle = [w for w, t in enumerate(self._last_send) if time.monotonic() - t >= interval]
                    works = [work for w in idle if not self._closed.is_set() for work in self._send(w, wire.OP_PING)[0]]
                    for work in works:
                        work.wait()
                except Exception as exc:  # noqa: BLE001 - a broken group surfaces on the next step
                    log.warning("keep-alive ping failed (the next step will report it): %s", exc)
                finally:
                    self._lock.release()

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
        pieces = split_among_replicas(counts_list, self.holders[layer], self.num_workers)
        per_worker = [[0] * num_experts for _ in range(self.num_workers)]  # the headers' counts
        positions, split = [], []
        for w, items in enumerate(pieces):
            for e, start, n in items:
                per_worker[w][e] = n
                positions.append(range(start, start + n))
            split.append(sum(n for _, _, n in items))
        self.expert_rows[layer] += counts.cpu()
        if order_list is not None:
            pairs = torch.tensor([order_list[p] for r in positions for p in r], dtype=torch.int64)
        else:
            segments = [torch.arange(r.start, r.stop) for r in positions]
            positions_t = torch.cat(segments) if segments else torch.empty(0, dtype=torch.int64)
            pairs = order[positions_t.to(x.device)]
        # pairs (N,): the flattened (token, slot) of each row, grouped by worker, then expert
        send = x.index_select(0, pairs // k).to(self.device)  # (N, D)
        received = torch.empty_like(send)
        works, keep = [], [send]
        with self._lock:
            try:
                for w, (items, part, back) in enumerate(zip(pieces, send.split(split), received.split(split))):
                    if not items:
                        continue  # nothing for this worker in this layer: no message at all
                    if self.receive_first:
                        works.append(self.group.recv([back], wire.worker_rank(w), 0))
                    sends, tensors = self._send(w, wire.OP_LAYER, layer, per_worker[w], part)
                    keep += tensors
                    works += sends
                    if not self.receive_first:
                        works.append(self.group.recv([back], wire.worker_rank(w), 0))
            except Exception as exc:  # a closed connection can fail the send at once
                raise self._lost(exc) from exc
        return InFlight(works, keep, received, pairs, weights, x.shape[0])

    def _lost(self, exc: Exception) -> ExpertPathError:
        self.broken = True
        self._closed.set()
        return ExpertPathError(f"expert data path failed (a worker died or timed out): {exc}")

    def finish(self, flight: InFlight) -> torch.Tensor:
        """Wait for the experts' results and combine them: -> (T, D) fp32."""
        try:
            for work in flight.works:
                work.wait()
        except Exception as exc:  # gloo/nccl report a dead or slow peer as RuntimeError/DistBackendError
            raise self._lost(exc) from exc
        received = flight.received.to(flight.pairs.device)
        assert received.shape == (flight.pairs.shape[0], self.config.hidden_size), received.shape  # (N, D)
        return combine_rows(received, flight.pairs, flight.weights, flight.num_tokens, self.config.experts_per_token)

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, x, weights, ids))

    def end_epoch(self, next_epoch: int | None, moving: set[int] = frozenset()) -> list[int]:
        """The last messages of this epoch: OP_SWITCH to `next_epoch` for the workers in `moving`,
        OP_SHUTDOWN for the others (next_epoch None: all leave). Best effort: a worker that is gone
        is skipped. Returns the workers that could not be told."""
        self._closed.set()
        failed = []
        with self._lock:  # after this no keep-alive ping is in flight
            sent = []
            for w in range(self.num_workers):
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
        """Tell the workers' serve loops to return (skipped when the group is already broken)."""
        if not self.broken:
            self.end_epoch(None)
        else:
            self._closed.set()
