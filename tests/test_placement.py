"""Placement plans: spreading, replicas, validation, plan files through the CLI."""

from __future__ import annotations

import json

import pytest

from expertmesh.cluster.placement import MemoryBudget, PlacementError, PlacementPlan
from tests.test_cli import expertmesh


def test_spread_covers_every_expert_once_and_balances_layers():
    plan = PlacementPlan.spread(3, 2, 8)
    plan.validate()
    assert all(len(ws) == 1 for ws in plan.holders.values())
    per_worker = [len(plan.worker_pairs(w)) for w in range(3)]
    assert sorted(per_worker) == [4, 6, 6]  # 8 experts over 3 workers, in each of 2 layers


def test_replicas_go_to_the_least_loaded_workers():
    plan = PlacementPlan.spread(4, 2, 4).with_replicas("*:0x3,1:2x2")
    assert plan.holders[(0, 0)] == (0, 1, 2) and plan.holders[(1, 0)][0] == 0
    assert len(plan.holders[(1, 0)]) == 3 and len(plan.holders[(1, 2)]) == 2
    assert len(set(plan.holders[(1, 0)])) == 3
    plan.validate()
    assert "replicated" in plan.describe()


@pytest.mark.parametrize("spec, message", [("0:9", "no expert"), ("0:1x5", "only 4 workers"),
                                           ("zero:1", "bad replica spec")])
def test_bad_replica_specs(spec, message):
    with pytest.raises(PlacementError, match=message):
        PlacementPlan.spread(4, 2, 8).with_replicas(spec)


def test_renumbered_puts_a_new_worker_in_a_lost_ones_place():
    """What restoring after a loss does: the plan before the loss with the survivors first (in
    their order after it) and the new worker last holds exactly what each held before."""
    before = PlacementPlan.spread(4, 2, 8).with_min_copies(2)
    after_loss = before.without_worker(1)  # workers 0, 2, 3 -> 0, 1, 2
    restored = before.renumbered([0, 2, 3, 1])
    restored.validate()
    assert [restored.worker_pairs(j) for j in range(4)] == [before.worker_pairs(w) for w in (0, 2, 3, 1)]
    moves = restored.moves_from(after_loss, {0: 0, 1: 1, 2: 2})
    assert moves[0][3] == before.worker_pairs(1)  # only the lost copies load, all on the new worker
    assert all(not moves[0][w] for w in range(3))
    with pytest.raises(PlacementError, match="not an order"):
        before.renumbered([0, 1, 1, 3])


def test_validation_errors():
    plan = PlacementPlan.spread(2, 1, 4)
    holders = dict(plan.holders)
    del holders[(0, 3)]
    with pytest.raises(PlacementError, match=r"expert \(0, 3\) is on no worker"):
        PlacementPlan(2, 1, 4, holders).validate()
    with pytest.raises(PlacementError, match="placed twice"):
        PlacementPlan(2, 1, 4, {**plan.holders, (0, 1): (1, 1)}).validate()
    with pytest.raises(PlacementError, match="unknown worker 5"):
        PlacementPlan(2, 1, 4, {**plan.holders, (0, 1): (5,)}).validate()
    with pytest.raises(PlacementError, match="over the 150 B a worker may hold"):
        plan.validate(MemoryBudget(worker_bytes=150, expert_bytes=100))


@pytest.mark.slow
def test_plan_file_from_the_cli_drives_a_run(tiny_checkpoint, tmp_path):
    text = expertmesh("plan", "--model", str(tiny_checkpoint), "--workers", "2", "--replicas", "*:3x2",
                      "--json").stdout
    plan = PlacementPlan.from_json(text)
    assert plan == PlacementPlan.spread(2, 2, 8).with_replicas("*:3x2")
    raw = json.loads(text)
    raw["holders"] = [[layer, e, [0]] if e < 6 else [layer, e, ws] for layer, e, ws in raw["holders"]]
    (tmp_path / "plan.json").write_text(json.dumps(raw))  # an uneven, hand-edited plan
    args = ["run", "--model", str(tiny_checkpoint), "--prompt-ids", "1,415,2936", "--max-new-tokens", "6",
            "--json"]
    local = json.loads(expertmesh(*args).stdout)
    placed = json.loads(expertmesh(*args, "--workers", "2", "--placement", str(tmp_path / "plan.json")).stdout)
    assert placed == local
