"""Elastic serving at real expert sizes: what streams see while the cluster changes, against steady
state, measured in one run.

    python bench/elastic.py [--expert-mb 64 --streams 16]

Each expert's three matrices are sized to --expert-mb MB (64 MB x 8 experts x 4 layers: 2 GB of
experts per copy; hidden 1024, fp32). Streams run greedy decoding through the serving loop; every
token's arrival is recorded, and a phase's "steps" are the gaps between consecutive tokens of one
stream (what a client sees, recovery included).

Cluster A, 3 workers, --redundancy 2, --standby-workers 1: steady; a replica add (expert 1 on every
worker, every layer); a worker add (taken from standby); steady again with 4 workers (the kills'
baseline: the adds' is the 3-worker steady); a worker SIGKILL (every expert has a copy elsewhere:
covered); a SIGSTOP (found by heartbeats). A kill's or stop's window runs until the cluster is whole
again (the lost place filled, its copies loaded, and a new standby worker started, all in the
background).
Cluster B, 2 workers, --redundancy 1: a worker SIGKILL whose experts have no other copy; the streams
wait for those to load: resume_uncovered_s is the longest pause a stream saw, and its bound is those
experts' bytes over the load bandwidth measured on this machine in this run (the same experts loaded
onto the same survivor, from the checkpoint in the page cache, before the streams start), plus 1 s.

Last line: p99_kill_covered_over_steady=<x> stall_detect_s=<y> p99_add_over_steady=<z>
resume_uncovered_s=<w> resume_uncovered_bound_s=<v>
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

from machine import machine  # bench/machine.py

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.heap import use_huge_pages
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Streams:
    """`n` endless greedy streams; `arrivals` holds stream 0's token times (all streams step together)."""

    def __init__(self, cluster: ExpertCluster, path, n: int):
        self.arrivals: list[float] = []
        self.traces: dict[str, list[tuple[float, float]]] = {}
        self.serving = ServingEngine(cluster.engine, load_tokenizer(path), control=cluster)
        params = SamplingParams(temperature=0, max_new_tokens=4000, ignore_eos=True)
        for i in range(n):
            sink = (lambda out: self.arrivals.append(time.monotonic())) if i == 0 else (lambda out: None)
            self.serving.submit(validate_request([1, 100 + i, 200 + i], params, self.serving.limits), sink)

    def gaps(self, start: float, end: float, name: str = "", show: bool = False) -> list[float]:
        """Gaps (ms) between tokens that arrived in [start, end] and the token before each, kept in
        `traces[name]` as (arrival s from `start`, gap ms) for --json; `show`: print them
        (--show-steps)."""
        times = list(self.arrivals)
        pairs = [(b - start, (b - a) * 1e3) for a, b in zip(times, times[1:]) if start <= b <= end]
        if name:
            self.traces[name] = pairs
        if show:
            print(f"  {name}: " + " ".join(f"{t:.2f}s:{gap:.0f}" for t, gap in pairs), flush=True)
        return [gap for _, gap in pairs]

    def first_after(self, t: float, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            later = [a for a in list(self.arrivals) if a > t]
            if later:
                return later[0]
            time.sleep(0.001)
        raise TimeoutError("no token after the event")


def wait_epoch_change(cluster: ExpertCluster, epoch: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while cluster.epoch == epoch:
        assert time.monotonic() < deadline, "the epoch never moved"
        time.sleep(0.001)
    return time.monotonic()


def evict(path) -> None:
    """Drop the checkpoint's files from the page cache: the next read comes from the disk."""
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def load_bandwidth(cluster: ExpertCluster, expert_bytes: int, path, rounds: int = 2) -> dict[str, float]:
    """Bytes/s at which worker 0 loads the experts that worker 1 holds and it does not (what the
    uncovered kill will make it load, all of them at once, then drops them again): read from the
    checkpoint the way a recovery does (urgent: nothing serves meanwhile), with its files in the page
    cache and evicted from it first (cold), and copied from worker 1's memory; the best of `rounds`,
    alternating."""
    import ray

    held = set(cluster.plan.worker_pairs(0))
    pairs = [p for p in sorted(cluster.plan.worker_pairs(1)) if p not in held]
    loader, peer = cluster.workers[0].actor, cluster.workers[1].actor
    best = {"checkpoint": 0.0, "checkpoint, cold": 0.0, "peer": 0.0}
    for _ in range(rounds):
        for source, peers in (("checkpoint", None), ("checkpoint, cold", None), ("peer", [(peer, pairs)])):
            if source == "checkpoint, cold":
                evict(path)
            start = time.monotonic()
            ray.get(loader.load.remote(pairs, urgent=True, peers=peers))
            best[source] = max(best[source], len(pairs) * expert_bytes / (time.monotonic() - start))
            ray.get(loader.drop.remote(pairs))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expert-mb", type=float, default=64.0, help="MB of each expert's three matrices")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=6.0)
    parser.add_argument("--show-steps", action="store_true", help="print every step of each phase (arrival s:gap ms)")
    parser.add_argument("--json", metavar="PATH", help="also write each phase's steps (arrival s, gap ms) and the "
                        "event times as JSON (bench/plots.py draws them)")
    args = parser.parse_args()
    use_huge_pages()  # as the CLI does, before torch allocates a weight (core/heap.py)
    inter = max(int(args.expert_mb * 1e6 / (3 * args.hidden * 4)), 1)
    expert_bytes = 3 * args.hidden * inter * 4
    ensure_ray(num_cpus=16)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        path = write_tiny_checkpoint(tmp, hidden_size=args.hidden, intermediate_size=inter, num_layers=args.layers,
                                     num_heads=16, num_kv_heads=4, head_dim=args.hidden // 16,
                                     max_shard_bytes=1 << 30)
        print(f"checkpoint: {args.layers} layers x 8 experts of {expert_bytes / 1e6:.1f} MB (hidden {args.hidden}, "
              f"intermediate {inter}, fp32) written in {time.monotonic() - start:.1f}s", flush=True)
        table: dict[str, list[float]] = {}
        marks: dict[str, float] = {}
        traces: dict[str, list[tuple[float, float]]] = {}

        settings = ServingConfig(redundancy=2, standby_workers=1, kv_cache_memory="256MiB")
        cluster = ExpertCluster(path, 3, settings=settings, kv_blocks=2048)
        while not cluster.standby.handles():
            time.sleep(0.1)
        streams = Streams(cluster, path, args.streams)
        try:
            streams.first_after(time.monotonic())
            time.sleep(2.0)  # past prefill
            t0 = time.monotonic()
            time.sleep(args.steady_s)
            table["steady"] = streams.gaps(t0, time.monotonic(), "steady", args.show_steps)
            for name, change in (("replica add", lambda: cluster.scale_replicas("*:1x3")),
                                 ("worker add", lambda: cluster.scale_workers(4))):
                t0 = time.monotonic()
                change()
                marks[name] = time.monotonic() - t0
                table[name] = streams.gaps(t0, time.monotonic(), name, args.show_steps)
                time.sleep(1.0)
            while not cluster.standby.handles():  # the worker add took it: a new one starts in the background
                time.sleep(0.1)
            time.sleep(1.0)
            t0 = time.monotonic()
            time.sleep(args.steady_s)  # the kills' baseline: the same cluster, nothing happening
            table["steady, 4 workers"] = streams.gaps(t0, time.monotonic(), "steady, 4 workers",
                                                      args.show_steps)
            for name, sig in (("kill, covered", signal.SIGKILL), ("stop, covered", signal.SIGSTOP)):
                victim, epoch = cluster.workers[-1], cluster.epoch
                t0 = time.monotonic()
                os.kill(victim.pid, sig)
                moved = wait_epoch_change(cluster, epoch)
                marks[name] = moved - t0
                # the window runs until the cluster is whole again: workers, copies and standby
                while len(cluster.workers) < 4 or not cluster.standby.handles():
                    time.sleep(0.1)
                time.sleep(1.0)
                table[name] = streams.gaps(t0, time.monotonic(), name, args.show_steps)
                table[f"{name}, 2 s"] = streams.gaps(t0, moved + 2.0)  # the event alone, before the restore
        finally:
            traces.update(streams.traces)
            streams.serving.shutdown()
            cluster.shutdown()

        cluster = ExpertCluster(path, 2, settings=ServingConfig(kv_cache_memory="256MiB"), kv_blocks=2048)
        rates = load_bandwidth(cluster, expert_bytes, path)
        bandwidth = rates["checkpoint"]
        streams = Streams(cluster, path, args.streams)
        try:
            streams.first_after(time.monotonic())
            time.sleep(2.0)
            victim = cluster.workers[1]
            missing = sum(len(ws) == 1 and 1 in ws for ws in cluster.plan.holders.values())
            epoch, t0 = cluster.epoch, time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            streams.first_after(wait_epoch_change(cluster, epoch))
            time.sleep(1.0)
            table["kill, not covered"] = streams.gaps(t0, time.monotonic(), "kill, not covered",
                                                      args.show_steps)
            marks["kill, not covered"] = max(table["kill, not covered"]) / 1e3  # the pause streams saw
        finally:
            traces.update(streams.traces)
            streams.serving.shutdown()
            cluster.shutdown()

    print(f"{args.streams} streams, CPU workers on local Ray (gloo); A: 3 workers, redundancy 2, 1 standby; "
          "B: 2 workers, redundancy 1")
    print(f"{'phase':>18} {'steps':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'event s':>7}")
    for name, gaps in table.items():
        gaps = gaps or [0.0]
        print(f"{name:>18} {len(gaps):>5} {statistics.median(gaps):>7.1f} {percentile(gaps, 90):>7.1f} "
              f"{percentile(gaps, 99):>7.1f} {max(gaps):>7.1f} {marks.get(name, 0.0):>7.2f}")
    steady, steady4 = percentile(table["steady"], 99), percentile(table["steady, 4 workers"], 99)
    covered = percentile(table["kill, covered"], 99)
    add = max(percentile(table["replica add"], 99), percentile(table["worker add"], 99))
    bound = missing * expert_bytes / bandwidth + 1.0
    print(f"load bandwidth from the checkpoint {bandwidth / 1e9:.2f} GB/s ({rates['checkpoint, cold'] / 1e9:.2f} "
          f"evicted from the page cache), from a peer's memory {rates['peer'] / 1e9:.2f} GB/s (peer over checkpoint "
          f"{rates['peer'] / bandwidth:.2f}x, over cold {rates['peer'] / rates['checkpoint, cold']:.2f}x); uncovered "
          f"kill: {missing} experts ({missing * expert_bytes / 1e9:.2f} GB) to load, from the checkpoint")
    print(f"p90 of the covered kill's window over steady's (4 workers): "
          f"{percentile(table['kill, covered'], 90) / percentile(table['steady, 4 workers'], 90):.2f}")
    print(f"longest covered-kill step over steady p99 (4 workers): {max(table['kill, covered']) / steady4:.2f}; p99 "
          f"in the 2 s after the kill over it: {percentile(table['kill, covered, 2 s'], 99) / steady4:.2f}; over the "
          f"3-worker steady p99: {covered / steady:.2f}")
    print(f"covered SIGSTOP: longest step {max(table['stop, covered']):.0f} ms, over steady p99 (4 workers) "
          f"{max(table['stop, covered']) / steady4:.2f}; p99 in the 2 s after the stop over it: "
          f"{percentile(table['stop, covered, 2 s'], 99) / steady4:.2f} (a late worker's rows go to the other copies "
          "before heartbeats fence it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python bench/elastic.py " + " ".join(sys.argv[1:]), "machine": machine(),
                       "streams": args.streams, "expert_mb": args.expert_mb, "events_s": marks,
                       "phases": {name: [[round(t, 4), round(g, 2)] for t, g in pairs]
                                  for name, pairs in traces.items()}}, f)
    print(f"p99_kill_covered_over_steady={covered / steady4:.2f} stall_detect_s={marks['stop, covered']:.2f} "
          f"p99_add_over_steady={add / steady:.2f} resume_uncovered_s={marks['kill, not covered']:.2f} "
          f"resume_uncovered_bound_s={bound:.2f}")


if __name__ == "__main__":
    main()
