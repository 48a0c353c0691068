"""Decode step times while the cluster changes, against steady state, measured in one run.

    python bench/elastic.py [--streams 16 --hidden 256 --layers 4]

A serving loop runs `--streams` greedy streams on an expert cluster of 2 CPU workers (local Ray,
gloo) while, in turn: nothing happens (steady), a replica of expert 1 is added in every layer
(`scale_replicas`), a third worker is added (`scale_workers`, a new epoch), and a worker is killed
(SIGKILL). Every step's time is recorded; a phase is the steps that started while its change ran.
Recovery time is from the kill to the end of the first step that completes after the failure
the kill caused (the interrupted step, run again in the next epoch).
Last line: p99_step_during_change_over_steady=<x> recovery_after_kill_s=<y>
(x: the worse of the replica add's and the worker add's p99 step over the steady p99).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.requests import validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=4.0)
    args = parser.parse_args()
    ensure_ray(num_cpus=8)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                     num_layers=args.layers, num_heads=8, num_kv_heads=2, head_dim=args.hidden // 8)
        cluster = ExpertCluster(path, 2, settings=ServingConfig(collective_timeout_s=20), kv_blocks=4096)
        steps: list[tuple[float, float]] = []  # (start, seconds) of every completed step
        failures: list[float] = []  # when a step failed
        step = cluster.engine.step

        def timed(*a, **kw):
            start = time.monotonic()
            try:
                out = step(*a, **kw)
            except Exception:
                failures.append(time.monotonic())
                raise
            steps.append((start, time.monotonic() - start))
            return out

        cluster.engine.step = timed
        serving = ServingEngine(cluster.engine, load_tokenizer(path))
        params = SamplingParams(temperature=0, max_new_tokens=3000, ignore_eos=True)
        for i in range(args.streams):
            serving.submit(validate_request([1, 100 + i, 200 + i], params, serving.limits), lambda out: None)
        phases: dict[str, tuple[float, float]] = {}
        try:
            time.sleep(2.0)  # prefill and warm-up
            start = time.monotonic()
            time.sleep(args.steady_s)
            phases["steady"] = (start, time.monotonic())
            for name, change in (("no-op change", lambda: cluster.scale_replicas("")),
                                 ("replica add", lambda: cluster.scale_replicas("*:1x2")),
                                 ("worker add", lambda: cluster.scale_workers(3))):
                start = time.monotonic()
                change()
                phases[name] = (start, time.monotonic())
                time.sleep(1.0)
            victim = cluster.workers[0]
            killed = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while not failures or not any(s + d > failures[0] for s, d in steps[-3:]):
                assert time.monotonic() < deadline, "no step completed after the kill"
                time.sleep(0.001)
            # from the kill to the first step completed after the failure it caused
            recovery = min(s + d for s, d in steps if s + d > failures[0]) - killed
            time.sleep(1.0)
            phases["worker death"] = (killed, killed + recovery)
        finally:
            serving.shutdown()
            cluster.shutdown()
    print(f"model: hidden={args.hidden} layers={args.layers} experts=8 top2 fp32; {args.streams} streams; "
          "2 CPU workers on local Ray (gloo), 3 after the worker add")
    print(f"{'phase':>13} {'steps':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'seconds':>7}")
    table = {}
    for name, (start, end) in phases.items():
        times = [d * 1e3 for s, d in steps if start <= s <= end] or [0.0]
        table[name] = times
        print(f"{name:>13} {len(times):>5} {statistics.median(times):>7.1f} {percentile(times, 99):>7.1f} "
              f"{max(times):>7.1f} {end - start:>7.2f}")
    steady = percentile(table["steady"], 99)
    worst = max(percentile(table["replica add"], 99), percentile(table["worker add"], 99))
    longest = max(max(table["replica add"]), max(table["worker add"]))
    print(f"longest step during a change over steady p99: {longest / steady:.2f}")
    print(f"p99_step_during_change_over_steady={worst / steady:.2f} recovery_after_kill_s={recovery:.2f}")


if __name__ == "__main__":
    main()
