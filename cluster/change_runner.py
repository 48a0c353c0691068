"""The change runner: one control thread runs every change of the placement record, one at a time,
in order (recoveries, planned changes, restores, routers joining). It alone holds the record's
writer and hands it to the change it runs, so nothing else can write the record.

Requests come in three kinds: `run` (wait for the result), `post` (queue, do not wait) and
`ask_recovery` (losses reported; at most one recovery waits in the queue, and it sees every loss
reported before it starts). A change in preparation polls `wait`, which gives way as soon as a
recovery is asked for or the cluster stops: a loss is never queued behind a slow planned change.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import ray

from expertmesh.cluster.record import PlacementRecord

log = logging.getLogger("expertmesh.cluster")
POLL_S = 0.1  # how often a long wait on workers looks whether it should give way
STOP_WAIT_S = 5.0  # how long stopping waits for the change that is running to give way


class ChangeInterrupted(RuntimeError):
    """A worker was lost (or the cluster is stopping) while a change was prepared; it was not applied."""


class ChangeRunner:
    def __init__(self, record: PlacementRecord):
        self.record = record  # the readers' side, for everyone
        self._writer = record.writer()  # only ever passed to the change running on the control thread
        self.stopping = threading.Event()  # shutdown: nothing may start a worker any more
        self.interrupt = threading.Event()  # a recovery waits: a change in preparation gives way
        self._control = ThreadPoolExecutor(1, thread_name_prefix="expertmesh-control")
        self._lock = threading.Lock()  # _recovery and _lost
        self._recovery: Future | None = None  # the recovery asked for and not yet done
        self._lost: set[int] = set()  # worker ids reported lost (ids are never reused)

    def run(self, change: Callable, *args) -> object:
        """change(writer, *args) on the control thread; its result (or exception) here."""
        return self._submit(change, *args).result()

    def post(self, change: Callable, *args) -> Future:
        """change(writer, *args) queued behind what is there; not waited for."""
        return self._submit(change, *args)

    def _submit(self, change: Callable, *args) -> Future:
        if self.stopping.is_set():
            raise ChangeInterrupted("the cluster is stopping")
        return self._control.submit(change, self._writer, *args)

    def ask_recovery(self, recover: Callable, lost: list[int] = ()) -> Future:
        """Queue recover(writer) unless one is queued and not started (it will see `lost` too);
        one that is running may have read the losses already, so a loss reported meanwhile gets a
        recovery of its own. The future resolves to recover's result (False once stopping)."""
        with self._lock:
            self._lost.update(lost)
            if self.stopping.is_set():
                stopped: Future = Future()
                stopped.set_result(False)
                return stopped
            if self._recovery is None or self._recovery.running():
                self.interrupt.set()  # a change in preparation gives way to it
                self._recovery = self._control.submit(self._recover, recover)
            return self._recovery

    def _recover(self, recover: Callable) -> object:
        try:
            return recover(self._writer)
        finally:
            with self._lock:
                if self._recovery is not None and self._recovery.running():  # this one; a queued one stays
                    self._recovery = None
                    self.interrupt.clear()

    def lost(self) -> set[int]:
        """Every worker id reported lost so far."""
        with self._lock:
            return set(self._lost)

    def recovering(self) -> bool:
        """A recovery is asked for and not done."""
        with self._lock:
            return self._recovery is not None

    def wait(self, refs: list, what: str, deadline_s: float) -> list:
        """ray.get(refs), giving way when a recovery is asked for or the cluster stops, and giving
        up after deadline_s."""
        pending, give_up = list(refs), time.monotonic() + deadline_s
        while pending:
            if self.interrupt.is_set() or self.stopping.is_set():
                raise ChangeInterrupted(f"{what}: a worker was lost meanwhile (or the cluster is stopping)")
            if time.monotonic() > give_up:
                raise ChangeInterrupted(f"{what}: not done within {deadline_s:.0f}s")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
        return ray.get(refs)

    def stop(self) -> None:
        """No change starts from now on; the one running gives way (it polls `wait`)."""
        with self._lock:
            self.stopping.set()
            self.interrupt.set()
        try:
            self._control.submit(lambda: None).result(timeout=STOP_WAIT_S)
        except (FutureTimeout, RuntimeError):
            log.warning("a change was still running at shutdown")
        self._control.shutdown(wait=False, cancel_futures=True)
