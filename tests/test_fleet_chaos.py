"""Chaos with routers: ten rounds of router and worker events under 32 streams through the fleet.

Each round starts 32 greedy streams through the gateway's fleet (router 0 in this process, router
actors beside it) and, once every stream is mid-flight, one event lands: a router SIGKILLed or
SIGSTOPped, a router added or drained, a worker SIGKILLed, added or retired. Every stream must end
with the tokens of a fault-free run; after each round the placement record equals what the workers
report, every live router serves in the cluster's epoch, the control plane's routers are the fleet's
live ones, no KV block is left in use on router 0, and no router process is left that the fleet
does not know.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import ray

from expertmesh.api.router_fleet import POLL_WAIT_S, RouterFleet
from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.router_actor import start_routers
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine
from tests.helpers import greedy_tokens, text_tokenizer
from tests.test_gateway import _processes

STREAMS, TOKENS = 32, 60
PROMPTS = [[1, 700 + 7 * i, 1100 + 11 * i, 1500 + 13 * i] for i in range(STREAMS)]
EVENTS = ("kill router", "add router", "kill worker", "stop router", "add worker", "drain router",
          "retire worker")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fleetchaos"), seed=89, init_std=0.1, num_experts=8)


def run_round(fleet: RouterFleet, limits, event) -> tuple[list[list[int]], list[int]]:
    params = SamplingParams(temperature=0, max_new_tokens=TOKENS, ignore_eos=True)
    outputs: list[list] = [[] for _ in PROMPTS]
    finished = threading.Event()
    for i, prompt in enumerate(PROMPTS):
        def sink(out, i=i):
            outputs[i].append(out)
            if all(o and o[-1].finish_reason for o in outputs):
                finished.set()
        fleet.submit(validate_request(prompt, params, limits), sink)
    deadline = time.monotonic() + 120
    while min(sum(len(o.token_ids) for o in list(stream)) for stream in outputs) < 4:
        assert time.monotonic() < deadline, "the streams never started"
        time.sleep(0.002)
    at_event = [sum(len(o.token_ids) for o in list(stream)) for stream in outputs]
    event()
    assert finished.wait(180), "a stream never finished"
    assert all(o[-1].finish_reason == "length" for o in outputs), [o[-1].error for o in outputs]
    return [[t for o in stream for t in o.token_ids] for stream in outputs], at_event


@pytest.mark.slow
def test_router_and_worker_events_under_streams_lose_nothing_and_leak_nothing(checkpoint):
    expected = greedy_tokens(Engine.local(checkpoint), PROMPTS, TOKENS)
    started_ray = ensure_ray(num_cpus=16)
    settings = ServingConfig(collective_timeout_s=20, redundancy=2, standby_workers=1, kv_cache_memory="64MiB")
    cluster = ExpertCluster(checkpoint, 3, settings=settings, kv_blocks=2048)
    serving = ServingEngine(cluster.engine, text_tokenizer(cluster.engine), control=cluster)
    fleet = RouterFleet(serving, start_routers(cluster, [1], 2048), router_deadline_s=2.0 + POLL_WAIT_S,
                        local_epoch=lambda: cluster.epoch, on_lost=cluster.forget_router,
                        start=lambda ids: start_routers(cluster, ids, 2048))
    rng = random.Random(11)
    seen_routers: set[int] = set()
    happened = []
    try:
        for round_ in range(10):
            kind = EVENTS[round_ % len(EVENTS)] if round_ < len(EVENTS) else rng.choice(EVENTS)
            routers = [m for m in fleet.members[1:] if m.state == "serving"]
            workers = list(cluster.workers)
            if kind in ("kill router", "stop router", "drain router") and not routers:
                fleet.scale(2)  # a router to lose, before the round
                routers = [m for m in fleet.members[1:] if m.state == "serving"]
            if kind == "add router" and len(routers) >= 2:
                kind = "drain router"
            if kind == "retire worker" and len(workers) <= 2:
                kind = "add worker"
            seen_routers |= {m.pid for m in routers}
            epoch, lost, migrated = cluster.epoch, len(fleet.lost), fleet.migrated

            def event():
                if kind == "kill router":
                    os.kill(rng.choice(routers).pid, signal.SIGKILL)
                elif kind == "stop router":
                    os.kill(rng.choice(routers).pid, signal.SIGSTOP)
                elif kind == "add router":
                    fleet.scale(len(routers) + 2)
                elif kind == "drain router":
                    fleet.scale(len(routers))  # router 0 and all but the newest
                elif kind == "kill worker":
                    os.kill(rng.choice(workers).pid, signal.SIGKILL)
                elif kind == "add worker":
                    cluster.scale_workers(len(workers) + 1)
                else:
                    cluster.scale_workers(len(workers) - 1)

            tokens, at_event = run_round(fleet, serving.limits, event)
            assert all(0 < n < TOKENS for n in at_event), (kind, at_event)  # every stream was mid-flight
            assert tokens == expected, kind
            if kind in ("kill router", "stop router"):
                assert len(fleet.lost) == lost + 1, kind  # the event took effect
            if kind == "drain router":
                assert fleet.migrated >= migrated, kind
            deadline = time.monotonic() + 90
            while cluster.settling() or len(cluster.workers) != cluster.target_workers:
                assert time.monotonic() < deadline, "the cluster did not settle"
                time.sleep(0.1)
            if kind in ("kill worker", "add worker", "retire worker"):
                assert cluster.epoch > epoch, kind
            live = [m for m in fleet.members[1:] if m.state == "serving"]
            deadline = time.monotonic() + 10
            while any(m.load.get("epoch") != cluster.epoch for m in live):  # polls report it within 0.25 s
                assert time.monotonic() < deadline, (kind, cluster.epoch, [m.load for m in live])
                time.sleep(0.05)
            connected = cluster.between_changes(lambda: sorted(cluster.routers.actors))
            assert connected == sorted(m.router for m in live), kind
            assert cluster.differences() == {}, kind  # the record is the world
            cache = cluster.engine.cache
            deadline = time.monotonic() + 10
            while cache.free_blocks != cache.num_blocks:
                assert time.monotonic() < deadline, "KV blocks leaked"
                time.sleep(0.05)
            seen_routers |= {m.pid for m in live}
            gone = seen_routers - {m.pid for m in live}
            deadline = time.monotonic() + 20
            while any("Router" in _processes().get(p, (None, ""))[1] for p in gone):  # one read per pid: it may go
                assert time.monotonic() < deadline, "a lost or drained router's process is still alive"
                time.sleep(0.2)
            happened.append(kind)
            print(f"round {round_}: {kind}: epoch {epoch} -> {cluster.epoch}, {len(live) + 1} routers, "
                  f"{len(cluster.workers)} workers, {fleet.migrated - migrated} streams migrated")
        assert set(happened) == set(EVENTS)
    finally:
        for m in fleet.members[1:]:
            if m.state == "serving":
                try:
                    os.kill(m.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        fleet.stop()
        serving.shutdown()
        cluster.shutdown()
        if started_ray:
            ray.shutdown()
