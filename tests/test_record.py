"""The placement record (cluster/record.py): one writer, versioned writes, snapshots that never
change once read."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from expertmesh.cluster.placement import PlacementPlan
from expertmesh.cluster.record import PlacementRecord, StaleRecord
from expertmesh.cluster.worker_pool import WorkerHandle


def handles(*ids: int) -> list[WorkerHandle]:
    return [WorkerHandle(worker=i, actor=None, placement_group=None) for i in ids]


def test_the_record_has_one_writer():
    record = PlacementRecord()
    record.writer()
    with pytest.raises(RuntimeError, match="one writer"):
        record.writer()


def test_a_write_names_the_version_it_was_computed_from_and_is_refused_on_any_other():
    record = PlacementRecord()
    writer = record.writer()
    plan = PlacementPlan.spread(2, 2, 4)
    first = writer.write(0, epoch=record.new_epoch(), plan=plan, workers=handles(0, 1))
    assert (first.version, first.epoch, first.plan, [h.worker for h in first.workers]) == (1, 0, plan, [0, 1])
    grown = plan.with_new_worker()
    with pytest.raises(StaleRecord, match="version 0 .* at version 1"):
        writer.write(0, plan=grown, workers=handles(0, 1, 2))
    assert record.read() is first  # the refused write changed nothing
    second = writer.write(1, plan=grown, workers=handles(0, 1, 2))
    assert (second.version, second.epoch, second.plan) == (2, 0, grown)  # epoch kept: not named
    assert first.plan is plan and len(first.workers) == 2  # a snapshot read before stays as it was
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.version = 5


def test_ids_and_epochs_are_never_handed_out_twice_across_threads():
    record = PlacementRecord()
    got: list[int] = []
    lock = threading.Lock()

    def take():
        mine = [record.new_worker_id() for _ in range(500)]
        with lock:
            got.extend(mine)
    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(2000))
    assert [record.new_epoch() for _ in range(3)] == [0, 1, 2]
