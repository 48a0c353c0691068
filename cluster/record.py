"""The placement record: which workers serve, in which epoch, holding what (the plan). One writer
by construction: `RecordWriter` is made once, by the change runner (cluster/change_runner.py), and
handed only to the change running on its thread; everyone else reads `Placement` snapshots.

Every write names the version it was computed from and is refused (StaleRecord) on any other, so
a change prepared from an older read (a controller's rebalance, a restore planned before a scale)
can never overwrite what happened meanwhile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from itertools import count

from expertmesh.cluster.placement import PlacementPlan
from expertmesh.cluster.worker_pool import WorkerHandle


class StaleRecord(RuntimeError):
    """A change was computed from a version of the record that is no longer the current one."""


@dataclass(frozen=True)
class Placement:
    """One version of the record; never changes once read."""
    version: int  # +1 on every write
    epoch: int  # the epoch whose pairs the routers use now
    plan: PlacementPlan | None  # plan.worker_pairs(i) is what workers[i] serves
    workers: tuple[WorkerHandle, ...]  # in the plan's order


class PlacementRecord:
    """Readers' side: `read()` from any thread; ids and epochs handed out here are never reused."""

    def __init__(self, first_worker_id: int = 0, first_epoch: int = 0):
        """first_*: above every id and epoch that workers adopted from a lost serve process have seen."""
        self._lock = threading.Lock()
        self._current = Placement(0, -1, None, ())  # version 0: before bring-up's first epoch
        self._ids, self._epochs = count(first_worker_id), count(first_epoch)
        self._writer_made = False

    def read(self) -> Placement:
        with self._lock:
            return self._current

    def new_worker_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def new_epoch(self) -> int:
        with self._lock:
            return next(self._epochs)

    def writer(self) -> "RecordWriter":
        """The one writer; a second call is a bug and raises."""
        with self._lock:
            if self._writer_made:
                raise RuntimeError("the placement record has one writer; it was made already")
            self._writer_made = True
        return RecordWriter(self, self._lock)


class RecordWriter:
    def __init__(self, record: PlacementRecord, lock: threading.Lock):
        self._record, self._lock = record, lock

    def check(self, based_on: int) -> None:
        """Raise StaleRecord unless the record is at version `based_on`: a change checks before it
        applies anything (only this writer moves the version, so the check holds until its write)."""
        with self._lock:
            version = self._record._current.version
        if version != based_on:
            raise StaleRecord(f"the change was computed from version {based_on} of the placement record; "
                              f"it is at version {version} now")

    def write(self, based_on: int, *, epoch: int | None = None, plan: PlacementPlan | None = None,
              workers: list[WorkerHandle] | None = None) -> Placement:
        """The next version, from version `based_on` with the fields given changed."""
        self.check(based_on)
        with self._lock:
            current = self._record._current
            changes = {k: v for k, v in (("epoch", epoch), ("plan", plan)) if v is not None}
            if workers is not None:
                changes["workers"] = tuple(workers)
            self._record._current = replace(current, version=current.version + 1, **changes)
            return self._record._current

