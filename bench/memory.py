"""Resident memory against the weights held: what loading a model costs a process beyond its weights.

    python bench/memory.py [--hidden 1024 --intermediate 2048 --layers 4 --experts 8]
    python bench/memory.py --mixtral   # the table of bytes held at Mixtral 8x7B's sizes (README)

A bf16 checkpoint in Hugging Face layout (Mixtral's own dtype; 32000-token vocab; about 470 MB at the
defaults: 400 MB of experts, 130 MB of embeddings and lm_head) is loaded by the router's model
(embeddings, attention, gates, lm_head: `RouterModel.from_checkpoint`, what `serve` builds) and by an
expert worker holding every expert (`ExpertWorker.load`, the actor's own code, called in-process),
at --dtype float32 and bfloat16 and with --quantize int8 and int4, each in a fresh process. The figure is the
growth of resident memory (VmRSS) from just before the weights are read to just after, over the bytes
of weights the process reports holding (`Linear.nbytes` and the tensors beside them, and the router's
rotary tables, 32 MB computed at load for 32k positions; a worker's `nbytes()`): 1.00 means nothing but
the weights stayed. The KV cache is not part of it (allocated
separately, by size). Target: <= 1.15.
Last line: rss_over_weights_router=<x> rss_over_weights_worker=<y> (the worse of fp32 and bf16)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

# Run in a fresh process per case: resident memory is the whole process's, and what one load leaves
# in the allocator must not count against the next.
CASE = r"""
import gc, json, sys
from expertmesh.core.heap import use_huge_pages
use_huge_pages()  # as the CLI and the workers do, before torch allocates
import torch
from expertmesh.core import cpu_kernels

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

path, role, dtype, quantize = sys.argv[1:5]
cpu_kernels.kernels()  # built and loaded before the baseline: code, not weights
if role == "router":
    from expertmesh.core.checkpoint import Checkpoint
    from expertmesh.router.model import RouterModel
    checkpoint = Checkpoint(path)
    gc.collect()
    before = rss()
    model = RouterModel.from_checkpoint(checkpoint, getattr(torch, dtype), "cpu", quantize)
    held = model.nbytes
else:
    from expertmesh.workers.expert_worker import ExpertWorker
    worker = ExpertWorker(0, path, dtype, 1, quantize)
    pairs = [(l, e) for l in range(worker.config.num_layers) for e in range(worker.config.num_experts)]
    gc.collect()
    before = rss()
    worker.load(pairs)
    held = worker.nbytes()
gc.collect()
print(json.dumps({"growth": rss() - before, "held": held}))
"""


def measure(path: str, role: str, dtype: str, quantize: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CASE, path, role, dtype, quantize], capture_output=True,
                            text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def mixtral_table(workers: int = 8) -> None:
    """Bytes held at Mixtral 8x7B's sizes, per dtype, as the code counts them: one expert, one
    layer's attention and gate, the lm_head and the embeddings built as the engine builds them
    (random values: the sizes are what matter), then scaled to 32 layers x 8 experts."""
    import torch

    from expertmesh.core.grouped_experts import fused_expert
    from expertmesh.core.linear import Linear

    d, i, q, kv, vocab, layers, experts = 4096, 14336, 4096, 1024, 32000, 32, 8
    print(f"Mixtral 8x7B ({layers} layers x {experts} experts, hidden {d}, intermediate {i}), bytes held:")
    print(f"{'weights':<10} {'one expert':>11} {'all experts':>12} {f'per worker of {workers}':>18} "
          f"{'router (dense)':>15} {'whole model':>12}")
    for dtype, quantize in ((torch.float32, "none"), (torch.bfloat16, "none"), (torch.bfloat16, "int8"),
                            (torch.bfloat16, "fp8"), (torch.bfloat16, "int4")):
        def made(*shape):
            return torch.empty(*shape, dtype=dtype).normal_(0, 0.02)

        expert = sum(layer.nbytes for layer in fused_expert(made(i, d), made(d, i), made(i, d), quantize))
        attention = Linear(made(q + 2 * kv, d), quantize).nbytes + Linear(made(d, q), quantize).nbytes
        gate_norms = Linear(made(experts, d)).nbytes + 2 * d * dtype.itemsize
        router = (layers * (attention + gate_norms) + Linear(made(vocab, d), quantize).nbytes
                  + vocab * d * dtype.itemsize + d * dtype.itemsize)  # + embeddings (never quantized), final norm
        total = layers * experts * expert
        name = quantize if quantize != "none" else str(dtype).removeprefix("torch.")
        print(f"{name:<10} {expert / 2**20:9.1f} MiB {total / 2**30:8.1f} GiB {total / workers / 2**30:14.1f} GiB "
              f"{router / 2**30:11.2f} GiB {(total + router) / 2**30:8.1f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--mixtral", action="store_true", help="only the table of bytes held at Mixtral 8x7B sizes")
    args = parser.parse_args()
    if args.mixtral:
        mixtral_table()
        return
    from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint

    worst = {"router": 0.0, "worker": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_tiny_checkpoint(tmp, dtype="bfloat16", hidden_size=args.hidden,
                                         intermediate_size=args.intermediate, num_layers=args.layers,
                                         num_experts=args.experts, num_heads=8, num_kv_heads=2,
                                         head_dim=args.hidden // 8, max_shard_bytes=256 << 20))
        print(f"checkpoint: bf16, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers x "
              f"{args.experts} experts")
        print(f"{'process':<8} {'dtype':<9} {'quantize':<8} {'weights MiB':>12} {'RSS growth MiB':>15} {'ratio':>6}")
        for role in ("router", "worker"):
            for dtype, quantize in (("float32", "none"), ("bfloat16", "none"), ("float32", "int8"),
                                    ("float32", "int4")):
                m = measure(path, role, dtype, quantize)
                ratio = m["growth"] / m["held"]
                if quantize == "none":
                    worst[role] = max(worst[role], ratio)
                print(f"{role:<8} {dtype:<9} {quantize:<8} {m['held'] / 2**20:12.1f} {m['growth'] / 2**20:15.1f} "
                      f"{ratio:6.2f}", flush=True)
    print(f"rss_over_weights_router={worst['router']:.2f} rss_over_weights_worker={worst['worker']:.2f}")


if __name__ == "__main__":
    main()
