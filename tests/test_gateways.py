"""More front doors: `expertmesh gateway --cluster ADDRESS` beside `serve --routers 3` (real Ray, real
gRPC and HTTP, the CLI). A second gateway serves through the cluster's router actors with the tokens
of a run through serve's own; a router SIGKILLed under streams of both gateways loses none of
either's; a router added later takes the second gateway's requests; the second gateway's own loss
(SIGKILL) is UNAVAILABLE for its clients, and the routers end its orphaned streams."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess, wait_for_line
from tests.helpers import greedy_tokens, prompt_logits
from tests.test_router_fleet import Streams

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out

STREAMS, TOKENS = 16, 160
LONG = 4000  # tokens: most of the context, so a stream ends long after its gateway's loss is noticed
PROMPTS = [[1, 1500 + 7 * i, 2500 + 11 * i, 3500 + 13 * i] for i in range(STREAMS)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gateways"), seed=70, init_std=0.1, num_experts=8)


TIE = 1e-4  # closer best two logits than this: which wins is fp32 rounding, and paths round apart


@pytest.fixture(scope="module")
def greedy(checkpoint):
    """The reference engine's greedy tokens, every one chosen by more than a tie: a router's
    prefill and decode round differently from the reference's (this model's random logits tie to
    7e-7 at some seeds), and a tie would then decide the comparison, not the gateway."""
    engine = Engine.local(checkpoint)
    tokens = greedy_tokens(engine, PROMPTS, TOKENS)
    for prompt, new in zip(PROMPTS, tokens):
        best = prompt_logits(engine, prompt + new)[len(prompt) - 1:-1].topk(2).values
        assert (best[:, 0] - best[:, 1]).min() > TIE, "the reference ties: pick another seed"
    return tokens


def requests(seeded: bool) -> list:
    out = []
    for i, prompt in enumerate(PROMPTS):
        s = pb.SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, temperature=0)
        if seeded and i % 2:
            s.temperature, s.top_p, s.seed = 0.9, 0.95, 300 + i
        out.append(("seeded" if s.seed else "greedy", pb.GenerateRequest(token_ids=prompt, sampling=s,
                                                                         request_id=f"b-{i}")))
    return out


@pytest.fixture(scope="module")
def fleet(checkpoint):
    """serve with router 0 and router actors 1 and 2, and a gateway of its own over them."""
    server = ServerProcess("--model", str(checkpoint), "--workers", "1", "--routers", "3", "--kv-cache-memory", "64MiB",
                           "--heartbeat-timeout", "2")
    gateway = None
    try:
        address = wait_for_line(server, "expertmesh Ray cluster at", 30).split(" at ")[1].split()[0]
        gateway = ServerProcess("--cluster", address, command="gateway")
        yield server, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        assert server.stop() == 0, "".join(server.lines[-30:])


def info(target: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "expertmesh", "info", "--target", target, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tokens(results: list[dict]) -> list[list[int]]:
    return [r["tokens"] for r in results]


def test_a_second_gateway_serves_through_the_router_actors(fleet, greedy):
    server, gateway = fleet
    routers = info(gateway.target)["routers"]
    assert [(r["router"], r["state"]) for r in routers] == [(1, "serving"), (2, "serving")], routers
    got = Streams(gateway.target, requests(seeded=False)).join()
    assert tokens(got) == greedy
    # the OpenAI API of the second gateway, too
    http = wait_for_line(gateway, "expertmesh HTTP (OpenAI API) on", 10).split(" on ")[1].strip()
    model = json.load(urllib.request.urlopen(f"{http}/models", timeout=60))["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": [PROMPTS[0]], "max_tokens": 8, "temperature": 0}).encode()
    reply = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{http}/completions", body, {"content-type": "application/json"}), timeout=60))
    assert reply["usage"]["completion_tokens"] == 8
    # scale and placement are the serve process's: refused here, with why
    with grpc.insecure_channel(gateway.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AdminStub(channel).Scale(pb.ScaleRequest(routers=4), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serve process" in refused.value.details()


def test_a_router_killed_under_both_gateways_loses_no_stream(fleet, greedy):
    server, gateway = fleet
    seeded = requests(seeded=True)
    reference = Streams(gateway.target, seeded).join()  # fault-free, through the same routers
    assert tokens(reference)[0::2] == greedy[0::2]
    before = info(server.target)["routers"]
    victim = next(r for r in before if r["router"] == 1)["pid"]
    mine = Streams(server.target, requests(seeded=False))
    theirs = Streams(gateway.target, seeded)
    mine.wait_for(5)
    theirs.wait_for(5)
    with grpc.insecure_channel(gateway.target) as channel:
        held = {r.router: r.streams for r in pb_grpc.GenerationStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=30).routers}
    at_kill = list(mine.counts) + list(theirs.counts)
    os.kill(victim, signal.SIGKILL)
    assert held[1] > 0 and all(0 < n < TOKENS for n in at_kill), (held, at_kill)  # the kill met live streams
    line = wait_for_line(gateway, f"router 1 (pid {victim}) lost", 30)
    assert int(line.split("continuing its ")[1].split()[0]) == held[1], line
    wait_for_line(server, f"router 1 (pid {victim}) lost", 30)
    assert tokens(mine.join()) == greedy
    got = theirs.join()
    assert tokens(got) == tokens(reference)
    assert [g["text"] for g in got] == [r["text"] for r in reference]  # no token twice, none missing
    assert all(g["usage"].completion_tokens == TOKENS for g in got)  # counted once
    # a router the serve process adds later takes the second gateway's requests too
    subprocess.run([sys.executable, "-m", "expertmesh", "scale", "--routers", "3", "--target", server.target],
                   check=True, capture_output=True, timeout=300)
    wait_for_line(gateway, "router 3 (pid", 60)
    routers = info(gateway.target)["routers"]
    assert [(r["router"], r["state"]) for r in routers] == [(1, "lost"), (2, "serving"), (3, "serving")], routers


def test_a_lost_gateway_is_unavailable_to_its_clients_and_its_streams_end(fleet):
    server, gateway = fleet
    long = [(kind, pb.GenerateRequest(token_ids=r.token_ids, sampling=pb.SamplingParams(
        temperature=0, max_new_tokens=LONG, ignore_eos=True))) for kind, r in requests(seeded=False)]
    started = time.monotonic()
    streams = Streams(gateway.target, long)
    streams.wait_for(5)
    busy = [r for r in info(server.target)["routers"] if r["state"] == "serving"]
    assert sum(r["kv_blocks_total"] - r["kv_blocks_free"] for r in busy) > 0  # its streams hold KV blocks
    killed, done = time.monotonic(), min(streams.counts)
    gateway.proc.kill()
    # when the streams would have ended by themselves, at their pace so far
    would_end = killed + (LONG - done) * (killed - started) / done
    for t in streams.threads:
        t.join(timeout=60)
    codes = {streams.results[i].code() for i in range(len(long))}
    assert codes == {grpc.StatusCode.UNAVAILABLE}, codes  # a connection loss: retryable
    deadline = time.monotonic() + 120  # the routers end the streams of a gateway that stopped polling
    while True:
        routers = [r for r in info(server.target)["routers"] if r["state"] == "serving" and r["router"] > 0]
        if all(r["kv_blocks_free"] == r["kv_blocks_total"] for r in routers):
            assert time.monotonic() < would_end, (time.monotonic() - killed, would_end - killed)
            break
        assert time.monotonic() < deadline, routers
        time.sleep(1)
    # serve and its own gateway go on serving
    after = Streams(server.target, requests(seeded=False)[:4]).join()
    assert all(len(g["tokens"]) == TOKENS for g in after)
