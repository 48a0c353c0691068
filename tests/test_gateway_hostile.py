"""The gateway as a hostile client meets it: property-based requests over every field of every
method, raw bytes on every method path, expensive requests beside a canary stream, and two clients
that share a request_id. A real `expertmesh serve` on a loopback port.

After everything, the server must still be whole: the same greedy tokens as before, SERVING, and
every KV block back in the pool.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.requests import MAX_CHAT_MESSAGES, MAX_STOP_CHARS, MAX_STOP_STRINGS
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess
from tests.helpers import wait_until_idle

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED}
TRAILER_BYTES = 8 << 10  # details must fit gRPC's 16 KiB trailer with room to spare
CONTEXT = 4096  # the tiny checkpoint's
MAX_PROMPT_CHARS = 16 * CONTEXT  # router/requests.py: CHARS_PER_CONTEXT_TOKEN x the context
PROBE = pb.GenerateRequest(token_ids=[1, 415, 2936, 9060], sampling=pb.SamplingParams(
    temperature=0, max_new_tokens=12, ignore_eos=True))
HYPOTHESIS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("hostile"), seed=51, num_experts=4)
    proc = ServerProcess("--model", str(path), "--workers", "0", "--kv-cache-memory", "64MiB", "--max-queue", "64")
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-30:])


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20),
                                                      ("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def baseline(stub):
    """The probe's greedy tokens on the untouched server."""
    return [t for r in stub.Generate(PROBE, timeout=60) for t in r.token_ids]


def assert_client_error(exc: grpc.RpcError) -> None:
    assert exc.code() in CLIENT_ERRORS, (exc.code(), (exc.details() or "")[:300])
    assert len((exc.details() or "").encode()) < TRAILER_BYTES


def assert_whole(stub, channel, baseline) -> None:
    """Same greedy tokens, SERVING, and (once the cancelled requests have left) every block free."""
    assert [t for r in stub.Generate(PROBE, timeout=60) for t in r.token_ids] == baseline
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    wait_until_idle(stub)


# ---- strategies: valid requests with one field (or none, or several) hostile -----------------------
# A request whose other fields are all valid reaches the code behind the checks: that is what finds a
# check that is missing. Which field is hostile is drawn too.

hostile_floats = st.one_of(st.floats(width=32), st.sampled_from(
    [0.0, -0.0, 1e-45, 1e-40, 1e-38, 1e-30, 1e-3, 9.99e-3, 100.5, 1e38, float("nan"), float("inf"), -1.0]),
    st.sampled_from([1e-45, 1e-40, float("nan"), float("inf")]))
u32 = st.one_of(st.integers(0, 2 ** 32 - 1), st.sampled_from([0, 1, 2, 20, 21, 4095, 4096, 31999, 32000, 2 ** 32 - 1]))
texts = st.one_of(st.text(max_size=64), st.sampled_from(["", "a" * 600, "\u00e9" * 513, "\x00", "</s>", "<s>"]))
F32_001 = 0.009999999776482582  # 0.01 as a float32: what a client sending 0.01 really sends

FIELDS = {  # name -> (valid values, hostile values)
    "temperature": (st.one_of(st.just(0.0), st.floats(F32_001, 100.0, width=32)), hostile_floats),
    "top_p": (st.floats(F32_001, 1.0, width=32), hostile_floats),
    "min_p": (st.floats(0.0, 1.0, width=32), hostile_floats),
    "repetition_penalty": (st.floats(F32_001, 100.0, width=32), hostile_floats),
    "presence_penalty": (st.floats(-2.0, 2.0, width=32), hostile_floats),
    "frequency_penalty": (st.floats(-2.0, 2.0, width=32), hostile_floats),
    "top_k": (st.integers(0, 100), u32),
    "max_new_tokens": (st.integers(1, 16), u32),
    "logprobs": (st.integers(0, 20), u32),
    "seed": (st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1)),
    "stop": (st.lists(st.text(min_size=1, max_size=8), max_size=3),
             st.one_of(st.lists(texts, max_size=4), st.just(["x"] * (MAX_STOP_STRINGS + 1)))),
    "stop_token_ids": (st.lists(st.integers(0, 31999), max_size=3),
                       st.one_of(st.lists(u32, max_size=4), st.just(list(range(40000))))),
    "request_id": (st.text(max_size=16), st.one_of(texts, st.just("r" * 100000))),
    "prompt": (st.text(min_size=1, max_size=200), st.just("z" * (MAX_PROMPT_CHARS + 1))),
    "token_ids": (st.lists(st.integers(0, 31999), min_size=1, max_size=40), st.lists(u32, max_size=40)),
    "roles": (st.just(["user", "assistant"] * 3),
              st.lists(st.one_of(st.sampled_from(["user", "assistant", "system"]), texts), max_size=6)),
    "content": (st.text(max_size=64), texts),
    "kind": (st.sampled_from(["prompt", "token_ids", "messages"]), st.sampled_from(["none", "several"])),
    "prompt_logprobs": (st.integers(0, 20), u32),
    "cache_salt": (st.text(max_size=16), st.one_of(texts, st.just("s" * 300))),
    "structured": (st.one_of(st.none(), st.just(pb.StructuredOutput(json_object=True)),
                             st.just(pb.StructuredOutput(regex="[a-z]{1,3}")),
                             st.just(pb.StructuredOutput(choice=pb.Choices(values=["yes", "no"])))),
                   st.one_of(st.builds(lambda t: pb.StructuredOutput(json_schema=t), texts),
                             st.builds(lambda t: pb.StructuredOutput(regex=t), texts),
                             st.builds(lambda v: pb.StructuredOutput(choice=pb.Choices(values=v)), st.lists(texts)),
                             st.just(pb.StructuredOutput(json_schema="x" * 70000)))),
    # this server's tokenizer (v1) has no tool format: any tool field is refused (tests/test_tools.py
    # has a v3 model's)
    "tools": (st.just([]), st.lists(st.builds(lambda n, d, p: pb.Tool(name=n, description=d, parameters=p),
                                              texts, texts, texts), min_size=1, max_size=3)),
    "tool_choice": (st.just(""), texts),
    "tool_calls": (st.just([]), st.lists(st.builds(lambda i, n, a: pb.ToolCall(id=i, name=n, arguments=a),
                                                   texts, texts, texts), min_size=1, max_size=2)),
    "tool_call_id": (st.just(""), texts),
}


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    bad = set(draw(st.one_of(st.lists(st.sampled_from(sorted(FIELDS)), max_size=1),
                             st.lists(st.sampled_from(sorted(FIELDS)), max_size=4))))

    def value(name):
        valid, hostile = FIELDS[name]
        return draw(hostile if name in bad else valid)

    s = pb.SamplingParams(max_new_tokens=8)
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "top_k", "max_new_tokens", "logprobs", "seed", "prompt_logprobs"):
        if name in bad or draw(st.booleans()):
            setattr(s, name, value(name))
    s.stop.extend(value("stop"))
    s.stop_token_ids.extend(value("stop_token_ids"))
    s.ignore_eos = draw(st.booleans())
    request = pb.GenerateRequest(request_id=value("request_id"), sampling=s, cache_salt=value("cache_salt"))
    structured = value("structured") if "structured" in bad or draw(st.booleans()) else None
    if structured is not None:
        request.structured.CopyFrom(structured)
    request.tools.extend(value("tools"))
    request.tool_choice = value("tool_choice")
    if draw(st.booleans()):
        request.parallel_tool_calls = draw(st.booleans())
    kind = value("kind")
    if kind in ("prompt", "several"):
        request.prompt = value("prompt")
    if kind in ("token_ids", "several"):
        request.token_ids.extend(value("token_ids"))
    if kind in ("messages", "several"):
        for role in value("roles")[:draw(st.integers(1, 5))]:
            request.messages.append(pb.ChatMessage(role=role, content=value("content"), tool_calls=value("tool_calls"),
                                                   tool_call_id=value("tool_call_id")))
    return request


def end_stream(call) -> None:
    """A streaming call ends OK, or with a client error; one still going after 4 chunks is
    cancelled (a client's right), which must end nothing but this call."""
    try:
        for i, _ in enumerate(call):
            if i == 3:
                call.cancel()
                return
    except grpc.RpcError as exc:
        assert_client_error(exc)


def run_generate(stub, request) -> None:
    end_stream(stub.Generate(request, timeout=60))


KNOWN = [  # the examples that once took the server down, or reached another client, always tried
    pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(temperature=1e-40, max_new_tokens=4)),
    pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(repetition_penalty=1e-40, max_new_tokens=4)),
    pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(stop=["a" * 200000], max_new_tokens=4)),
    pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(stop_token_ids=[40000] * 300000)),
    pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(stop=["ab"] * 700000)),
    pb.GenerateRequest(prompt="p" * 3_900_000),
]


@given(request=generate_requests())
@HYPOTHESIS
@example(request=KNOWN[0])
@example(request=KNOWN[1])
@example(request=KNOWN[2])
@example(request=KNOWN[3])
@example(request=KNOWN[4])
@example(request=KNOWN[5])
def test_generate_with_any_field_ends_ok_or_with_a_client_error(stub, channel, baseline, request):
    run_generate(stub, request)


@given(text=st.one_of(st.text(max_size=200), texts, st.just("y" * (MAX_PROMPT_CHARS + 1))),
       messages=st.lists(st.tuples(texts, texts), max_size=4), both=st.booleans())
@settings(HYPOTHESIS, max_examples=60)
def test_tokenize_with_any_field(stub, text, messages, both):
    request = pb.TokenizeRequest(text=text if (both or not messages) else "")
    request.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
    try:
        stub.Tokenize(request, timeout=30)
    except grpc.RpcError as exc:
        assert_client_error(exc)


def test_the_server_is_whole_after_the_property_runs(stub, channel, baseline):
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10)
    assert_whole(stub, channel, baseline)


METHODS = {  # path -> kind
    "/expertmesh.v1.Generation/Generate": "unary_stream",
    "/expertmesh.v1.Generation/GetModelInfo": "unary_unary",
    "/expertmesh.v1.Generation/Tokenize": "unary_unary",
    "/expertmesh.v1.Generation/GetServerStats": "unary_unary",
    "/grpc.health.v1.Health/Check": "unary_unary",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
}
JUNK = [b"\xff" * 16, b"\x12\x02\xff\xfe", b"\x0a\x05abc", b"\x08" + b"\x80" * 11, b"\x1a\xff\xff\xff\xff\x0f",
        b"\x2a\x03\x0a\x01"]


@given(data=st.one_of(st.binary(max_size=512), st.sampled_from(JUNK)), path=st.sampled_from(sorted(METHODS)))
@settings(HYPOTHESIS, max_examples=150)
@example(data=b"\x12\x02\xff\xfe", path="/grpc.health.v1.Health/Check")  # invalid UTF-8 in a string
@example(data=b"\xff" * 16, path="/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
def test_raw_bytes_on_every_method_path(channel, data, path):
    """Bytes that do not decode answer INVALID_ARGUMENT; bytes that happen to decode are a real
    request and end OK or with a client error."""
    kind = METHODS[path]
    if kind == "unary_stream":
        end_stream(channel.unary_stream(path)(data, timeout=30))
    elif kind == "stream_stream":
        end_stream(channel.stream_stream(path)(iter([data]), timeout=30))
    else:
        try:
            channel.unary_unary(path)(data, timeout=30)
        except grpc.RpcError as exc:
            assert_client_error(exc)


def test_the_server_is_whole_after_raw_bytes(stub, channel, baseline):
    assert_whole(stub, channel, baseline)


def test_a_canary_keeps_its_pace_while_the_largest_requests_arrive(stub, channel, baseline):
    """Four at a time: the largest prompt the server tokenises, a prompt far past it, the largest
    stop list, the largest chat. The canary's tokens keep coming (no gap over 1 s) and health
    answers within 1 s throughout."""
    arrivals, stop = [], threading.Event()
    health_latency = []

    def canary():
        for _ in stub.Generate(pb.GenerateRequest(token_ids=[1, 2, 3], sampling=pb.SamplingParams(
                temperature=0, max_new_tokens=600, ignore_eos=True)), timeout=120):
            arrivals.append(time.monotonic())
        stop.set()

    def probe_health():
        health = health_pb2_grpc.HealthStub(channel)
        while not stop.is_set():
            start = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            health_latency.append(time.monotonic() - start)
            time.sleep(0.1)

    words = "the quick brown fox jumps over a lazy dog "
    largest_prompt = (words * (MAX_PROMPT_CHARS // len(words) + 1))[:MAX_PROMPT_CHARS]
    per_message = MAX_PROMPT_CHARS // MAX_CHAT_MESSAGES
    chat = [pb.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=largest_prompt[:per_message])
            for i in range(MAX_CHAT_MESSAGES - 1)]
    heavy = [
        pb.GenerateRequest(prompt=largest_prompt, sampling=pb.SamplingParams(max_new_tokens=4)),
        pb.GenerateRequest(prompt=largest_prompt * 50, sampling=pb.SamplingParams()),  # 3.2 MB: refused unread
        pb.GenerateRequest(token_ids=[1, 5, 6], sampling=pb.SamplingParams(
            temperature=0, max_new_tokens=200, ignore_eos=True,
            stop=[("%03d" % i) * (MAX_STOP_CHARS // 3) for i in range(MAX_STOP_STRINGS)])),
        pb.GenerateRequest(messages=chat, sampling=pb.SamplingParams(max_new_tokens=4)),
    ]
    threads = [threading.Thread(target=canary), threading.Thread(target=probe_health)]
    for t in threads:
        t.start()
    while len(arrivals) < 20:
        time.sleep(0.01)
    for _ in range(3):  # rounds of four at a time
        workers = [threading.Thread(target=run_generate, args=(stub, request)) for request in heavy]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
    for t in threads:
        t.join(timeout=120)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert len(arrivals) == 600
    assert max(gaps) < 1.0, f"the canary paused {max(gaps):.2f}s"
    assert max(health_latency) < 1.0, f"a health check took {max(health_latency):.2f}s"
    assert_whole(stub, channel, baseline)


def test_clients_sharing_a_request_id_cannot_touch_each_other(stub, channel, baseline):
    shared = "same-id"
    sampling = pb.SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    victim = stub.Generate(pb.GenerateRequest(request_id=shared, token_ids=[1, 7, 8], sampling=sampling), timeout=120)
    first = next(victim)
    intruder = stub.Generate(pb.GenerateRequest(request_id=shared, token_ids=[1, 9, 10], sampling=sampling),
                             timeout=120)
    next(intruder)
    intruder.cancel()  # ends the intruder's own request, and only that one
    rest = list(victim)
    responses = [first, *rest]
    assert sum(len(r.token_ids) for r in responses) == 200
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert {r.request_id for r in responses} == {shared}  # the client's id is echoed, not trusted
    assert_whole(stub, channel, baseline)  # the cancelled intruder freed its blocks
