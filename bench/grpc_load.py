"""Gateway overhead: the same load over gRPC (loopback), over the OpenAI-compatible HTTP API
(streaming, loopback) and in-process, same model and engine.

    python bench/grpc_load.py

For 1, 16 and 64 concurrent streams: p50/p99 time to first token (TTFT), p50/p99 inter-token
latency (ITL) and generated tokens/s. The server is `expertmesh serve --workers 0 --http-port 0` in
a subprocess; in-process is the same ServingEngine called directly. Last two lines:
gateway_overhead_ratio_c16=<in-process tokens/s over gRPC tokens/s at 16 streams; 1.0 is no overhead>
http_overhead_ratio_c16=<in-process tokens/s over HTTP tokens/s at 16 streams>
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from expertmesh.core.tokenizer import load_tokenizer  # noqa: E402
from expertmesh.router.engine import Engine  # noqa: E402
from expertmesh.router.requests import validate_request  # noqa: E402
from expertmesh.router.sampling import SamplingParams  # noqa: E402
from expertmesh.router.serving import ServingEngine  # noqa: E402
from expertmesh.v1 import generation_pb2 as pb  # noqa: E402
from expertmesh.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from tests.gateway_server import ServerProcess  # noqa: E402

NEW_TOKENS = 32
CONCURRENCY = (1, 16, 64)


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(n)
    return [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(16, 33))] for _ in range(n)]


def summarize(traces: list[list[float]], starts: list[float], wall: float) -> dict:
    """traces[i]: arrival times of request i's tokens; starts[i]: its send time."""
    ttft = [t[0] - s for t, s in zip(traces, starts)]
    itl = [b - a for t in traces for a, b in zip(t, t[1:])]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"ttft50": q(ttft, 50), "ttft99": q(ttft, 99), "itl50": q(itl, 50), "itl99": q(itl, 99),
            "tok_s": sum(len(t) for t in traces) / wall}


def in_process(serving: ServingEngine, concurrency: int) -> dict:
    batch = prompts(2 * concurrency)
    traces: list[list[float]] = [[] for _ in batch]
    starts = [0.0] * len(batch)
    pending = list(range(len(batch)))
    lock = threading.Lock()
    params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)

    def launch():
        with lock:
            if not pending:
                return
            i = pending.pop(0)
        starts[i] = time.perf_counter()

        def sink(out, i=i):
            traces[i].extend([time.perf_counter()] * len(out.token_ids))
            if out.finish_reason:
                launch()  # keep `concurrency` streams open, as the gRPC clients do
        serving.submit(validate_request(batch[i], params, serving.limits), sink)

    begin = time.perf_counter()
    for _ in range(concurrency):
        launch()
    serving.run(until=lambda: all(len(t) == NEW_TOKENS for t in traces))  # the loop on this thread, as serve
    return summarize(traces, starts, time.perf_counter() - begin)


async def over_grpc(target: str, concurrency: int) -> dict:
    batch = prompts(2 * concurrency)
    traces: list[list[float]] = [[] for _ in batch]
    starts = [0.0] * len(batch)
    queue = list(range(len(batch)))
    sampling = pb.SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def client():
            while queue:
                i = queue.pop(0)
                starts[i] = time.perf_counter()
                async for response in stub.Generate(pb.GenerateRequest(token_ids=batch[i], sampling=sampling)):
                    traces[i].extend([time.perf_counter()] * len(response.token_ids))

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize(traces, starts, time.perf_counter() - begin)


async def over_http(base: str, concurrency: int) -> dict:
    """The same load over the OpenAI-compatible HTTP API, streaming (server-sent events)."""
    import json

    import aiohttp

    batch = prompts(2 * concurrency)
    traces: list[list[float]] = [[] for _ in batch]
    starts = [0.0] * len(batch)
    queue = list(range(len(batch)))
    async with aiohttp.ClientSession() as session:

        async def client():
            while queue:
                i = queue.pop(0)
                starts[i] = time.perf_counter()
                body = {"prompt": batch[i], "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                async with session.post(f"{base}/completions", json=body) as reply:
                    async for line in reply.content:
                        if line.startswith(b"data: {"):
                            chunk = json.loads(line[6:])
                            if chunk["choices"] and chunk["choices"][0]["text"] is not None:
                                traces[i].append(time.perf_counter())

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarize(traces, starts, time.perf_counter() - begin)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=128, intermediate_size=256, num_layers=2)
        server = ServerProcess("--model", str(path), "--workers", "0", "--kv-cache-memory", "256MiB",
                               "--http-port", "0")
        try:
            remote = {c: asyncio.run(over_grpc(server.target, c)) for c in CONCURRENCY}
            deadline = time.monotonic() + 30
            while not any("HTTP (OpenAI API) on" in line for line in server.lines):
                assert time.monotonic() < deadline, "no HTTP address printed"
                time.sleep(0.05)
            base = next(line for line in server.lines if "HTTP (OpenAI API) on" in line).rsplit(" ", 1)[1].strip()
            http = {c: asyncio.run(over_http(base, c)) for c in CONCURRENCY}
        finally:
            server.stop()
        serving = ServingEngine(Engine.local(path, kv_blocks=4096), load_tokenizer(path), own_thread=False)
        try:
            local = {c: in_process(serving, c) for c in CONCURRENCY}
        finally:
            serving.shutdown()
    print("model: tiny Mixtral hidden=128 layers=2 experts=8, reference engine, CPU; "
          f"{NEW_TOKENS} new tokens per request, 2x concurrency requests per level")
    print(f"{'where':>10} {'conc':>4} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'ITL p50 ms':>10} "
          f"{'ITL p99 ms':>10} {'tok/s':>8}")
    for c in CONCURRENCY:
        for where, r in (("in-process", local[c]), ("gRPC", remote[c]), ("HTTP", http[c])):
            print(f"{where:>10} {c:>4} {r['ttft50'] * 1e3:>11.1f} {r['ttft99'] * 1e3:>11.1f} "
                  f"{r['itl50'] * 1e3:>10.1f} {r['itl99'] * 1e3:>10.1f} {r['tok_s']:>8.1f}")
    print(f"gateway_overhead_ratio_c16={local[16]['tok_s'] / remote[16]['tok_s']:.2f} "
          f"(HTTP over gRPC tokens/s: {http[16]['tok_s'] / remote[16]['tok_s']:.2f})")
    print(f"http_overhead_ratio_c16={local[16]['tok_s'] / http[16]['tok_s']:.2f}")


if __name__ == "__main__":
    main()
