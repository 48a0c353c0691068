"""Expert data path on a local Ray cluster: dispatch+combine latency, decode step vs the reference
engine, and ping-pong on vs off, all measured in one run.

    python bench/dispatch.py [--hidden 512 --intermediate 1792 --layers 4 --steps 10]

Last line: distributed_over_reference_step_ratio_b64=<x> pingpong_on_over_off=<y>
(x: decode step at batch 64, 2 workers, ping-pong off, over the reference engine's;
 y: the same decode step with ping-pong forced on over off. Prefill on/off is printed above it.)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from raw_steps import release, step

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine, Sequence

BATCHES = (1, 16, 64)


def decode_step_ms(engine: Engine, batch: int, steps: int, prompt_len: int = 32) -> float:
    """Median time of one decode step with `batch` running sequences."""
    gen = torch.Generator().manual_seed(batch)
    seqs = [Sequence(torch.randint(3, 32000, (prompt_len,), generator=gen).tolist()) for _ in range(batch)]
    step(engine, seqs)  # prefill
    times = []
    try:
        for _ in range(steps + 1):
            for s in seqs:
                s.token_ids.append(7)
            start = time.perf_counter()
            step(engine, seqs)
            times.append(time.perf_counter() - start)
    finally:
        release(engine, seqs)
    return statistics.median(times[1:]) * 1e3


def prefill_ms(engine: Engine, seqs: int, prompt_len: int, repeats: int = 3) -> float:
    """Median time of one prefill step of `seqs` prompts of `prompt_len` tokens."""
    times = []
    for _ in range(repeats + 1):
        batch = [Sequence(list(range(3, 3 + prompt_len))) for _ in range(seqs)]
        start = time.perf_counter()
        step(engine, batch)
        times.append(time.perf_counter() - start)
        release(engine, batch)
    return statistics.median(times[1:]) * 1e3


def dispatch_ms(cluster: ExpertCluster, tokens: int, repeats: int) -> float:
    """Median dispatch + combine time of one layer for `tokens` rows."""
    c = cluster.engine.config
    x = torch.randn(tokens, c.hidden_size)
    logits = torch.randn(tokens, c.num_experts)
    weights, ids = torch.topk(logits.softmax(-1), c.experts_per_token)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        cluster.dispatcher.run(0, x, weights / weights.sum(-1, keepdim=True), ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1792)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    ensure_ray(num_cpus=8)
    results, prefill = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                     num_layers=args.layers, num_heads=8, num_kv_heads=2,
                                     head_dim=args.hidden // 8)
        reference = Engine.local(path)
        ref_ms = {b: decode_step_ms(reference, b, args.steps) for b in BATCHES}
        del reference
        for workers in (2, 4):
            with ExpertCluster(path, workers) as cluster:
                for b in BATCHES:
                    cluster.engine.pingpong = "on"
                    on = decode_step_ms(cluster.engine, b, args.steps)
                    cluster.engine.pingpong = "off"
                    off = decode_step_ms(cluster.engine, b, args.steps)
                    results[(workers, b)] = (dispatch_ms(cluster, b, args.steps * 2), on, off)
                cluster.engine.pingpong = "on"
                prefill_on = prefill_ms(cluster.engine, 16, 128)
                cluster.engine.pingpong = "off"
                prefill[workers] = (prefill_on, prefill_ms(cluster.engine, 16, 128))
    print(f"model: hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
          f"experts=8 top2, fp32, CPU (gloo), torch threads {torch.get_num_threads()}")
    print(f"{'workers':>7} {'batch':>5} {'trip/layer ms':>13} {'ref step ms':>11} {'dist on ms':>10} "
          f"{'dist off ms':>11} {'off/ref':>8} {'on/off':>6}")
    for (workers, b), (d, on, off) in sorted(results.items()):
        print(f"{workers:>7} {b:>5} {d:>13.2f} {ref_ms[b]:>11.2f} {on:>10.2f} {off:>11.2f} "
              f"{off / ref_ms[b]:>8.2f} {on / off:>6.2f}")
    for workers, (on, off) in sorted(prefill.items()):
        print(f"prefill 16x128 tokens, {workers} workers: ping-pong on {on:.1f} ms, off {off:.1f} ms, "
              f"on/off {on / off:.2f}")
    d, on, off = results[(2, 64)]
    print(f"distributed_over_reference_step_ratio_b64={off / ref_ms[64]:.2f} "
          f"pingpong_on_over_off={on / off:.2f}")


if __name__ == "__main__":
    main()
