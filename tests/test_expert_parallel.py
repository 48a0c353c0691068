"""Expert workers on a real local Ray cluster against the reference engine.

One Ray instance serves the whole module; each case brings up its own workers on it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import pytest
import ray

from expertmesh.cluster.elastic import ExpertCluster, StaleRecord
from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.cluster.worker_pool import PlacementTimeout, ensure_ray
from expertmesh.core import wire
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine
from tests.helpers import greedy_tokens, prompt_logits, serving_greedy, text_tokenizer

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
        sent = cluster.expert_rows.sum().item()  # the router's own count, same moment
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


CHAOS_PROMPTS = [[1, 100 + i, 200 + i, 300 + i] for i in range(8)]
CHAOS_TOKENS = 48


@pytest.fixture(scope="module")
def chaos_reference(checkpoint):
    return greedy_tokens(Engine.local(checkpoint), CHAOS_PROMPTS, CHAOS_TOKENS)


@dataclass
class FaultRun:
    """What CHAOS_PROMPTS' streams saw around one fault."""
    tokens: list[list[int]]  # each stream's tokens, whole
    at_fault: list[int]  # tokens each stream had received when the fault landed
    epoch_before: int
    epoch_after: int
    epoch_moved_s: float | None  # from the fault to the cluster's first epoch change after it
    longest_pause_s: float  # the longest gap between two tokens of one stream, over all streams
    failed_steps: int  # steps the experts failed, each waiting for a recovery before running again

    def assert_mid_flight(self) -> None:
        """The fault met live streams, and the epoch moved because of it."""
        assert all(0 < n < CHAOS_TOKENS for n in self.at_fault), self.at_fault
        assert self.epoch_after > self.epoch_before and self.epoch_moved_s is not None


def _attached_loop(cluster) -> ServingEngine:
    """The serving loop (a thread of its own) that owns the cluster's engine and applies its changes;
    the test shuts it down before the cluster."""
    return ServingEngine(cluster.engine, text_tokenizer(cluster.engine), control=cluster)


def _stream_while(serving: ServingEngine, cluster, fault, after_tokens: int = 6) -> FaultRun:
    """CHAOS_PROMPTS through the cluster's serving loop, all submitted between two steps, `fault()`
    once every stream has `after_tokens` tokens; every stream must finish."""
    params = SamplingParams(temperature=0, max_new_tokens=CHAOS_TOKENS, ignore_eos=True)
    outputs: list[list] = [[] for _ in CHAOS_PROMPTS]
    arrivals: list[list[float]] = [[] for _ in CHAOS_PROMPTS]
    finished = threading.Event()

    def submit_all():
        for i, prompt in enumerate(CHAOS_PROMPTS):
            def sink(out, i=i):
                outputs[i].append(out)
                arrivals[i].append(time.monotonic())
                if all(o and o[-1].finish_reason for o in outputs):
                    finished.set()
            serving.submit(validate_request(prompt, params, serving.limits), sink)
    # between two steps: on a busy host a submitting thread can trail the loop by many steps
    serving.call(submit_all).result()
    while min(sum(len(o.token_ids) for o in list(stream)) for stream in outputs) < after_tokens:
        time.sleep(0.005)
    epoch_before = cluster.epoch
    at_fault = [sum(len(o.token_ids) for o in list(stream)) for stream in outputs]
    fault_at = time.monotonic()
    fault()
    moved_at = None
    while not finished.is_set() or moved_at is None:
        if moved_at is None and cluster.epoch != epoch_before:
            moved_at = time.monotonic()
        if time.monotonic() - fault_at > 90:
            break
        time.sleep(0.005)
    assert finished.is_set(), "a stream never finished"
    assert serving.healthy
    assert all(o[-1].finish_reason == "length" for o in outputs), [o[-1].error for o in outputs]
    pauses = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    return FaultRun([[t for o in stream for t in o.token_ids] for stream in outputs], at_fault, epoch_before,
                    cluster.epoch, None if moved_at is None else moved_at - fault_at, max(pauses),
                    serving.failed_steps)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_every_stream_keeps_its_tokens(ray_cluster, checkpoint, chaos_reference):
    cluster = ExpertCluster(checkpoint, num_workers=3, replicas="*:0x2",
                            settings=ServingConfig(collective_timeout_s=10))
    pids = [h.pid for h in cluster.workers]
    serving = _attached_loop(cluster)
    try:
        victim = cluster.workers[1]  # holds experts of its own, not only replicas
        assert any(len(cluster.plan.holders[p]) == 1 for p in cluster.plan.worker_pairs(1))
        run = _stream_while(serving, cluster, lambda: os.kill(victim.pid, signal.SIGKILL))
        run.assert_mid_flight()
        assert run.tokens == chaos_reference  # nothing lost, duplicated or changed
        assert cluster.recoveries == 1
        assert victim.worker not in {h.worker for h in cluster.workers}
        deadline = time.monotonic() + 60  # a replacement restores the configured count
        while len(cluster.workers) < 3:
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.2)
        assert serving_greedy(serving, CHAOS_PROMPTS[:2], 8) == [t[:8] for t in chaos_reference[:2]]
        assert cluster.differences() == {}  # the record is what the workers hold
        pids += [h.pid for h in cluster.workers]
    finally:
        serving.shutdown()
        cluster.shutdown()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a worker process outlived the cluster"


@pytest.mark.slow
def test_a_stalled_worker_is_found_by_heartbeats_long_before_the_collective_timeout(ray_cluster, checkpoint,
                                                                                    chaos_reference):
    """SIGSTOP: the worker's process lives and its sockets stay open, so the data path alone would
    wait out the collective timeout (30 s here). Its heartbeats stop: within heartbeat_timeout_s
    (2 s) it is fenced (killed: a SIGCONT can never bring it back into an epoch), the next epoch
    forms without it and the streams go on."""
    cluster = ExpertCluster(checkpoint, num_workers=2, settings=ServingConfig(collective_timeout_s=30))
    victim = cluster.workers[1]
    serving = _attached_loop(cluster)
    try:
        run = _stream_while(serving, cluster, lambda: os.kill(victim.pid, signal.SIGSTOP))
        run.assert_mid_flight()
        assert run.tokens == chaos_reference
        assert run.epoch_moved_s < 3.0, run.epoch_moved_s  # detected and recovered within 3 s
        assert run.longest_pause_s < 5.0, run.longest_pause_s
        assert cluster.recoveries == 1 and victim.worker not in {h.worker for h in cluster.workers}
    finally:
        _resume(victim.pid)
        serving.shutdown()
        cluster.shutdown()
    assert not _alive(victim.pid)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_with_redundancy_a_lost_worker_barely_pauses_a_stream(ray_cluster, checkpoint, chaos_reference, fault):
    """--redundancy 2: every expert has a copy elsewhere, so no step fails: the lost worker's rows
    go to the other copies within the step, the next epoch forms without it in the background, and
    the lost copies come back on the standby worker."""
    settings = ServingConfig(collective_timeout_s=30, redundancy=2, standby_workers=1)
    cluster = ExpertCluster(checkpoint, num_workers=3, settings=settings)
    assert all(len(ws) == 2 for ws in cluster.plan.holders.values())
    victim = cluster.workers[0]
    serving = _attached_loop(cluster)
    try:
        deadline = time.monotonic() + 60
        while not cluster.standby.handles():
            assert time.monotonic() < deadline, "no standby worker"
            time.sleep(0.1)
        standby = cluster.standby.handles()[0].worker
        run = _stream_while(serving, cluster, lambda: os.kill(victim.pid, fault))
        run.assert_mid_flight()
        assert run.tokens == chaos_reference
        assert run.failed_steps == 0  # the serving loop never waited for the control plane
        limit = 1.0 if fault == signal.SIGKILL else 3.5  # a stall takes the heartbeat timeout to find
        assert run.longest_pause_s < limit, run.longest_pause_s
        deadline = time.monotonic() + 60  # the standby worker took the lost one's place and copies
        while len(cluster.workers) < 3 or any(len(ws) < 2 for ws in cluster.plan.holders.values()):
            assert time.monotonic() < deadline, cluster.plan.describe()
            time.sleep(0.1)
        assert standby in {h.worker for h in cluster.workers}
        assert cluster.differences() == {}
    finally:
        _resume(victim.pid)
        serving.shutdown()
        cluster.shutdown()


def _resume(pid: int) -> None:
    """SIGCONT a worker a test stopped (if the cluster has not killed it already)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


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


@pytest.mark.slow
def test_a_new_copy_comes_from_a_peers_memory(ray_cluster, checkpoint, reference):
    """A worker added while serving takes its share of copies from the workers that hold them (their
    held form, through Ray's object store: nothing read, converted or packed again), not from the
    checkpoint; so do the workers that gain a replica. The copies compute exactly what the
    originals did."""
    with ExpertCluster(checkpoint, num_workers=2) as cluster:
        serving = _attached_loop(cluster)
        try:
            cluster.scale_workers(3)
            new = {s["worker"]: s for s in cluster.stats()}[cluster.workers[2].worker]
            assert new["pairs"] and new["load_rates"]["peer"] > 0 and new["load_rates"]["checkpoint"] is None
            before = {s["worker"]: s for s in cluster.stats()}
            scaled = cluster.read()
            cluster.scale_replicas("*:0x3")  # expert 0 of every layer on all three
            after = {s["worker"]: s for s in cluster.stats()}
            gained = [w for w in after if set(map(tuple, after[w]["pairs"])) - set(map(tuple, before[w]["pairs"]))]
            assert gained and all(after[w]["load_rates"]["peer"] is not None for w in gained)
            assert all(after[w]["load_rates"]["checkpoint"] == before[w]["load_rates"]["checkpoint"] for w in gained)
            # a plan computed from the record before the replicas were added is refused, not applied
            now = cluster.read()
            assert now.version > scaled.version
            with pytest.raises(StaleRecord, match=f"version {scaled.version}"):
                cluster.apply_plan(scaled.plan, "stale", based_on=scaled.version)
            assert cluster.read() == now and cluster.differences() == {}
            tokens = serving_greedy(serving, PROMPTS, NEW_TOKENS)
        finally:
            serving.shutdown()
        rows = {s["worker"]: s["rows_received"] for s in cluster.stats()}
    assert tokens == reference["tokens"]
    assert any(rows[new["worker"]].values())  # the copied experts computed rows
