"""Routers as a fleet: the same load through one router and through two over the same expert
workers, and what a router's loss costs the streams it held, measured through the front door
(`expertmesh serve` in a subprocess, gRPC streams from this process) in one run.

    python bench/routers.py [--streams 64 --tokens 128 --workers 2]
    python bench/routers.py --model     (bench/fleet_model.py: M routers and N workers on paper)

Steady: one `serve --workers W` scaled to one router and to two (`expertmesh scale --routers`),
alternately, `--repeats` times; each time `--streams` greedy streams of `--tokens` tokens at once:
tokens/s (all tokens over the wall time), time to first token (p50, p99), and the experts' rows per
message (rows the workers computed over the layer messages they served: with two routers each
router's step sends its own messages, so a worker gets smaller ones). The ratio is the median of the
pairs'.
Kill, on a fresh two-router server: half the streams (those of router 1) lose their router to a
SIGKILL mid-flight. Each stream's pause is its longest wait for a token from the kill on; the
migrated streams are the `moved` slowest (the gateway logs how many it moved), the others keep
stepping.
The bound is 2 s plus their re-prefill: the tokens they had (prompt + emitted) over this machine's
prefill rate on the surviving router, measured just before the kill.

Last line: two_over_one_router_c64=<x> router_kill_pause_max_s=<y> router_kill_pause_bound_s=<z>
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/gateway_server.py's ServerProcess

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402
from expertmesh.v1 import generation_pb2 as pb  # noqa: E402
from expertmesh.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from tests.gateway_server import ServerProcess, wait_for_line  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def prompt(i: int, length: int = 8) -> list[int]:
    return [1] + [1000 + 37 * i + 11 * j for j in range(length - 1)]


class Load:
    """`n` greedy streams of `tokens` tokens at once; arrival times of every response message."""

    def __init__(self, target: str, n: int, tokens: int, prompt_len: int = 8):
        self.stub = pb_grpc.GenerationStub(grpc.insecure_channel(target))
        self.sent = time.monotonic()
        self.arrivals: list[list[tuple[float, int]]] = [[] for _ in range(n)]
        self.errors: list[Exception] = []
        self.threads = [threading.Thread(target=self._one, args=(i, tokens, prompt_len)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _one(self, i: int, tokens: int, prompt_len: int) -> None:
        request = pb.GenerateRequest(token_ids=prompt(i, prompt_len), sampling=pb.SamplingParams(
            temperature=0, max_new_tokens=tokens, ignore_eos=True))
        try:
            for r in self.stub.Generate(request, timeout=600):
                self.arrivals[i].append((time.monotonic(), len(r.token_ids)))
        except grpc.RpcError as exc:
            self.errors.append(exc)

    def join(self) -> "Load":
        for t in self.threads:
            t.join()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} streams failed: {self.errors[0]}")
        return self

    def tokens_per_s(self) -> float:
        end = max(a[-1][0] for a in self.arrivals)
        return sum(n for a in self.arrivals for _, n in a) / (end - self.sent)

    def ttfts(self) -> list[float]:
        return [a[0][0] - self.sent for a in self.arrivals]

    def counts(self) -> list[int]:
        return [sum(n for _, n in a) for a in list(self.arrivals)]


def cli_info(server: ServerProcess) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "expertmesh", "info", "--json", "--target", server.target],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)


def total_rows(info: dict) -> int:
    return sum(sum(w["rows"].values()) for w in info["workers"])


def serve(path: Path, workers: int, routers: int) -> ServerProcess:
    return ServerProcess("--model", str(path), "--workers", str(workers), "--routers", str(routers),
                         "--kv-cache-memory", "128MiB", "--max-seqs", "128", startup_timeout=300)


def scale_routers(server: ServerProcess, routers: int) -> None:
    subprocess.run([sys.executable, "-m", "expertmesh", "scale", "--routers", str(routers), "--target", server.target],
                   capture_output=True, text=True, timeout=300, check=True)


def steady(server: ServerProcess, args, routers: int) -> dict:
    """One load through `routers` routers of the running server (scaled to that count first)."""
    scale_routers(server, routers)
    Load(server.target, 8, 8).join()  # warm every router's path
    before = cli_info(server)
    load = Load(server.target, args.streams, args.tokens).join()
    after = cli_info(server)
    messages = sum(w["messages"] for w in after["workers"]) - sum(w["messages"] for w in before["workers"])
    ttft = load.ttfts()
    out = {"tokens_per_s": load.tokens_per_s(), "ttft_p50": statistics.median(ttft), "ttft_p99": percentile(ttft, 99),
           "rows_per_message": (total_rows(after) - total_rows(before)) / max(messages, 1)}
    print(f"{routers} router(s), {args.workers} workers, c{args.streams}: {out['tokens_per_s']:.0f} tokens/s, "
          f"TTFT p50 {out['ttft_p50'] * 1e3:.0f} ms p99 {out['ttft_p99'] * 1e3:.0f} ms, "
          f"{out['rows_per_message']:.1f} rows per expert message", flush=True)
    return out


def kill_router(path: Path, args) -> tuple[list[float], float]:
    server = serve(path, args.workers, 2)
    try:
        Load(server.target, 8, 8).join()
        # this machine's prefill rate on one router, with the other idle (as after the kill)
        n, length = 8, 256
        start = time.monotonic()
        Load(server.target, n, 1, prompt_len=length).join()
        prefill_rate = n * length / (time.monotonic() - start)
        victim = cli_info(server)["routers"][1]["pid"]
        load = Load(server.target, args.streams // 2, args.tokens * 4)
        deadline = time.monotonic() + 120
        while min(load.counts()) < args.tokens // 2:
            assert time.monotonic() < deadline, load.counts()
            time.sleep(0.01)
        had = load.counts()
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        line = wait_for_line(server, f"router 1 (pid {victim}) lost", 30)
        moved = int(re.search(r"continuing its (\d+) streams", line).group(1))
        load.join()
        # A stream's pause: its longest wait for a token from the kill on (outputs the gateway had
        # polled before the kill may still arrive just after it; the migration's wait comes after them)
        pauses = sorted(max(b - a for a, b in zip([killed] + [t for t, _ in arr if t > killed],
                                                   [t for t, _ in arr if t > killed]))
                        for arr in load.arrivals)
        migrated = pauses[-moved:] if moved else []
        reprefill = sum(sorted(had)[-moved:]) + moved * 8  # an upper count: the longest streams' tokens
        bound = 2.0 + reprefill / prefill_rate
        print(f"router kill: {moved} of {len(pauses)} streams moved; their pause from the kill to the next token "
              f"p50 {statistics.median(migrated):.3f} s, p99 {percentile(migrated, 99):.3f} s, "
              f"max {max(migrated):.3f} s "
              f"(the others: max {max(pauses[:-moved] or [0]):.3f} s); bound {bound:.2f} s = 2 s + {reprefill} "
              f"tokens re-prefilled at {prefill_rate:.0f} tokens/s", flush=True)
        return migrated, bound
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of one- and two-router loads (default 3)")
    model = parser.add_argument_group("--model: the fleet on paper (bench/fleet_model.py)")
    model.add_argument("--model", action="store_true", help="measure the model's terms, check it, apply it")
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--intermediate", type=int, default=1792)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.model:
        from fleet_model import run

        run(args)
        return
    print(f"machine: {os.cpu_count()} cores; every process of the run shares them", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp), seed=61, init_std=0.1, num_experts=8)
        server = serve(path, args.workers, 2)
        try:  # one and two routers alternately on the same server and workers: this machine drifts
            pairs = [(steady(server, args, 1), steady(server, args, 2)) for _ in range(args.repeats)]
        finally:
            server.stop()
        migrated, bound = kill_router(path, args)
    ratios = [two["tokens_per_s"] / one["tokens_per_s"] for one, two in pairs]
    ratio = statistics.median(ratios)
    print(f"two routers over one: {' / '.join(f'{r:.2f}' for r in ratios)}x tokens/s at c{args.streams} "
          f"(median {ratio:.2f}); rows per expert message {pairs[0][0]['rows_per_message']:.1f} -> "
          f"{pairs[0][1]['rows_per_message']:.1f}")
    print(f"two_over_one_router_c{args.streams}={ratio:.2f} router_kill_pause_max_s={max(migrated):.3f} "
          f"router_kill_pause_bound_s={bound:.2f}")


if __name__ == "__main__":
    main()
