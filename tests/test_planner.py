"""The replica planner as a pure function: copies where the load is, balance per layer, room per
worker respected, few moves, and no change under a load it already fits."""

from __future__ import annotations

import random

import pytest

from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.cluster.planner import balance, moves, plan, replica_counts

LAYERS, EXPERTS, WORKERS = 4, 8, 4


def one_hot(hot_share: float = 0.4) -> dict:
    return {(l, e): (hot_share if e == l % EXPERTS else (1 - hot_share) / (EXPERTS - 1)) * 1000
            for l in range(LAYERS) for e in range(EXPERTS)}


def random_load(seed: int) -> dict:
    rng = random.Random(seed)
    return {(l, e): rng.paretovariate(1.2) for l in range(LAYERS) for e in range(EXPERTS)}


def room_used(p: PlacementPlan) -> int:
    return max(sum(w in p.holders[(l, e)] for e in range(EXPERTS)) for l in range(LAYERS) for w in range(WORKERS))


def test_spare_slots_go_to_the_most_loaded_per_copy():
    assert replica_counts([400, 100, 100, 100], 6) == [3, 1, 1, 1]
    assert replica_counts([100, 100], 4) == [2, 2]
    assert sum(replica_counts([5, 1, 1, 9, 2], 9)) == 9
    with pytest.raises(PlacementError):
        replica_counts([1, 1, 1], 2)


def test_a_hot_expert_gets_copies_on_distinct_workers_and_balance_improves():
    start = PlacementPlan.spread(WORKERS, LAYERS, EXPERTS)
    load = one_hot()
    new = plan(load, start, slots_per_worker=3)
    new.validate()  # every expert held, copies on distinct existing workers
    assert room_used(new) <= 3
    for layer in range(LAYERS):
        assert len(new.holders[(layer, layer % EXPERTS)]) == WORKERS  # the hot one: a copy everywhere
    assert balance(new, load) < 1.1 < balance(start, load)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_no_change_and_stable_under_a_steady_load(seed):
    load = random_load(seed)
    start = PlacementPlan.spread(WORKERS, LAYERS, EXPERTS).with_replicas("*:1x2")
    new = plan(load, start, slots_per_worker=3)
    assert room_used(new) <= 3
    assert balance(new, load) <= balance(start, load) + 1e-9
    again = plan(load, new, slots_per_worker=3)
    assert moves(new, again) == 0 and again.holders == new.holders  # no flapping


def test_a_balanced_plan_is_kept_as_it_is():
    start = PlacementPlan.spread(WORKERS, LAYERS, EXPERTS)
    uniform = {(l, e): 1.0 for l in range(LAYERS) for e in range(EXPERTS)}
    assert plan(uniform, start, slots_per_worker=2).holders == start.holders


def test_moves_count_only_new_copies():
    start = PlacementPlan.spread(WORKERS, LAYERS, EXPERTS)
    more = start.with_replicas("0:1x3")
    assert moves(start, more) == 2 and moves(more, start) == 0
