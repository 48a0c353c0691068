"""Routers as a fleet through `serve --routers 2` and the CLI (real Ray, real gRPC): a router killed
(SIGKILL) or stopped (SIGSTOP) under 32 streams of every kind loses none of them; each of its
streams goes on on the other router from the tokens its client had, with exactly the tokens and
text of a run with no fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess, scrape, total, wait_for_line
from tests.helpers import assert_prefixes_of_greedy, greedy_tokens

pytestmark = pytest.mark.slow  # make test-all (CI) runs these; make test leaves them out

STREAMS, TOKENS = 32, 200
PROMPTS = [[1, 1000 + 7 * i, 2000 + 11 * i, 3000 + 13 * i] for i in range(STREAMS)]
SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                      "n": {"type": "integer"}}, "required": ["name", "n"]})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fleet"), seed=61, init_std=0.1, num_experts=8)


@pytest.fixture(scope="module")
def requests(checkpoint):
    """32 requests of five kinds: greedy, seeded, greedy with a stop string that ends it early (cut
    from the reference engine's text), seeded with logprobs, seeded under a JSON schema."""
    tokenizer = load_tokenizer(checkpoint)
    greedy = greedy_tokens(Engine.local(checkpoint), PROMPTS, TOKENS)
    out = []
    for i, prompt in enumerate(PROMPTS):
        kind = ("greedy", "seeded", "stop", "logprobs", "json")[i % 5]
        s = pb.SamplingParams(max_new_tokens=TOKENS, ignore_eos=kind != "json")
        if kind in ("greedy", "stop"):
            s.temperature = 0
        else:
            s.temperature, s.top_p, s.seed = 0.9, 0.95, 100 + i
        if kind == "stop":
            text = tokenizer.decode(prompt + greedy[i])[len(tokenizer.decode(prompt)):]
            s.stop.append(text[len(text) * 2 // 3:][:4])  # ends the stream about two thirds in
        if kind == "logprobs":
            s.logprobs = 2
        request = pb.GenerateRequest(token_ids=prompt, sampling=s, request_id=f"client-{i}")
        if kind == "json":
            request.structured.json_schema = SCHEMA
        out.append((kind, request))
    return out


def cli(server: ServerProcess, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "expertmesh", *args, "--target", server.target, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Streams:
    """The requests as concurrent gRPC streams; `join()` returns each one's responses."""

    def __init__(self, target: str, requests):
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.requests = requests
        self.results: dict[int, object] = {}
        self.counts = [0] * len(requests)
        self.received: list[list[int]] = [[] for _ in requests]
        self.arrivals: list[list[float]] = [[] for _ in requests]
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(len(requests))]
        for t in self.threads:
            t.start()

    def _one(self, i: int) -> None:
        got = []
        try:
            for r in self.stub.Generate(self.requests[i][1], timeout=300):
                got.append(r)
                self.received[i].extend(r.token_ids)
                self.counts[i] += len(r.token_ids)
                self.arrivals[i].append(time.monotonic())
            self.results[i] = got
        except grpc.RpcError as exc:
            self.results[i] = exc

    def stop(self) -> list[list[int]]:
        """Cancel every stream and return the tokens each had received (streams that end when the
        test's events have landed, whatever the machine's pace)."""
        self.channel.close()
        for t in self.threads:
            t.join(timeout=300)
        for i in range(len(self.requests)):
            result = self.results[i]
            assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.CANCELLED, (i, result)
        return [list(r) for r in self.received]

    def wait_for(self, tokens: int) -> None:
        deadline = time.monotonic() + 120
        while min(self.counts) < tokens:
            assert time.monotonic() < deadline, self.counts
            assert not any(isinstance(r, Exception) for r in self.results.values()), self.results
            time.sleep(0.01)

    def join(self) -> list[dict]:
        for t in self.threads:
            t.join(timeout=300)
        self.channel.close()
        out = []
        for i in range(len(self.requests)):
            result = self.results[i]
            assert not isinstance(result, Exception), (i, result)
            out.append({"tokens": [t for r in result for t in r.token_ids], "text": "".join(r.text for r in result),
                        "logprob_ids": [lp.token_id for r in result for lp in r.logprobs],
                        "finish": result[-1].finish_reason, "usage": result[-1].usage,
                        "ids": {r.request_id for r in result}})
        return out


def check_same_as_reference(got: list[dict], reference: list[dict], requests) -> None:
    for i, ((kind, request), g, want) in enumerate(zip(requests, got, reference)):
        assert g["tokens"] == want["tokens"], (i, kind)
        assert g["text"] == want["text"], (i, kind)  # no token twice, none missing
        assert g["finish"] == want["finish"], (i, kind)
        assert g["logprob_ids"] == want["logprob_ids"], (i, kind)
        assert g["usage"].prompt_tokens == len(request.token_ids), (i, kind)  # the request counted once
        assert g["usage"].completion_tokens == len(g["tokens"]), (i, kind)
        assert g["ids"] == {request.request_id}, (i, kind)


@pytest.fixture(scope="module")
def reference(checkpoint, requests):
    """The 32 requests through `serve --routers 2` with no fault."""
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--routers", "2", "--kv-cache-memory", "64MiB")
    try:
        got = Streams(server.target, requests).join()
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])
    kinds = [kind for kind, _ in requests]
    assert all(g["finish"] == pb.FINISH_REASON_STOP for g, k in zip(got, kinds) if k == "stop")
    assert all(len(g["tokens"]) < TOKENS for g, k in zip(got, kinds) if k == "stop")
    assert all(json.loads(g["text"]) for g, k in zip(got, kinds) if k == "json")
    assert all(len(g["logprob_ids"]) == len(g["tokens"]) for g, k in zip(got, kinds) if k == "logprobs")
    return got


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_lost_router_loses_no_stream(checkpoint, requests, reference, fault):
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--routers", "2", "--kv-cache-memory", "64MiB",
                           "--heartbeat-timeout", "2", "--metrics-port", "0")
    victim = None
    try:
        metrics_url = wait_for_line(server, "expertmesh metrics on", 30).rsplit(" ", 1)[1].strip()
        assert total(scrape(metrics_url), "expertmesh_streams_migrated_total") == 0
        before = cli(server, "info")
        assert [(r["router"], r["state"]) for r in before["routers"]] == [(0, "serving"), (1, "serving")]
        victim = before["routers"][1]["pid"]
        streams = Streams(server.target, requests)
        streams.wait_for(5)
        with grpc.insecure_channel(server.target) as channel:  # the CLI would take a second to start
            held = pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30).routers[1].streams
        at_fault = list(streams.counts)
        assert held > 0 and all(0 < n < TOKENS for n in at_fault), (held, at_fault)  # the fault meets live streams
        # router 1's own histograms and counters, read from its process by the gateway's scrape:
        # each of its streams has had its first token, and router 0's and its own cover every stream
        live = scrape(metrics_url)
        first_tokens_1 = total(live, "expertmesh_router_time_to_first_token_seconds_count", router="1")
        assert first_tokens_1 >= held, (first_tokens_1, held)
        assert total(live, "expertmesh_router_generation_tokens_total", router="1") >= first_tokens_1
        assert total(live, "expertmesh_router_step_seconds_count", router="1") > 0
        assert first_tokens_1 + total(live, "expertmesh_time_to_first_token_seconds_count") >= len(requests)
        os.kill(victim, getattr(signal, fault))
        faulted = time.monotonic()
        line = wait_for_line(server, f"router 1 (pid {victim}) lost", 30)
        found = time.monotonic() - faulted
        moved = int(line.split("continuing its ")[1].split()[0])
        assert moved > 0, line
        if fault == "SIGSTOP":
            assert "no answer to a poll" in line, line
            assert found < 3.0, f"a stopped router was found after {found:.1f}s"
        got = streams.join()
        check_same_as_reference(got, reference, requests)
        after = cli(server, "info")
        assert [(r["router"], r["state"]) for r in after["routers"]] == [(0, "serving"), (1, "lost")]
        samples = scrape(metrics_url)
        assert total(samples, "expertmesh_streams_migrated_total") == moved
        assert total(samples, "expertmesh_routers", state="lost") == 1
        assert total(samples, "expertmesh_routers_lost_total") == 1
        assert total(samples, "expertmesh_router_step_seconds_count", router="1") == 0  # a lost router is not read
        # the moved streams went on on router 0 after the fault: tokens kept arriving
        assert sum(1 for arrivals in streams.arrivals if arrivals[-1] > faulted) >= moved
    finally:
        if victim is not None and fault == "SIGSTOP":
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert server.stop() == 0, "".join(server.lines[-30:])


UNTIL_STOPPED = 3000  # the tests stop these streams themselves once their changes have landed


def test_worker_changes_reach_every_router_and_lose_no_stream(checkpoint):
    """serve --routers 2: a worker added (scale) and then one killed (SIGKILL) under 32 streams
    spread over both routers: each change moves both routers to the new epoch, no router is lost,
    no stream migrates, and every stream keeps the reference engine's tokens."""
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--routers", "2", "--kv-cache-memory", "64MiB",
                           "--standby-workers", "1")
    try:
        greedy = [("greedy", pb.GenerateRequest(token_ids=p, sampling=pb.SamplingParams(
            temperature=0, max_new_tokens=UNTIL_STOPPED, ignore_eos=True))) for p in PROMPTS]
        before = cli(server, "info")
        streams = Streams(server.target, greedy)
        streams.wait_for(5)
        held = [r["streams"] for r in cli(server, "info")["routers"]]
        assert all(n > 0 for n in held), held  # both routers hold live streams
        added = cli(server, "scale", "--workers", "3")
        assert len(added["workers"]) == 3 and added["epoch"] > before["epoch"], (before, added)
        victim = added["workers"][0]["pid"]
        at_kill = list(streams.counts)
        os.kill(victim, signal.SIGKILL)
        assert all(0 < n < UNTIL_STOPPED for n in at_kill), at_kill  # the add and the loss met live streams
        wait_for_line(server, "recovery: lost worker", 60)
        streams.wait_for(max(at_kill) + 5)  # every stream went on past the loss
        assert_prefixes_of_greedy(checkpoint, PROMPTS, streams.stop())
        after = cli(server, "info")
        assert after["epoch"] > added["epoch"] and victim not in [w["pid"] for w in after["workers"]]
        assert [(r["state"], r["epoch"]) for r in after["routers"]] == [("serving", after["epoch"])] * 2, after
        assert not any(" lost: " in line and "router" in line for line in server.lines)  # no stream migrated
        switched = [line for line in server.lines if "router 1 switched to epoch" in line]
        assert any(f"epoch {added['epoch']}" in line for line in switched), switched  # the add reached router 1
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])


def test_routers_added_and_drained_under_streams_keep_every_token(checkpoint):
    """serve (one router) under 32 streams: `scale --routers 3` starts two router actors, which take
    16 streams sent after them; `scale --routers 1` drains both while those stream: their streams go
    on on router 0. Every stream keeps the reference engine's tokens."""
    server = ServerProcess("--model", str(checkpoint), "--workers", "2", "--kv-cache-memory", "64MiB")
    try:
        greedy = [("greedy", pb.GenerateRequest(token_ids=p, sampling=pb.SamplingParams(
            temperature=0, max_new_tokens=UNTIL_STOPPED, ignore_eos=True))) for p in PROMPTS]
        assert [r["router"] for r in cli(server, "info")["routers"]] == [0]
        first = Streams(server.target, greedy)
        first.wait_for(5)
        cli(server, "scale", "--routers", "3")
        info = cli(server, "info")
        assert [(r["router"], r["state"], r["epoch"]) for r in info["routers"]] == [
            (i, "serving", info["epoch"]) for i in range(3)], info["routers"]
        second = Streams(server.target, greedy[:16])
        second.wait_for(5)
        with grpc.insecure_channel(server.target) as channel:
            held = [r.streams for r in pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest()).routers]
        at_drain = list(first.counts) + list(second.counts)
        cli(server, "scale", "--routers", "1")
        assert held[1] > 0 and held[2] > 0, held  # the drained routers held live streams
        assert all(0 < n < UNTIL_STOPPED for n in at_drain), at_drain
        drained = [line for line in server.lines if " drained: " in line]
        assert len(drained) == 2 and all(int(line.split("drained: ")[1].split()[0]) > 0 for line in drained), drained
        first.wait_for(max(at_drain) + 5)  # every stream went on past the drain, on router 0
        second.wait_for(max(at_drain) + 5)
        assert_prefixes_of_greedy(checkpoint, PROMPTS + PROMPTS[:16], first.stop() + second.stop())
        after = cli(server, "info")
        assert [(r["router"], r["state"]) for r in after["routers"]] == [(0, "serving")]
        assert not any(" lost: " in line and "router" in line for line in server.lines)
    finally:
        assert server.stop() == 0, "".join(server.lines[-30:])
