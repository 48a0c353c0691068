"""The heartbeat monitor: it finds workers that are dead or stalled and says so, once per worker,
through `on_lost([(handle, why), ...])`. It only emits events: fencing and recovery belong to whoever
listens (cluster/elastic.py), and it reads the workers through `members()`, never the record's
internals.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray

from expertmesh.cluster.worker_pool import WorkerHandle

MAX_OUTSTANDING = 4  # heartbeats in flight to one worker: a stalled worker's queue need not grow without end


class HeartbeatMonitor:
    """A worker that has answered no heartbeat sent in the last `timeout_s`, or whose process is
    gone, is reported lost. Heartbeats go out every timeout_s / 8 whether or not the last came
    back, so a stall is found within timeout_s + timeout_s / 8 of its start."""

    def __init__(self, members: Callable[[], tuple[WorkerHandle, ...]], timeout_s: float,
                 on_lost: Callable[[list[tuple[WorkerHandle, str]]], None]):
        self._members, self._timeout_s, self._on_lost = members, timeout_s, on_lost
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="expertmesh-heartbeats", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = 2.0) -> None:
        self._stopping.set()
        self._thread.join(timeout=wait_s)

    def _watch(self) -> None:
        timeout = self._timeout_s
        sent: dict[int, list] = {}  # worker id -> [(heartbeat ObjectRef, sent at)] not answered yet
        alive_at: dict[int, float] = {}  # worker id -> send time of its latest answered heartbeat
        reported: set[int] = set()  # said lost once: never again
        while not self._stopping.wait(timeout / 8):
            now, lost = time.monotonic(), []
            for h in self._members():
                if h.worker in reported:
                    continue
                alive_at.setdefault(h.worker, now)
                outstanding = []
                for ref, at in sent.get(h.worker, []):
                    if not ray.wait([ref], timeout=0)[0]:
                        outstanding.append((ref, at))
                        continue
                    try:
                        ray.get(ref)
                        alive_at[h.worker] = max(alive_at[h.worker], at)
                    except Exception:  # noqa: BLE001 - RayActorError and kin: dead
                        lost.append((h, "its process is gone"))
                        break
                else:
                    if now - alive_at[h.worker] > timeout:
                        lost.append((h, f"no heartbeat answered for {now - alive_at[h.worker]:.1f}s"))
                    elif len(outstanding) < MAX_OUTSTANDING:
                        outstanding.append((h.actor.heartbeat.remote(), now))
                sent[h.worker] = outstanding
            # a worker retired meanwhile (stopped on purpose) is no loss
            members = {h.worker for h in self._members()}
            for worker in set(sent) - members:
                del sent[worker], alive_at[worker]
            lost = [(h, why) for h, why in lost if h.worker in members]
            if lost and not self._stopping.is_set():
                reported.update(h.worker for h, _ in lost)
                self._on_lost(lost)  # all found in this round at once: one recovery for them
