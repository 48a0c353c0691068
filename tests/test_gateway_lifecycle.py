"""A TLS server (self-signed certificate) through its life: the CLI client with --tls-ca, the ends of a
generation (EOS, stop token ids) over gRPC, and a graceful shutdown with streams in flight.

The tests run in file order on one server; the last one shuts it down.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time

import grpc
import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess
from tests.helpers import greedy_tokens

PROMPT = [1, 415, 2936, 9060, 285]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a self-signed certificate)")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def checkpoint_and_greedy(tmp_path_factory):
    """A tiny checkpoint whose EOS is the greedy continuation's 5th token, and that continuation."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("eos"), seed=41, init_std=0.1, num_experts=4)
    out = greedy_tokens(Engine.local(path), [PROMPT], 12)[0]
    k = next(i for i in range(4, 12) if out[i] not in out[:i])
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = out[k]
    (path / "config.json").write_text(json.dumps(config))
    return path, out, k


@pytest.fixture(scope="module")
def server(checkpoint_and_greedy, certificate):
    cert, key = certificate
    proc = ServerProcess("--model", str(checkpoint_and_greedy[0]), "--workers", "0", "--kv-cache-memory", "32MiB",
                         "--tls-cert", str(cert), "--tls-key", str(key), "--grace", "20")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server, certificate):
    channel = grpc.secure_channel(server.target, grpc.ssl_channel_credentials(certificate[0].read_bytes()))
    yield pb_grpc.GenerationStub(channel)
    channel.close()


def tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


@pytest.mark.slow
def test_cli_client_reaches_the_tls_server_with_its_ca(server, stub, certificate):
    base = [sys.executable, "-m", "expertmesh", "generate", "--target", server.target, "--json",
            "--max-new-tokens", "6", "--temperature", "0", "Bonjour"]
    result = subprocess.run([*base, "--tls-ca", str(certificate[0])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    via_python = list(stub.Generate(pb.GenerateRequest(prompt="Bonjour", sampling=pb.SamplingParams(
        temperature=0, max_new_tokens=6)), timeout=60))
    assert [t for line in lines for t in line.get("tokenIds", [])] == tokens(via_python)
    plain = subprocess.run(base, capture_output=True, text=True, timeout=60)  # no CA: no connection
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_eos_ends_the_stream_unless_ignored(stub, checkpoint_and_greedy):
    _, out, k = checkpoint_and_greedy
    ended = list(stub.Generate(pb.GenerateRequest(token_ids=PROMPT, sampling=pb.SamplingParams(
        temperature=0, max_new_tokens=12)), timeout=60))
    assert tokens(ended) == out[:k + 1]  # the EOS token itself is the last one sent
    assert ended[-1].finish_reason == pb.FINISH_REASON_EOS
    assert ended[-1].usage.completion_tokens == k + 1
    ignored = list(stub.Generate(pb.GenerateRequest(token_ids=PROMPT, sampling=pb.SamplingParams(
        temperature=0, max_new_tokens=12, ignore_eos=True)), timeout=60))
    assert tokens(ignored) == out and ignored[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_token_ids_end_the_stream(stub, checkpoint_and_greedy):
    _, out, k = checkpoint_and_greedy
    j = next(i for i in range(1, k) if out[i] not in out[:i])
    got = list(stub.Generate(pb.GenerateRequest(token_ids=PROMPT, sampling=pb.SamplingParams(
        temperature=0, max_new_tokens=12, stop_token_ids=[out[j], 31999])), timeout=60))
    assert tokens(got) == out[:j + 1]
    assert got[-1].finish_reason == pb.FINISH_REASON_STOP


def test_graceful_shutdown_finishes_streams_in_flight_and_refuses_new_calls(server, stub):
    n, results, started = 150, {}, threading.Semaphore(0)

    def stream(i: int):
        got = []
        sampling = pb.SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
        try:
            for response in stub.Generate(pb.GenerateRequest(token_ids=[1, 300 + i, 400 + i], sampling=sampling),
                                          timeout=120):
                got.append(response)
                if len(got) == 1:
                    started.release()
            results[i] = got
        except grpc.RpcError as exc:
            results[i] = exc
            started.release()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=60)
    # an HTTP stream twice as long: the drain waits for it too, keeping the gRPC port refusing
    address = next(line for line in server.lines if "HTTP (OpenAI API) on" in line).split("//")[1].split("/")[0]
    connection = http.client.HTTPSConnection(address, timeout=120,  # the server's TLS: self-signed, unchecked
                                             context=ssl._create_unverified_context())
    connection.request("POST", "/v1/completions", json.dumps({
        "prompt": [[1, 500, 600]], "max_tokens": 2 * n, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}),
        {"content-type": "application/json"})
    sse = connection.getresponse()
    assert sse.status == 200 and sse.readline().startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    assert sum(t.is_alive() for t in threads) == 4, "the streams must still be running at the signal"
    deadline = time.monotonic() + 10
    while not any("stopping: finishing in-flight streams" in line for line in server.lines):
        assert time.monotonic() < deadline, "the server did not begin its shutdown"
        time.sleep(0.05)
    refusals = []  # every call during the drain is refused UNAVAILABLE (retryable), none CANCELLED
    while len(refusals) < 5:
        try:
            list(stub.Generate(pb.GenerateRequest(token_ids=[1, 2], sampling=pb.SamplingParams(max_new_tokens=2)),
                               timeout=10))
            raise AssertionError("a call was served during the drain")
        except grpc.RpcError as exc:
            refusals.append(exc.code())
    assert refusals == [grpc.StatusCode.UNAVAILABLE] * 5, refusals
    assert sum(t.is_alive() for t in threads) == 4, "the refusals must land while streams are in flight"
    for t in threads:
        t.join(timeout=60)
    for i in range(4):
        assert not isinstance(results[i], Exception), results[i]
        assert len(tokens(results[i])) == n and results[i][-1].finish_reason == pb.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError) as refused:  # the HTTP stream still runs: still refusing, port open
        list(stub.Generate(pb.GenerateRequest(token_ids=[1, 2], sampling=pb.SamplingParams(max_new_tokens=2)),
                           timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
    events = [line for line in sse.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * n  # the whole stream came
    assert server.proc.wait(timeout=60) == 0
