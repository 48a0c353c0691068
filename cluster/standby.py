"""Standby workers (--standby-workers): processes started ahead, holding no weights, so that a
recovery or a scale-up takes one instead of waiting for a process to start. The pool owns them
until `take` hands them out; it refills itself in the background, after any restore (starting a
process takes CPU and memory bandwidth from serving, and so does loading a lost worker's copies:
one after the other, neither stacks on the other).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from expertmesh.cluster.progress import progress
from expertmesh.cluster.worker_pool import WorkerHandle, stop_worker

log = logging.getLogger("expertmesh.cluster")
POLL_S = 0.1


class StandbyPool:
    def __init__(self, want: int, start: Callable[[int], list[WorkerHandle]], stopping: threading.Event,
                 restoring: Callable[[], bool]):
        self.want = want
        self._start = start  # start(n): n new worker processes holding nothing (may wait for Ray)
        self._stopping, self._restoring = stopping, restoring
        self._lock = threading.Lock()
        self._idle: list[WorkerHandle] = []
        self._filler: threading.Thread | None = None

    def handles(self) -> list[WorkerHandle]:
        with self._lock:
            return list(self._idle)

    def take(self, count_: int) -> list[WorkerHandle]:
        """Up to `count_` standby workers, now (no wait); the pool refills behind them."""
        with self._lock:
            taken, self._idle = self._idle[:count_], self._idle[count_:]
        if taken:
            progress(f"took {len(taken)} standby worker(s): no process to start")
            self.refill()
        return taken

    def put(self, handles: list[WorkerHandle]) -> None:
        """Workers that hold nothing, back to the pool (a change that did not need them)."""
        with self._lock:
            self._idle += handles

    def refill(self) -> None:
        """Back to `want` standby workers, in the background."""
        with self._lock:
            if self.want <= len(self._idle) or self._stopping.is_set():
                return
            if self._filler is not None and self._filler.is_alive():
                return
            self._filler = threading.Thread(target=self._fill, name="expertmesh-standby", daemon=True)
            self._filler.start()

    def join(self, wait_s: float) -> None:
        filler = self._filler
        if filler is not None:
            filler.join(timeout=wait_s)

    def _fill(self) -> None:
        while self._restoring() and not self._stopping.wait(POLL_S):
            pass
        try:
            while not self._stopping.is_set():
                with self._lock:
                    short = self.want - len(self._idle)
                if short <= 0:
                    return
                handles = self._start(short)
                with self._lock:
                    self._idle += handles
                if self._stopping.is_set():  # shutdown read the pool before these arrived
                    for h in handles:
                        stop_worker(h)
        except Exception as exc:  # noqa: BLE001 - no standby: adds start processes, as without one
            if not self._stopping.is_set():
                log.warning("could not start standby workers: %s", exc)
