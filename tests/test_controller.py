"""The controller's decisions, window by window, on load samples (the cluster's side is a small
stand-in that records what it is asked: the decisions are the subject here; tests/test_autoscale.py
runs the controller in a real server)."""

from __future__ import annotations

import pytest

from expertmesh.cluster.controller import SUSTAIN_WINDOWS, AutoscaleSettings, Controller
from expertmesh.cluster.placement import MemoryBudget, PlacementPlan
from expertmesh.cluster.record import Placement, StaleRecord
from expertmesh.core.settings import DEFAULTS

LAYERS, EXPERTS = 2, 8


class Cluster:
    """What the controller reads and changes: a plan, workers, and the changes asked of it."""

    def __init__(self, workers: int):
        self.plan = PlacementPlan.spread(workers, LAYERS, EXPERTS)
        self.workers = list(range(workers))
        self.changes: list[tuple] = []
        self.version = 0  # the placement record's version: +1 on every change
        self.metrics = None
        self.settings = DEFAULTS
        self.budget = None

    def scale_workers(self, count: int, reason: str):
        self.changes.append(("workers", count))
        plan = self.plan
        while plan.num_workers < count:
            plan = plan.with_new_worker()
        while plan.num_workers > count:
            plan = plan.without_worker(plan.num_workers - 1)
        self.plan, self.workers = plan, list(range(count))
        self.version += 1

    def read(self) -> Placement:
        return Placement(self.version, 0, self.plan, tuple(self.workers))

    def apply_plan(self, plan, reason: str, based_on: int | None = None):
        if based_on is not None and based_on != self.version:
            raise StaleRecord(f"computed from version {based_on}; at {self.version}")
        self.changes.append(("plan", plan.num_workers))
        self.plan = plan
        self.version += 1


class MovingCluster(Cluster):
    """The record moves (a recovery, a manual change) right after every read."""

    def read(self) -> Placement:
        placement = super().read()
        self.version += 1
        return placement


def sample(t: float, busy: list[float], rows: dict[tuple[int, int], int]) -> dict:
    return {"time": t, "busy": dict(enumerate(busy)), "rows": rows}


def uniform(total: int) -> dict:
    return {(l, e): total for l in range(LAYERS) for e in range(EXPERTS)}


def run(controller: Controller, windows: int, busy_fraction: float, rows_per_window: dict, window: float = 10):
    """`windows` windows of a steady load; returns the actions."""
    actions, t, cumulative_busy, cumulative_rows = [], 0.0, 0.0, {p: 0 for p in rows_per_window}
    for _ in range(windows):
        before = sample(t, [cumulative_busy] * len(controller.cluster.workers), dict(cumulative_rows))
        t += window
        cumulative_busy += busy_fraction * window
        cumulative_rows = {p: cumulative_rows[p] + n for p, n in rows_per_window.items()}
        after = sample(t, [cumulative_busy] * len(controller.cluster.workers), dict(cumulative_rows))
        actions.append(controller.step(before, after))
    return actions


def settings(**kw) -> AutoscaleSettings:
    return AutoscaleSettings(**{"min_workers": 1, "max_workers": 4, "window_s": 10, "scale_up_busy": 0.8,
                                "scale_down_busy": 0.2, "scale_down_delay_s": 60, **kw})


def test_a_steady_balanced_load_changes_nothing_over_many_windows():
    cluster = Cluster(2)
    actions = run(Controller(cluster, settings()), 50, 0.5, uniform(100))
    assert set(actions) == {"none"} and cluster.changes == []


def test_a_skewed_load_is_rebalanced_once_then_left_alone():
    cluster = Cluster(2)
    skewed = {(l, e): (900 if e == 0 else 100) for l in range(LAYERS) for e in range(EXPERTS)}
    actions = run(Controller(cluster, settings()), 20, 0.5, skewed)
    assert actions[0] == "rebalance" and set(actions[1:]) == {"none"}  # no flapping under a steady load
    assert all(len(cluster.plan.holders[(l, 0)]) == 2 for l in range(LAYERS))  # the hot one on both workers


def test_a_rebalance_computed_from_a_record_that_moved_meanwhile_is_not_applied():
    """The plan names the record's version it was computed from; when a change landed between the
    read and the apply, the rebalance is refused and the next window decides afresh."""
    skewed = {(l, e): (900 if e == 0 else 100) for l in range(LAYERS) for e in range(EXPERTS)}
    moving = MovingCluster(2)
    before = moving.plan
    controller = Controller(moving, settings())
    assert set(run(controller, 5, 0.5, skewed)) == {"none"}
    assert moving.changes == [] and moving.plan is before
    assert controller.decisions == []  # nothing applied, nothing counted as a decision


def test_a_rebalance_keeps_every_worker_within_worker_memory():
    """Room for 9 experts a worker (4 a layer, over 2 layers): the hot expert's second copy needs a
    slot the budget does not have, so the plan stays as it is; with room for 10 it gets it."""
    skewed = {(l, e): (900 if e == 0 else 100) for l in range(LAYERS) for e in range(EXPERTS)}
    tight = Cluster(2)
    tight.budget = MemoryBudget(worker_bytes=9 * 100, expert_bytes=100)
    assert set(run(Controller(tight, settings()), 5, 0.5, skewed)) == {"none"} and tight.changes == []
    roomy = Cluster(2)
    roomy.budget = MemoryBudget(worker_bytes=10 * 100, expert_bytes=100)
    assert run(Controller(roomy, settings()), 5, 0.5, skewed)[0] == "rebalance"
    assert all(len(roomy.plan.holders[(l, 0)]) == 2 for l in range(LAYERS))
    assert not roomy.plan.over_budget(roomy.budget)


def test_sustained_saturation_adds_workers_up_to_the_maximum_only():
    cluster = Cluster(2)
    actions = run(Controller(cluster, settings(max_workers=3)), 12, 0.95, uniform(100))
    assert actions[SUSTAIN_WINDOWS - 1] == "scale up" and actions[:SUSTAIN_WINDOWS - 1] == ["none"]
    assert ("workers", 3) in cluster.changes and len(cluster.workers) == 3
    assert actions.count("scale up") == 1  # at the maximum: no more


def test_one_hot_window_is_not_enough_to_scale():
    cluster = Cluster(2)
    controller = Controller(cluster, settings())
    assert run(controller, 1, 0.95, uniform(100)) + run(controller, 1, 0.5, uniform(100)) == ["none", "none"]
    assert cluster.changes == []


def test_low_load_retires_workers_after_the_delay_down_to_the_minimum():
    cluster = Cluster(3)
    actions = run(Controller(cluster, settings(min_workers=2, scale_down_delay_s=60)), 20, 0.05, uniform(100))
    first = actions.index("scale down")
    assert first >= 6 - 1  # 60 s of low load at 10 s windows
    assert len(cluster.workers) == 2 and actions.count("scale down") == 1  # at the minimum: no more


def test_a_manual_change_pins_until_handed_back():
    cluster = Cluster(2)
    controller = Controller(cluster, settings())
    controller.pinned = True
    assert set(run(controller, 5, 0.95, uniform(100))) == {"pinned"} and cluster.changes == []
    controller.pinned = False
    assert "scale up" in run(controller, 5, 0.95, uniform(100))


@pytest.mark.parametrize("bad", [dict(min_workers=0), dict(min_workers=5, max_workers=4),
                                 dict(scale_up_busy=0.1, scale_down_busy=0.2), dict(window_s=0)])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        settings(**bad)
