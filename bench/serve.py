"""Serving throughput, in-process (no network): this engine with continuous batching against
transformers' generate over the same requests, in two baselines.

    python bench/serve.py [--workers 2 --repeats 3 --quantize int8]

Requests have mixed prompt (8-64) and output (16-64) lengths; tokens/s counts each request's own
output tokens. Baselines (transformers' MixtralForCausalLM.generate, greedy, fp32):
  - static: requests in arrival order, in left-padded batches of the concurrency; a batch runs until
    its longest request is done, so shorter ones compute tokens nobody asked for;
  - bucketed: what a careful user would run: requests sorted by output then prompt length first,
    so a batch's requests need about as many tokens each.
Each engine run starts on a fresh KV cache (no prefix blocks left from the run before) after a
warm-up, and every engine's greedy tokens are checked equal to transformers' (the run fails if
not; a request may part from them only at a tie of transformers' own two best logits). At 32
concurrent requests (the target) runs repeat --repeats times and each engine's median is kept, as
single runs on this machine drift by 20%. Last line:
throughput_ratio_vs_transformers_c32=<x> (the distributed engine with --workers workers over the
static baseline; the reference engine's ratio and both engines' ratios over the bucketed baseline
are printed above it). With --quantize int8 both engines run again with int8 weights
(core/quantize.py), after the fp32 ones, on the same requests: their rows are printed beside fp32's
(int8's tokens are checked equal between the two int8 engines, or, where they differ, each against
the in-process int8 engine on the request alone, up to ties, not to transformers' fp32 ones) and
the last line adds int8_over_fp32_c32_reference=<x> int8_over_fp32_c32_distributed=<y>.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

import torch
from machine import machine  # bench/machine.py

from expertmesh.core.settings import ServingConfig
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.core.tokenizer import load_tokenizer
from expertmesh.router.engine import Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import ServingEngine

CONCURRENCY = (1, 8, 32, 64)


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(8, 65))], rng.randrange(16, 65))
            for _ in range(n)]


def fresh_cache(engine: Engine) -> None:
    """Give the engine a new, empty KV cache of the same size: no prefix blocks from earlier runs."""
    old = engine.cache
    engine.cache = KVCache(engine.config, old.num_blocks, old.block_size, old.k.dtype, old.k.device)


def ours(engine: Engine, tokenizer, requests, concurrency: int) -> tuple[float, list[list[int]]]:
    """(tokens/s, greedy tokens per request) of the serving loop at this concurrency."""
    fresh_cache(engine)
    # The loop runs on this thread, which loaded the model: one OpenMP team (see ServingEngine).
    serving = ServingEngine(engine, tokenizer, ServingConfig(max_seqs=concurrency), own_thread=False)
    params = [SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True) for _, n in requests]
    serving.generate([[1, 5, 6]], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    chunks = serving.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - start
    return sum(n for _, n in requests) / elapsed, [[t for c in r for t in c.token_ids] for r in chunks]


def transformers(model, requests, concurrency: int, bucketed: bool) -> tuple[float, list[list[int]], float]:
    """(tokens/s, greedy tokens per request, useful fraction of the generated tokens) of static
    left-padded batches, in arrival order or bucketed by length."""
    order = list(range(len(requests)))
    if bucketed:
        order.sort(key=lambda i: (requests[i][1], len(requests[i][0])))
    outputs: list[list[int]] = [[] for _ in requests]
    generated = 0
    model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    for i in range(0, len(order), concurrency):
        batch = order[i:i + concurrency]
        width = max(len(requests[j][0]) for j in batch)
        ids = torch.tensor([[0] * (width - len(requests[j][0])) + requests[j][0] for j in batch])
        mask = torch.tensor([[0] * (width - len(requests[j][0])) + [1] * len(requests[j][0]) for j in batch])
        longest = max(requests[j][1] for j in batch)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest,
                                 min_new_tokens=longest, do_sample=False, pad_token_id=0)
        for row, j in enumerate(batch):
            outputs[j] = out[row, width:width + requests[j][1]].tolist()
        generated += len(batch) * longest
    elapsed = time.perf_counter() - start
    useful = sum(n for _, n in requests)
    return useful / elapsed, outputs, useful / generated


TIE = 1e-4  # logits closer than this are a tie: which one wins is rounding, in any implementation


def check_equal(name: str, got: list[list[int]], expected: list[list[int]], model, requests) -> int:
    """Fail unless every request's greedy tokens equal transformers'. The batched baseline's tokens
    come from left-padded batches, whose rounding can tip a near-tie; a request that differs from
    them is checked against transformers run on that request alone, the real oracle, and there it may
    part only where transformers' own best two logits tie (within TIE). Returns how many parted so."""
    ties = 0
    for i, (a, b) in enumerate(zip(got, expected)):
        if a == b:
            continue
        prompt, n = requests[i]
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        alone = out.sequences[0, len(prompt):].tolist()
        if a == alone:
            continue
        d = next(j for j, (x, y) in enumerate(zip(a, alone)) if x != y)
        scores = out.scores[d][0].float()
        if scores.max() - scores[a[d]] > TIE:
            raise SystemExit(f"{name}: request {i} parts from transformers' greedy tokens at token {d} "
                             f"(ours {a[d]}, theirs {alone[d]}, logit gap {scores.max() - scores[a[d]]:.2e})")
        ties += 1
    return ties


def check_int8(name: str, got: list[list[int]], engine: Engine, tokenizer, requests, which: list[int]) -> int:
    """Fail unless every request's greedy tokens equal the in-process int8 engine's on that request
    alone (batch 1: the oracle, as transformers alone is for fp32), or part from them only where the
    oracle's best two logits tie (within TIE). The engines' paths round differently (a few tokens go
    through experts one by one in process, all through the workers when distributed; the combine and
    the norms have a kernel for a few rows and torch's ops for more), which tips near-ties only.
    Checks the requests `which`; returns how many parted so."""
    ties = 0
    for i in which:
        tokens, (prompt, n) = got[i], requests[i]
        fresh_cache(engine)
        serving = ServingEngine(engine, tokenizer, ServingConfig(max_seqs=1), own_thread=False)
        chunks = serving.generate([prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True,
                                                           logprobs=2))[0]
        alone = [t for c in chunks for t in c.token_ids]
        if tokens == alone:
            continue
        d = next(j for j, (x, y) in enumerate(zip(tokens, alone)) if x != y)
        step = [lp for c in chunks for lp in c.logprobs][d]  # the oracle's choice and its runner-up
        gap = step.logprob - dict(step.top).get(tokens[d], float("-inf"))
        if gap > TIE:
            raise SystemExit(f"{name}: request {i} parts from the int8 engine's own tokens alone at token {d} "
                             f"(got {tokens[d]}, alone {alone[d]}, logit gap {gap:.2e})")
        ties += 1
    return ties


def int8_throughput(path, tokenizer, workers: int, repeats: int) -> dict[int, tuple[float, float]]:
    """Concurrency -> (reference, distributed) tokens/s with int8 weights, medians at 32 as for fp32;
    fails unless both engines give the in-process engine's greedy tokens alone, up to ties
    (check_int8)."""
    from expertmesh.cluster.elastic import ExpertCluster

    reference = Engine.local(path, kv_blocks=2048, quantize="int8")
    cluster = ExpertCluster(path, workers, kv_blocks=2048, settings=ServingConfig(quantize="int8"))
    rows = {}
    try:
        for c in CONCURRENCY:
            requests = workload(max(4 * c, 8), seed=c)
            runs = []
            for _ in range(repeats if c == 32 else 1):
                ref, ref_out = ours(reference, tokenizer, requests, c)
                dist, dist_out = ours(cluster.engine, tokenizer, requests, c)
                if ref_out != dist_out:  # rare (near-ties only): checked against the oracle
                    which = [i for i, (a, b) in enumerate(zip(ref_out, dist_out)) if a != b]
                    for name, out in (("int8 reference", ref_out), ("int8 distributed", dist_out)):
                        ties = check_int8(f"{name}, c{c}", out, reference, tokenizer, requests, which)
                        print(f"int8, c{c}: {name} engine's tokens equal the engine's alone up to {ties} tie(s)")
                runs.append((ref, dist))
            rows[c] = tuple(statistics.median(column) for column in zip(*runs))
    finally:
        cluster.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="expert workers of the distributed engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs at 32 concurrent requests (median)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none",
                        help="int8: both engines again with int8 weights")
    parser.add_argument("--json", metavar="PATH", help="also write the tokens/s per concurrency as JSON "
                        "(bench/plots.py draws them)")
    args = parser.parse_args()
    from transformers import MixtralForCausalLM

    from expertmesh.cluster.elastic import ExpertCluster

    rows, useful, ties = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        # init_std 0.1: sharper distributions than 0.02, so greedy tokens are not decided by near-ties
        # that padding or batch shape could tip either way
        path = write_tiny_checkpoint(tmp, hidden_size=256, intermediate_size=512, num_layers=4,
                                     num_heads=8, num_kv_heads=2, head_dim=32, init_std=0.1)
        tokenizer = load_tokenizer(path)
        hf = MixtralForCausalLM.from_pretrained(path).eval()
        reference = Engine.local(path, kv_blocks=2048)
        cluster = ExpertCluster(path, args.workers, kv_blocks=2048)
        try:
            for c in CONCURRENCY:
                requests = workload(max(4 * c, 8), seed=c)
                runs = []
                for _ in range(args.repeats if c == 32 else 1):
                    static, expected, useful[c] = transformers(hf, requests, c, bucketed=False)
                    bucketed, bucketed_out, _ = transformers(hf, requests, c, bucketed=True)
                    ref, ref_out = ours(reference, tokenizer, requests, c)
                    dist, dist_out = ours(cluster.engine, tokenizer, requests, c)
                    ties[c] = max(ties.get(c, 0), *(
                        check_equal(f"{name}, c{c}", out, expected, hf, requests)
                        for name, out in (("transformers bucketed", bucketed_out), ("reference engine", ref_out),
                                          ("distributed engine", dist_out))))
                    runs.append((static, bucketed, ref, dist))
                rows[c] = tuple(statistics.median(column) for column in zip(*runs))
        finally:
            cluster.shutdown()
        if args.quantize == "int8":
            int8_rows = int8_throughput(path, tokenizer, args.workers, args.repeats)
    print("model: hidden=256 intermediate=512 layers=4 experts=8 top2 fp32, CPU; "
          f"distributed = {args.workers} expert workers on local Ray (gloo); every engine's greedy tokens "
          "equal transformers' (on the request alone where a padded batch differs), up to logit ties "
          f"(gap < {TIE:g}; requests that parted at one, most of any engine: "
          + ", ".join(f"c{c} {n}" for c, n in ties.items()) + ")")
    print(f"{'conc':>4} {'tf static':>9} {'useful':>6} {'tf bucketed':>11} {'reference':>9} {'distributed':>11} "
          f"{'ref/static':>10} {'dist/static':>11} {'ref/bucket':>10} {'dist/bucket':>11}   (tokens/s)")
    for c, (static, bucketed, ref, dist) in rows.items():
        print(f"{c:>4} {static:>9.1f} {useful[c]:>6.2f} {bucketed:>11.1f} {ref:>9.1f} {dist:>11.1f} "
              f"{ref / static:>10.2f} {dist / static:>11.2f} {ref / bucketed:>10.2f} {dist / bucketed:>11.2f}")
    static, bucketed, ref, dist = rows[32]
    print(f"reference_throughput_ratio_vs_transformers_c32={ref / static:.2f} "
          f"(over bucketed: {ref / bucketed:.2f}; distributed over bucketed: {dist / bucketed:.2f})")
    last = f"throughput_ratio_vs_transformers_c32={dist / static:.2f}"
    if args.quantize == "int8":
        print(f"{'conc':>4} {'reference':>9} {'ref int8':>9} {'int8/fp32':>9} {'distributed':>11} {'dist int8':>9} "
              f"{'int8/fp32':>9}   (tokens/s; int8 tokens equal between its two engines)")
        for c, (ref8, dist8) in int8_rows.items():
            ref, dist = rows[c][2:]
            print(f"{c:>4} {ref:>9.1f} {ref8:>9.1f} {ref8 / ref:>9.2f} {dist:>11.1f} {dist8:>9.1f} "
                  f"{dist8 / dist:>9.2f}")
        ref8, dist8 = int8_rows[32]
        last += (f" int8_over_fp32_c32_reference={ref8 / rows[32][2]:.2f} "
                 f"int8_over_fp32_c32_distributed={dist8 / rows[32][3]:.2f}")
    if args.json:
        names = ("transformers static", "transformers bucketed", "in process", f"{args.workers} workers")
        out = {"command": "python bench/serve.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "tokens_per_s": {name: {c: row[i] for c, row in rows.items()} for i, name in enumerate(names)}}
        if args.quantize == "int8":
            for i, name in enumerate(("in process, int8", f"{args.workers} workers, int8")):
                out["tokens_per_s"][name] = {c: row[i] for c, row in int8_rows.items()}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(last)


if __name__ == "__main__":
    main()
