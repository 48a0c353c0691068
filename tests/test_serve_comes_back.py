"""The cluster role lost and back (real Ray started with `ray start`, real gRPC, the CLI): `serve
--address` on a Ray cluster it joined makes its workers and router actors durable. SIGKILLed under
streams of a second gateway (`expertmesh gateway --cluster`), the serve process takes only itself:
the streams go on through the router actor and the same worker processes. Then a worker is
SIGKILLed too, with no serve process to recover it: the router's steps wait for a change. A serve
process started again adopts what is left (the record rebuilt from what the survivor holds, the
lost worker's experts loaded on it, the next epoch formed, the router switched under its waiting
streams), changes work again (`scale --workers 3`), and every token is the one a run with no fault
gives; the first serve process's standby worker is the second's. A second serve process beside a
live one is refused, and a clean stop leaves no worker or router behind. Only the processes this
test started are ended, by PID.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.v1 import generation_pb2 as pb
from tests.gateway_server import ServerProcess, wait_for_line
from tests.ray_head import ray_head
from tests.test_elastic import cli
from tests.test_router_fleet import Streams

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out

STREAMS, LONG = 8, 4000  # LONG: the streams outlast every event; the test cancels them after the last
PROMPTS = [[1, 1700 + 7 * i, 2700 + 11 * i, 3700 + 13 * i] for i in range(STREAMS)]
STEP = 8  # tokens every stream must gain after each event: it served on through it


def requests(tokens: int) -> list:
    out = []
    for i, prompt in enumerate(PROMPTS):
        s = pb.SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0)
        if i % 2:
            s.temperature, s.top_p, s.seed = 0.9, 0.95, 500 + i
        out.append(("seeded" if s.seed else "greedy", pb.GenerateRequest(token_ids=prompt, sampling=s,
                                                                         request_id=f"c-{i}")))
    return out


def gain(streams: Streams, tokens: int, what: str, timeout_s: float = 180) -> None:
    """Wait until every stream has `tokens` more than now: they went on through `what`."""
    start, deadline = list(streams.counts), time.monotonic() + timeout_s
    while any(n < s + tokens for n, s in zip(streams.counts, start)):
        assert time.monotonic() < deadline, f"streams stopped after {what}: {start} -> {streams.counts}"
        assert not any(isinstance(r, Exception) for r in streams.results.values()), streams.results
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.timeout(900)
def test_a_lost_serve_process_is_adopted_by_the_next_with_exact_tokens(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ck", seed=70, init_std=0.1, num_experts=8)
    with ray_head(8) as head:
        serve_args = ("--model", str(checkpoint), "--address", head.address, "--workers", "2", "--routers", "2",
                      "--kv-cache-memory", "64MiB", "--heartbeat-timeout", "2", "--standby-workers", "1",
                      "--collective-timeout", "60")  # a router waits 90 s for a change after a step fails
        started: list[ServerProcess] = []
        try:
            serve_lose_and_adopt(serve_args, head.address, started)
        finally:
            for proc in reversed(started):
                proc.stop()


def serve_lose_and_adopt(serve_args: tuple, address: str, started: list) -> None:
    """The test's events, in order; each process it starts goes into `started`, for the caller to stop."""
    first = ServerProcess(*serve_args, startup_timeout=300)
    started.append(first)
    with pytest.raises(RuntimeError) as refused:  # one serve process per Ray cluster
        ServerProcess(*serve_args, startup_timeout=300)
    assert "belong to a serve process that still runs" in str(refused.value), str(refused.value)[-2000:]
    gateway = ServerProcess("--cluster", address, command="gateway")
    started.append(gateway)
    before = cli(first, "info")
    workers = {w["worker"]: (w["pid"], w["experts"]) for w in before["workers"]}
    router = next(r for r in before["routers"] if r["router"] == 1)["pid"]

    wait_for_line(first, "worker 2 nothing to load", 120)  # the standby worker is up
    streams = Streams(gateway.target, requests(LONG))
    streams.wait_for(5)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(30)
    gain(streams, STEP, "the serve process's loss")  # no cluster role: the epoch serves on
    assert all(alive(pid) for pid, _ in workers.values()) and alive(router)

    os.kill(workers[1][0], signal.SIGKILL)  # no copy elsewhere: the router's steps fail and wait
    assert all(0 < n < LONG for n in streams.counts)  # the loss met live streams

    second = ServerProcess(*serve_args, startup_timeout=300)
    started.append(second)
    wait_for_line(second, "adopting what a lost serve process left: worker(s) 0, router(s) 1; standby 2", 10)
    line = wait_for_line(second, "router 1 switched to epoch", 10)
    epoch = int(line.split("epoch ")[1].split()[0])
    gain(streams, STEP, "the adoption")  # the router switched epochs under them and stepped again
    after = cli(second, "info")
    # the record rebuilt: the same worker process, holding what it held and the lost worker's experts
    assert [(w["worker"], w["pid"]) for w in after["workers"]] == [(0, workers[0][0])]
    assert sorted(after["workers"][0]["experts"]) == sorted(workers[0][1] + workers[1][1])
    assert after["epoch"] == epoch > before["epoch"]
    assert next(r for r in after["routers"] if r["router"] == 1)["pid"] == router
    assert [r["state"] for r in after["routers"]] == ["serving", "serving"]

    scaled = cli(second, "scale", "--workers", "3")  # changes work again
    wait_for_line(second, "took 1 standby worker(s)", 10)  # the lost serve process's standby, adopted as one
    assert len(scaled["workers"]) == 3
    assert max(w["worker"] for w in scaled["workers"]) > max(workers)  # worker ids never reused
    gain(streams, STEP, "the scale")
    received = streams.stop()

    # the same requests, with no fault, as long as the longest: every token received is its
    reference = Streams(gateway.target, requests(max(map(len, received)))).join()
    for got, ref in zip(received, reference):
        assert got == ref["tokens"][:len(got)]
    pids = [w["pid"] for w in scaled["workers"]] + [router]
    assert second.stop() == 0, "".join(second.lines[-30:])
    deadline = time.monotonic() + 60  # a clean stop ends the durable workers and routers too
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]
        time.sleep(0.5)
