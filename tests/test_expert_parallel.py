"""Expert workers on a real local Ray cluster against the reference engine.

One Ray instance serves the whole module; each case brings up its own workers on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from expertmesh.cluster.bringup import ExpertCluster, PlacementTimeout, ensure_ray
from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.core import wire
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.dispatcher import ExpertPathError
from expertmesh.router.engine import Engine
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import FINISH_ERROR, ServingEngine
from tests.helpers import greedy_tokens, prompt_logits, text_tokenizer

LAYERS, EXPERTS = 2, 8
PROMPTS = [[1, 415, 2936, 9060], [1, 22557], [1, *range(100, 117)], [1, 3, 4, 5, 6, 7, 8]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def ray_cluster():
    started = ensure_ray(num_cpus=8)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ep"), seed=11, num_layers=LAYERS,
                                 num_experts=EXPERTS, hidden_size=64, intermediate_size=96)


@pytest.fixture(scope="module")
def reference(checkpoint):
    engine = Engine.local(checkpoint)
    return {"tokens": greedy_tokens(engine, PROMPTS, NEW_TOKENS), "logits": prompt_logits(engine, PROMPTS[2])}


def uneven_plan(num_workers: int) -> PlacementPlan:
    """Worker 0 holds three quarters of every layer's experts, the rest share what is left."""
    holders = {}
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            holders[(layer, e)] = (0,) if e < EXPERTS * 3 // 4 else (1 + e % (num_workers - 1),)
    return PlacementPlan(num_workers, LAYERS, EXPERTS, holders)


ON, OFF = ServingConfig(pingpong="on"), ServingConfig(pingpong="off")
CASES = {
    "1w": dict(num_workers=1, settings=ON),
    "2w_no_pingpong": dict(num_workers=2, settings=OFF),
    "2w_replicas": dict(num_workers=2, replicas="*:0x2,1:3x2", settings=ON),
    "4w": dict(num_workers=4, settings=ON),
    "4w_replicas_no_pingpong": dict(num_workers=4, replicas="*:1x3,0:6x4", settings=OFF),
    "3w_uneven": dict(num_workers=3, plan=uneven_plan(3), settings=ON),
}


def _rows(stats: list[dict]) -> dict[tuple[int, str], int]:
    return {(s["worker"], pair): n for s in stats for pair, n in s["rows_received"].items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_distributed_engine_matches_reference(ray_cluster, checkpoint, reference, name):
    with ExpertCluster(checkpoint, **CASES[name]) as cluster:
        engine = cluster.engine
        before = _rows(cluster.stats())
        split_before = engine.split_steps
        tokens = greedy_tokens(engine, PROMPTS, NEW_TOKENS)
        stats = cluster.stats()
        sent = cluster.dispatcher.rows_sent.sum().item()  # the router's own count, same moment
        # ping-pong on: every step of two or more sequences really ran as two micro-batches
        assert (engine.split_steps - split_before == NEW_TOKENS) == (engine.pingpong == "on")
        logits = prompt_logits(engine, PROMPTS[2])
        assert engine.cache.free_blocks == engine.cache.num_blocks
    assert tokens == reference["tokens"]
    assert (logits - reference["logits"]).abs().max().item() < 1e-5

    # Each worker received rows only for experts it holds, and exactly the rows routed: every
    # token goes to K experts in every layer, nothing padded, nothing dropped.
    after = _rows(stats)
    for s in stats:
        held = {f"{l}:{e}" for l, e in s["pairs"]}
        assert set(s["rows_received"]) <= held
    processed = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (NEW_TOKENS - 1)
    for layer in range(LAYERS):
        received = sum(n - before.get(key, 0) for key, n in after.items() if key[1].startswith(f"{layer}:"))
        assert received == processed * 2
    assert sent == sum(after.values())
    # Replicas share an expert's rows: every holder of a replicated expert got some.
    for (layer, e), holders in cluster.plan.holders.items():
        if len(holders) > 1:
            got = [after.get((w, f"{layer}:{e}"), 0) for w in holders]
            assert all(g > 0 for g in got) or sum(got) < len(holders), (layer, e, got)


def test_rows_beyond_the_inline_limit_travel_in_their_own_message(ray_cluster, checkpoint, reference,
                                                                    monkeypatch):
    # On gloo the router puts up to wire.INLINE_MAX_ROWS rows in the header's message; past that
    # they follow in a message of their own, and the worker goes by the header's flag. A limit of 3
    # sends some layers each way here.
    monkeypatch.setattr(wire, "INLINE_MAX_ROWS", 3)
    with ExpertCluster(checkpoint, num_workers=2, settings=OFF) as cluster:
        assert cluster.dispatcher.inline
        tokens = greedy_tokens(cluster.engine, PROMPTS, NEW_TOKENS)
    assert tokens == reference["tokens"]


def test_killing_a_worker_fails_the_call_clearly_and_leaves_nothing(ray_cluster, checkpoint):
    cluster = ExpertCluster(checkpoint, num_workers=2, settings=ServingConfig(collective_timeout_s=5))
    pids = [w["pid"] for w in ray.get([w.where.remote() for w in cluster.workers])]
    errors = []
    serving = ServingEngine(cluster.engine, text_tokenizer(cluster.engine))  # its own loop thread

    def generate():
        params = SamplingParams(temperature=0, max_new_tokens=3000, ignore_eos=True)
        errors.append(serving.generate([[1, 2, 3]], params)[0][-1])

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray.kill(cluster.workers[1])
    thread.join(timeout=60)
    assert not thread.is_alive(), "generation hung after a worker died"
    assert time.monotonic() - killed_at < 5 + 10  # within the collective timeout, with slack
    assert errors and errors[0].finish_reason == FINISH_ERROR
    assert ExpertPathError.__name__ in errors[0].error and "worker died or timed out" in errors[0].error
    assert not serving.healthy
    serving.shutdown()
    cluster.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a worker process outlived the cluster"


def test_a_stalled_worker_fails_the_step_by_the_timeout(ray_cluster, checkpoint):
    """SIGSTOP: the worker's process lives and its sockets stay open, so only the collective
    timeout can tell; the step fails with ExpertPathError after it, never hangs."""
    timeout = 4
    cluster = ExpertCluster(checkpoint, num_workers=2, settings=ServingConfig(collective_timeout_s=timeout))
    pid = ray.get(cluster.workers[1].where.remote())["pid"]
    serving = ServingEngine(cluster.engine, text_tokenizer(cluster.engine))  # its own loop thread
    chunks, done = [], threading.Event()

    def sink(out):
        chunks.append(out)
        if out.finish_reason:
            done.set()

    params = SamplingParams(temperature=0, max_new_tokens=3000, ignore_eos=True)
    serving.submit(validate_request([1, 2, 3], params, serving.limits), sink)
    try:
        while len(chunks) < 3:
            time.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert done.wait(timeout + 20), "the step hung on a stalled worker"
        waited = time.monotonic() - stopped_at
        assert timeout - 1 <= waited <= timeout + 15, waited  # the timeout path, not an early error
        assert chunks[-1].finish_reason == FINISH_ERROR and "timed out" in chunks[-1].error
        assert not serving.healthy
    finally:
        os.kill(pid, signal.SIGCONT)
        serving.shutdown()
        cluster.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, just not reaped yet
        return f.read().split()[2] != "Z"


def test_a_placement_ray_cannot_satisfy_says_what_it_waits_for_then_fails(checkpoint, ray_cluster, capfd):
    settings = ServingConfig(device="cuda", placement_timeout_s=3)  # GPU bundles on a CPU-only cluster
    with pytest.raises(PlacementTimeout, match=r"waited 3s for 2 bundles of \{'GPU': 1, 'CPU': 1\}"):
        ExpertCluster(checkpoint, num_workers=2, settings=settings)
    err = capfd.readouterr().err
    assert "waiting for 2 bundles of {'GPU': 1, 'CPU': 1}" in err and "`ray status` shows why" in err


def test_plan_errors(checkpoint, ray_cluster):
    with pytest.raises(PlacementError, match="placement plan is for 3 workers"):
        ExpertCluster(checkpoint, num_workers=2, plan=uneven_plan(3))
    with pytest.raises(PlacementError, match="copies but only 2 workers"):
        ExpertCluster(checkpoint, num_workers=2, replicas="*:0x3")
