"""Dispatch and combine: the router's side of the expert data path, over one collective group.

router -> dispatch (rows grouped by worker, then expert; replicas share an expert's rows)
       -> experts on the workers -> combine (weighted sum back on the router).
Dispatch and combine live in one object because they must agree on the row order.
Shape legend: T tokens, K experts per token, N = T*K rows, D hidden, W workers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster import wire
from cluster.config import MixtralConfig
from cluster.moe_math import combine_rows, sort_by_expert
from cluster.placement import PlacementPlan


class ExpertPathError(RuntimeError):
    """A worker was lost or timed out on the data path."""


@dataclass
class InFlight:
    works: list  # async collective handles, completed in order
    received: torch.Tensor  # (N, D) expert outputs in send order
    send_order: torch.Tensor  # (N,) position in the expert-sorted rows of each sent row
    order: torch.Tensor  # (N,) flattened (token, slot) pair of each expert-sorted row
    weights: torch.Tensor  # (T, K) gate weights
    num_tokens: int


class ExpertDispatcher:
    def __init__(self, config: MixtralConfig, plan: PlacementPlan, device: torch.device,
                 keepalive_s: float = 2.0):
        self.config = config
        self.plan = plan
        self.device = device
        self.world = plan.num_workers + 1
        self.header_size = wire.header_size(config.num_experts)
        self.rows_sent = torch.zeros(plan.num_workers, config.num_layers, config.num_experts,
                                     dtype=torch.int64)  # load statistics for the controller
        self._lock = threading.Lock()  # one message on the wire at a time
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self.broken = False  # the group failed; only tearing it down is left
        self._keepalive = threading.Thread(target=self._keep_alive, args=(keepalive_s,), daemon=True)
        self._keepalive.start()

    def _send_header(self, per_worker: torch.Tensor, async_op: bool):
        """per_worker (W, header) int64 -> one all_to_all_single of headers (router sends to itself 0s)."""
        send = torch.zeros(self.world, self.header_size, dtype=torch.int64)
        send[1:] = per_worker
        recv = torch.empty(self.world * self.header_size, dtype=torch.int64, device=self.device)
        self._last_send = time.monotonic()
        return dist.all_to_all_single(recv, send.reshape(-1).to(self.device), async_op=async_op)

    def _keep_alive(self, interval: float) -> None:
        """While the router is idle, ping the workers so their wait for the next header never times out."""
        while not self._closed.wait(interval / 2):
            if time.monotonic() - self._last_send >= interval and self._lock.acquire(blocking=False):
                try:
                    if not self._closed.is_set():
                        op = torch.full((self.world - 1, self.header_size), 0, dtype=torch.int64)
                        op[:, 0] = wire.OP_PING
                        self._send_header(op, async_op=False)
                except Exception:  # noqa: BLE001 - a broken group surfaces on the next step
                    pass
                finally:
                    self._lock.release()

    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> InFlight:
        """Send x's rows to the workers holding their experts; returns without waiting."""
        c, plan = self.config, self.plan
        k, num_experts, num_workers = c.experts_per_token, c.num_experts, plan.num_workers
        order, counts = sort_by_expert(ids, num_experts)  # (N,), (E,)
        rows = x[order // k]  # (N, D) grouped by expert
        starts = torch.cumsum(counts, 0) - counts
        # Per worker, per expert: the slice of the expert-sorted rows it serves. Replicas of an expert
        # split its rows into contiguous, nearly equal parts.
        pieces: list[list[tuple[int, int, int]]] = [[] for _ in range(num_workers)]  # (expert, start, n)
        for e, (start, count) in enumerate(zip(starts.tolist(), counts.tolist())):
            holders = plan.holders[(layer, e)]
            base, extra = divmod(count, len(holders))
            for r, w in enumerate(holders):
                n = base + (r < extra)
                if n:
                    pieces[w].append((e, start, n))
                start += n
        header = torch.zeros(num_workers, self.header_size, dtype=torch.int64)
        header[:, 0], header[:, 1] = wire.OP_LAYER, layer
        segments, split = [], [0]
        for w, items in enumerate(pieces):
            for e, start, n in items:
                header[w, 2 + e] = n
                segments.append(torch.arange(start, start + n))
            split.append(sum(n for _, _, n in items))
        self.rows_sent[:, layer] += header[:, 2:]
        send_order = (torch.cat(segments) if segments else torch.empty(0, dtype=torch.int64)).to(x.device)
        send = rows[send_order].to(self.device)  # (N, D) grouped by worker, then expert
        received = torch.empty_like(send)
        none = [0] * self.world
        with self._lock:
            works = [self._send_header(header, async_op=True),
                     dist.all_to_all_single(torch.empty(0, send.shape[1], dtype=send.dtype, device=self.device),
                                            send, none, split, async_op=True),
                     dist.all_to_all_single(received, torch.empty(0, send.shape[1], dtype=send.dtype,
                                                                  device=self.device),
                                            split, none, async_op=True)]
        return InFlight(works, received, send_order, order, weights, x.shape[0])

    def finish(self, flight: InFlight) -> torch.Tensor:
        """Wait for the experts' results and combine them: -> (T, D) fp32."""
        try:
            for work in flight.works:
                work.wait()
        except Exception as exc:  # gloo/nccl report a dead or slow peer as RuntimeError/DistBackendError
            self.broken = True
            self._closed.set()
            raise ExpertPathError(f"expert data path failed (a worker died or timed out): {exc}") from exc
        received = flight.received.to(flight.order.device)
        out = torch.empty_like(received)
        out[flight.send_order] = received  # back to expert-sorted order
        return combine_rows(out, flight.order, flight.weights, flight.num_tokens, self.config.experts_per_token)

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(layer, x, weights, ids))

    def shutdown_workers(self) -> None:
        """Tell the workers' serve loops to return (skipped when the group is already broken)."""
        self._closed.set()
        if self.broken:
            return
        with self._lock:
            op = torch.zeros(self.world - 1, self.header_size, dtype=torch.int64)
            op[:, 0] = wire.OP_SHUTDOWN
            self._send_header(op, async_op=False)
