"""A model on paper of M routers over N expert workers, each on a device of its own: decode tokens/s
from a router's and the experts' times per step, measured here, then checked against the points this
machine can measure and applied to Mixtral 8x7B on 8 GPUs with spec-sheet figures.

    python bench/routers.py --model [--hidden 512 --intermediate 1792 --layers 4 --steps 10]

A decode step of B sequences on one router, L layers, E experts per layer, top-k:
  router_ms(B)  the router's own work: embeddings, attention over the KV cache, gates, lm_head
  expert_ms(B)  every expert of every layer for B tokens' k rows each, in one process
  trip_ms(B)    one layer's round trip to a worker beyond its expert math (messages, copies, gate
                and combine on the router), the same for every worker (they answer in parallel)
A worker holding h of each layer's E experts does h/E of expert_ms(B) for each router's step (the
routing is uniform; decode is bandwidth-bound, so the time follows the experts read). No ping-pong:
a router waits for its workers. Every worker serves every router, each router's rows apart, so:
  step(B)     = router_ms(B) + L * trip_ms(B) + expert_ms(B) * h / E
  tokens/s    = min(M * B / step(B), B / (expert_ms(B) * h / E))
              = the routers' pace, or the busiest worker's, whichever is less.
Joining: a worker that computed two routers' rows of a layer in one product (MegaScale-Infer's
reason for M:N) instead of each router's apart; the table prints that product's time over the two
apart, for one layer's experts in this process.
Measured here with one torch thread per process (the router in this process, a worker in a Ray
actor: two processes, two cores). Checked: one router over one worker (M=1, N=1), its decode step
against the model's. This machine has two cores, so no point with more devices than that.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import torch
from dispatch import decode_step_ms, dispatch_ms  # bench/dispatch.py: a decode step, a layer's round trip

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.worker_pool import ensure_ray
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.router.engine import Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.model import RouterModel

BATCHES = (1, 8, 32, 64)

# Mixtral 8x7B (bf16) on H100 SXM GPUs: spec-sheet figures and assumed efficiencies, not measurements
MIXTRAL = {"layers": 32, "experts": 8, "top_k": 2, "hidden": 4096, "intermediate": 14336, "kv_dim": 1024,
           "vocab": 32000, "bytes": 2}
H100 = {"hbm_tb_s": 3.35, "bf16_tflops": 989.0, "bandwidth_used": 0.7, "flops_used": 0.5,
        "message_us": 30.0}  # one layer's round trip between two GPUs of a node (NCCL send/recv), assumed


class NoExperts:
    """An expert path that costs nothing: what remains of a step is the router's own work."""

    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape, dtype=torch.float32)


def experts_ms(local: Engine, tokens: int, repeats: int) -> float:
    """Median time of one layer's experts for `tokens` tokens (k rows each), in this process."""
    c = local.config
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, c.hidden_size, generator=gen)
    weights, ids = torch.topk(torch.randn(tokens, c.num_experts, generator=gen).softmax(-1), c.experts_per_token)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        local.experts.run(0, x, weights / weights.sum(-1, keepdim=True), ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def measure(args) -> tuple[dict, dict, int, int]:
    """-> ({batch: terms in ms}, {batch: one router over one worker's measured step ms}, L, E)."""
    torch.set_num_threads(1)  # this process is the router: one device (core)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(tmp, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                     num_layers=args.layers, num_heads=8, num_kv_heads=2, head_dim=args.hidden // 8)
        checkpoint = Checkpoint(path)
        config = checkpoint.config
        model = RouterModel.from_checkpoint(checkpoint, torch.float32, "cpu", "none")
        bare = Engine(model, NoExperts(), KVCache(config, 512, 16, torch.float32, "cpu"))
        local = Engine.local(path)
        terms = {}
        for b in BATCHES:
            router = decode_step_ms(bare, b, args.steps)
            terms[b] = {"router_ms": router, "expert_ms": max(decode_step_ms(local, b, args.steps) - router, 0.0),
                        # two routers' rows of one layer in one product, over each router's apart
                        "joined_over_apart": experts_ms(local, 2 * b, args.steps * 4) / (
                            2 * experts_ms(local, b, args.steps * 4))}
        del local
        ensure_ray(num_cpus=8)
        measured = {}
        with ExpertCluster(path, 1) as cluster:
            for b in BATCHES:
                trip = dispatch_ms(cluster, b, args.steps * 4)
                terms[b]["trip_ms"] = max(trip - terms[b]["expert_ms"] / config.num_layers, 0.0)
                measured[b] = decode_step_ms(cluster.engine, b, args.steps)
    return terms, measured, config.num_layers, config.num_experts


def held(experts: int, workers: int) -> int:
    """Experts of a layer on the busiest of `workers` workers (an even spread)."""
    return math.ceil(experts / workers)


def step_ms(t: dict, layers: int, experts: int, workers: int) -> float:
    return t["router_ms"] + layers * t["trip_ms"] + t["expert_ms"] * held(experts, workers) / experts


def tokens_per_s(t: dict, batch: int, routers: int, workers: int, layers: int, experts: int) -> float:
    """M routers of `batch` sequences each over N workers, every one on a device of its own."""
    busiest = t["expert_ms"] * held(experts, workers) / experts
    return min(routers * batch / step_ms(t, layers, experts, workers), batch / busiest) * 1e3


def mixtral_terms(batch: int, context: int, workers: int, gpu: dict = H100, m: dict = MIXTRAL) -> dict:
    """Roofline terms of a Mixtral 8x7B decode step on GPUs (ms): each the larger of its bytes over
    the bandwidth used and its FLOPs over the FLOPs used."""
    bandwidth = gpu["hbm_tb_s"] * 1e12 * gpu["bandwidth_used"]
    flops = gpu["bf16_tflops"] * 1e12 * gpu["flops_used"]
    d, i, kv, b = m["hidden"], m["intermediate"], m["kv_dim"], m["bytes"]
    attention = 2 * d * d + 2 * d * kv  # q, o; k, v
    router_params = m["layers"] * attention + m["vocab"] * d  # + the lm_head
    kv_bytes = batch * context * m["layers"] * 2 * kv * b
    router_s = max((router_params * b + kv_bytes) / bandwidth,
                   (2 * batch * router_params + 4 * batch * context * d * m["layers"]) / flops)
    expert_params = 3 * d * i
    rows = batch * m["top_k"]  # per layer, over all experts
    touched = min(m["experts"], rows)  # experts with at least one row (uniform routing)
    expert_s = m["layers"] * max(touched * expert_params * b / bandwidth, 2 * rows * expert_params / flops)
    return {"router_ms": router_s * 1e3, "expert_ms": expert_s * 1e3, "trip_ms": gpu["message_us"] / 1e3}


def run(args) -> None:
    terms, measured, layers, experts = measure(args)
    print(f"measured (hidden {args.hidden}, intermediate {args.intermediate}, {layers} layers, {experts} experts, "
          "fp32, one torch thread per process):")
    print(f"{'batch':>5} {'router ms':>9} {'experts ms':>10} {'trip/layer ms':>13} {'M1N1 step ms':>12} "
          f"{'model ms':>8} {'measured/model':>14} {'2 routers joined/apart':>22}")
    checks = []
    for b in BATCHES:
        t = terms[b]
        predicted = step_ms(t, layers, experts, 1)
        checks.append(measured[b] / predicted)
        print(f"{b:>5} {t['router_ms']:>9.2f} {t['expert_ms']:>10.2f} {t['trip_ms']:>13.3f} {measured[b]:>12.2f} "
              f"{predicted:>8.2f} {checks[-1]:>14.2f} {t['joined_over_apart']:>22.2f}")
    b = BATCHES[-1]
    print(f"predicted here at batch {b} per router, each router and worker on a core of its own: " + ", ".join(
        f"M{m}N{n} {tokens_per_s(terms[b], b, m, n, layers, experts):.0f}" for m, n in ((1, 1), (1, 2), (2, 2),
                                                                                      (2, 4), (4, 4))) + " tokens/s")
    print("Mixtral 8x7B, bf16, on 8 H100 (spec-sheet bandwidth x0.7, FLOPs x0.5, 30 us a layer's round trip; "
          "context 1024): tokens/s by routers M + workers N = 8 and batch per router")
    best = (0.0, 0, 0, 0)
    header = "  M+N " + "".join(f"{f'b{b}':>9}" for b in (8, 32, 64, 128, 256))
    print(header)
    for m in range(1, 8):
        n = 8 - m
        row = []
        for b in (8, 32, 64, 128, 256):
            value = tokens_per_s(mixtral_terms(b, 1024, n), b, m, n, MIXTRAL["layers"], MIXTRAL["experts"])
            row.append(value)
            best = max(best, (value, m, n, b))
        print(f"  {m}+{n} " + "".join(f"{v:>9.0f}" for v in row))
    one = mixtral_terms(1, 1024, 7)
    single = tokens_per_s(one, 1, 1, 7, MIXTRAL["layers"], MIXTRAL["experts"])
    print(f"best: {best[1]} routers + {best[2]} workers at batch {best[3]} per router: {best[0]:.0f} tokens/s; "
          f"one stream alone (1+7): {single:.0f} tokens/s ({1e3 / single:.1f} ms a token)")
    print(f"model_m1n1_measured_over_predicted={statistics.median(checks):.2f} "
          f"mixtral_8gpu_best_tokens_per_s={best[0]:.0f} mixtral_8gpu_best_split={best[1]}+{best[2]}")
