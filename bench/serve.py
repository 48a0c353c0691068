"""Serving throughput, in-process (no network): this engine with continuous batching against
transformers' generate over the same requests in static, left-padded batches.

    python bench/serve.py [--workers 2 --repeats 3]

Requests have mixed prompt (8-64) and output (16-64) lengths; tokens/s counts each request's own
output tokens. The three engines run in turn on the same requests; at 32 concurrent requests (the
target) that is repeated --repeats times and each engine's median kept, as single runs on this
machine drift by 20%. Last line: throughput_ratio_vs_transformers_c32=<x> (the distributed engine
with 2 workers; the reference engine's ratio is printed above it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch

from cluster.tiny_checkpoint import write_tiny_checkpoint
from cluster.tokenizer import load_tokenizer
from router.engine import Engine
from router.sampling import SamplingParams
from router.serving import ServingEngine

CONCURRENCY = (1, 8, 32, 64)


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(8, 65))], rng.randrange(16, 65))
            for _ in range(n)]


def ours_tokens_per_s(engine: Engine, tokenizer, requests, concurrency: int) -> float:
    # The loop runs on this thread, which loaded the model: one OpenMP team (see ServingEngine).
    serving = ServingEngine(engine, tokenizer, max_batch_tokens=2048, max_seqs=concurrency, own_thread=False)
    try:
        params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for _, n in requests]
        start = time.perf_counter()
        serving.generate([p for p, _ in requests], params)
        return sum(n for _, n in requests) / (time.perf_counter() - start)
    finally:
        serving.shutdown()


def transformers_tokens_per_s(model, requests, concurrency: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(requests), concurrency):
        batch = requests[i:i + concurrency]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        longest = max(n for _, n in batch)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                           min_new_tokens=longest, do_sample=False, pad_token_id=0)
    return sum(n for _, n in requests) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="expert workers of the distributed engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs at 32 concurrent requests (median)")
    args = parser.parse_args()
    from transformers import MixtralForCausalLM

    from cluster.bringup import ExpertCluster

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=256, intermediate_size=512, num_layers=4,
                                     num_heads=8, num_kv_heads=2, head_dim=32)
        tokenizer = load_tokenizer(path)
        hf = MixtralForCausalLM.from_pretrained(path).eval()
        reference = Engine.local(path, kv_blocks=2048)
        cluster = ExpertCluster(path, args.workers, kv_blocks=2048)
        try:
            for c in CONCURRENCY:
                requests = workload(max(4 * c, 8), seed=c)
                runs = [(transformers_tokens_per_s(hf, requests, c),
                         ours_tokens_per_s(reference, tokenizer, requests, c),
                         ours_tokens_per_s(cluster.engine, tokenizer, requests, c))
                        for _ in range(args.repeats if c == 32 else 1)]
                rows[c] = tuple(statistics.median(column) for column in zip(*runs))
        finally:
            cluster.shutdown()
    print("model: hidden=256 intermediate=512 layers=4 experts=8 top2 fp32, CPU; "
          f"distributed = {args.workers} expert workers on local Ray (gloo)")
    print(f"{'conc':>4} {'transformers tok/s':>18} {'reference tok/s':>15} {'distributed tok/s':>17} "
          f"{'ref/tf':>6} {'dist/tf':>7}")
    for c, (tf, ref, dist) in rows.items():
        print(f"{c:>4} {tf:>18.1f} {ref:>15.1f} {dist:>17.1f} {ref / tf:>6.2f} {dist / tf:>7.2f}")
    tf, ref, dist = rows[32]
    print(f"reference_throughput_ratio_vs_transformers_c32={ref / tf:.2f}")
    print(f"throughput_ratio_vs_transformers_c32={dist / tf:.2f}")


if __name__ == "__main__":
    main()
