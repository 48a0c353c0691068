"""The router controller: its rule on readings, and through `serve --autoscale-routers` (real Ray,
real gRPC): requests that queue up bring a second router, idleness drains it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from expertmesh.api.router_controller import SAMPLES_PER_WINDOW, RouterController, RouterScaling
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.v1 import generation_pb2 as pb
from tests.gateway_server import ServerProcess, wait_for_line
from tests.helpers import greedy_tokens
from tests.test_router_fleet import Streams

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out


class Fleet:
    """What the controller reads and calls, recorded (the rule alone; serve below runs the real one)."""

    def __init__(self):
        self.scaled: list[int] = []

    def scale(self, count: int) -> None:
        self.scaled.append(count)


def window(routers: int, waiting: float, kv: float) -> list[list[dict]]:
    return [[{"router": r, "waiting": waiting, "kv_used": kv} for r in range(routers)]] * SAMPLES_PER_WINDOW


def test_the_rule_adds_after_two_hot_windows_and_drains_after_the_delay():
    fleet = Fleet()
    c = RouterController(fleet, RouterScaling(min_routers=1, max_routers=3, window_s=1, scale_up_waiting=4,
                                              scale_up_kv=0.8, scale_down_kv=0.2, scale_down_delay_s=10))
    assert c.decide(window(1, 5, 0.1), 0) is None  # one hot window is not enough
    assert c.decide(window(1, 5, 0.1), 1) == "scale up" and fleet.scaled == [2]
    assert c.decide(window(2, 0, 0.9), 2) is None and c.decide(window(2, 0, 0.9), 3) == "scale up"  # KV full
    assert c.decide(window(3, 9, 0.9), 4) is None and c.decide(window(3, 9, 0.9), 5) is None  # at --max-routers
    assert fleet.scaled == [2, 3]
    assert c.decide(window(3, 0, 0.1), 6) is None and c.decide(window(3, 0, 0.1), 15) is None
    assert c.decide(window(3, 0, 0.1), 16) == "scale down" and fleet.scaled == [2, 3, 2]
    assert c.decide(window(2, 0, 0.3), 17) is None and c.decide(window(2, 0, 0.3), 40) is None  # KV above 0.2
    assert c.decide(window(1, 0, 0.0), 41) is None and c.decide(window(1, 0, 0.0), 99) is None  # at --min-routers
    with pytest.raises(ValueError):
        RouterScaling(min_routers=2, max_routers=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("routerscale"), seed=61, init_std=0.1, num_experts=8)


def routers(server: ServerProcess) -> list[tuple[int, str]]:
    out = subprocess.run([sys.executable, "-m", "expertmesh", "info", "--json", "--target", server.target],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [(r["router"], r["state"]) for r in json.loads(out)["routers"]]


def test_queued_requests_bring_a_router_and_idleness_drains_it(checkpoint):
    prompts = [[1, 1000 + 7 * i, 2000 + 11 * i] for i in range(12)]
    expected = greedy_tokens(Engine.local(checkpoint), prompts, 300)
    server = ServerProcess("--model", str(checkpoint), "--workers", "1", "--kv-cache-memory", "16MiB",
                           "--max-seqs", "2", "--autoscale-routers", "--max-routers", "2", "--scale-window", "1",
                           "--router-scale-up-waiting", "1", "--scale-down-delay", "3")
    try:
        assert routers(server) == [(0, "serving")]
        requests = [("greedy", pb.GenerateRequest(token_ids=p, sampling=pb.SamplingParams(
            temperature=0, max_new_tokens=300, ignore_eos=True))) for p in prompts]
        streams = Streams(server.target, requests)  # 2 run, 10 wait on router 0
        wait_for_line(server, "router controller: scale up to 2 routers", 120)
        deadline = time.monotonic() + 60
        while routers(server) != [(0, "serving"), (1, "serving")]:
            assert time.monotonic() < deadline, routers(server)
            time.sleep(0.5)
        assert [g["tokens"] for g in streams.join()] == expected
        wait_for_line(server, "router controller: scale down to 1 routers", 120)
        assert routers(server) == [(0, "serving")]
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])
