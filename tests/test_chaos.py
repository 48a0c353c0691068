"""Chaos: rounds of random events under 32 streams, with the autoscaling controller on.

Each round starts 32 greedy streams, and once every stream is mid-flight one event lands: a worker
SIGKILLed or SIGSTOPped, a replica added or all extra ones removed, a worker added or retired. Every
stream must end with the tokens of a fault-free run; after each round the placement record equals
what the workers report holding, every live worker holds the group of the live epoch and no other,
no KV block is left in use, and no expert worker process is left that the cluster does not know.
Ten rounds without a memory budget; six with --worker-memory room for 9 of the 16 experts a worker
(--redundancy 2 fits only partly, a lost worker's experts may not fit on the survivors, a change
past the room is refused), where no worker ever holds more than its room.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time

import pytest
import ray

from expertmesh.cluster.controller import AutoscaleSettings, Controller
from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.memory_budget import expert_bytes
from expertmesh.cluster.placement import PlacementError
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine
from tests.helpers import greedy_tokens, text_tokenizer
from tests.test_gateway import _processes

STREAMS, TOKENS = 32, 40
PROMPTS = [[1, 500 + 7 * i, 900 + 11 * i, 1300 + 13 * i] for i in range(STREAMS)]
EVENTS = ("kill", "stop", "add replica", "remove replicas", "add worker", "retire worker")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("chaos"), seed=83, init_std=0.1, num_experts=8)


def run_round(serving: ServingEngine, event) -> tuple[list[list[int]], list[int]]:
    """STREAMS streams; `event()` once every stream has 4 tokens; returns (tokens, tokens at the event)."""
    params = SamplingParams(temperature=0, max_new_tokens=TOKENS, ignore_eos=True)
    outputs: list[list] = [[] for _ in PROMPTS]
    finished = threading.Event()

    def submit_all():
        for i, prompt in enumerate(PROMPTS):
            def sink(out, i=i):
                outputs[i].append(out)
                if all(o and o[-1].finish_reason for o in outputs):
                    finished.set()
            serving.submit(validate_request(prompt, params, serving.limits), sink)
    serving.call(submit_all).result()  # between two steps: a busy host cannot start some streams late
    deadline = time.monotonic() + 120
    while min(sum(len(o.token_ids) for o in list(stream)) for stream in outputs) < 4:
        assert time.monotonic() < deadline, "the streams never started"
        time.sleep(0.002)
    at_event = [sum(len(o.token_ids) for o in list(stream)) for stream in outputs]
    event()
    assert finished.wait(180), "a stream never finished"
    assert all(o[-1].finish_reason == "length" for o in outputs), [o[-1].error for o in outputs]
    return [[t for o in stream for t in o.token_ids] for stream in outputs], at_event


def settle(cluster: ExpertCluster, timeout: float = 90) -> None:
    """Until recovery and restore are done: the target count, every expert on its copies (as many
    as the budget has room for)."""
    deadline = time.monotonic() + timeout
    while (cluster.settling() or len(cluster.workers) != cluster.target_workers
           or cluster.plan.holders != cluster._redundant(cluster.plan).holders):
        assert time.monotonic() < deadline, f"the cluster did not settle: {len(cluster.workers)} workers"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("room, rounds", [(None, 10), (9, 6)], ids=["no budget", "worker memory for 9 experts"])
def test_random_events_under_streams_lose_nothing_and_leak_nothing(checkpoint, room, rounds):
    expected = greedy_tokens(Engine.local(checkpoint), PROMPTS, TOKENS)
    started_ray = ensure_ray(num_cpus=16)
    settings = ServingConfig(collective_timeout_s=20, redundancy=2, standby_workers=1, kv_cache_memory="64MiB")
    if room is not None:
        one = expert_bytes(Checkpoint(checkpoint).config, settings, gpus=False)
        settings = dataclasses.replace(settings, worker_memory=str(room * one + one // 2))
    cluster = ExpertCluster(checkpoint, 3, settings=settings, kv_blocks=2048)
    if room is not None:  # the budget binds: workers at their room, some experts on one copy
        assert [len(cluster.plan.worker_pairs(w)) for w in range(3)] == [room] * 3 and cluster.plan.min_copies() == 1
    serving = ServingEngine(cluster.engine, text_tokenizer(cluster.engine), control=cluster)
    # The controller rebalances every second (and would add a worker under load); the rounds'
    # own events change the worker count.
    controller = Controller(cluster, AutoscaleSettings(min_workers=2, max_workers=4, window_s=1.0,
                                                       scale_down_delay_s=600.0)).start()
    rng = random.Random(7)
    seen_pids: set[int] = set()
    happened = []
    try:
        for round_ in range(rounds):
            kind = EVENTS[round_ % len(EVENTS)] if round_ < len(EVENTS) else rng.choice(EVENTS)
            workers = list(cluster.workers)
            if kind == "add worker" and len(workers) == 4 or kind == "retire worker" and len(workers) == 2:
                kind = "retire worker" if kind == "add worker" else "add worker"  # one that changes something
            seen_pids |= {h.pid for h in workers} | {h.pid for h in cluster.standby.handles()}
            epoch, plan = cluster.epoch, cluster.plan
            refused = []

            def event():
                victim = rng.choice(workers)
                try:
                    if kind == "kill":
                        os.kill(victim.pid, signal.SIGKILL)
                    elif kind == "stop":
                        os.kill(victim.pid, signal.SIGSTOP)
                    elif kind == "add replica":
                        cluster.scale_replicas(f"*:{rng.randrange(8)}x3")
                    elif kind == "remove replicas":
                        cluster.scale_replicas("")
                    elif kind == "add worker":
                        cluster.scale_workers(len(workers) + 1)
                    else:
                        cluster.scale_workers(len(workers) - 1)
                except PlacementError as exc:  # past --worker-memory: refused, nothing changed
                    assert room is not None, exc
                    refused.append(str(exc))

            tokens, at_event = run_round(serving, event)
            assert all(0 < n < TOKENS for n in at_event), (kind, at_event)  # every stream was mid-flight
            assert tokens == expected, kind
            # A covered loss need not hold the streams up (its rows go to the other copies), so they may
            # end before the loss is even noticed: wait for the epoch to move (generous: beside a busy
            # neighbour the next epoch forms slowly), then for the cluster to settle.
            deadline = time.monotonic() + 60
            while kind in ("kill", "stop") and cluster.epoch == epoch:
                assert time.monotonic() < deadline, f"the worker ({kind}) was never fenced"
                time.sleep(0.1)
            settle(cluster)
            if refused:
                assert cluster.epoch == epoch and cluster.plan.holders == plan.holders, refused
                kind = f"{kind} (refused)"
            elif kind in ("kill", "stop", "add worker", "retire worker"):
                assert cluster.epoch > epoch, kind  # the event took effect
            elif kind == "add replica":
                assert cluster.plan.holders != plan.holders or all(len(ws) == 3 for ws in plan.holders.values())
            if room is not None:  # no worker ever past its room between changes, whatever happened
                assert not cluster.plan.over_budget(cluster.budget), kind
                # read on the control thread: the controller's rebalances (every second) load new
                # copies before they drop old ones, so a worker may pass its room within a change
                held = cluster.between_changes(cluster.stats)
                assert all(stats["weight_bytes"] <= cluster.budget.worker_bytes for stats in held), kind
            happened.append(kind)
            print(f"round {round_}: {kind}: epoch {epoch} -> {cluster.epoch}, {len(cluster.workers)} workers, "
                  f"tokens at the event {min(at_event)}-{max(at_event)}")
            assert cluster.differences() == {}, kind  # the record is the world
            for stats in cluster.stats():  # the live epoch's group and no other
                assert stats["epochs"] == [cluster.epoch], (kind, stats["worker"], stats["epochs"])
            cache = cluster.engine.cache
            deadline = time.monotonic() + 30
            while cache.free_blocks != cache.num_blocks:  # blocks return at the next boundary
                assert time.monotonic() < deadline, "KV blocks leaked"
                time.sleep(0.05)
            live = {h.pid for h in cluster.workers} | {h.pid for h in cluster.standby.handles()}
            seen_pids |= live
            table = _processes()
            deadline = time.monotonic() + 60
            while any(p in table and "ExpertWorker" in table[p][1] for p in seen_pids - live):
                assert time.monotonic() < deadline, "a lost or retired worker's process is still alive"
                time.sleep(0.2)
                table = _processes()
        assert {kind.removesuffix(" (refused)") for kind in happened} == set(EVENTS[:rounds])
    finally:
        controller.stop()
        serving.shutdown()
        cluster.shutdown()
        if started_ray:
            ray.shutdown()
