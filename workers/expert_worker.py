"""The expert worker: a Ray actor that owns some (layer, expert) weights and serves rows for them.

Control arrives by Ray calls (load, join the group, serve, stats); hidden states arrive only over
the collective group, in the loop of `serve`, which runs until the router sends OP_SHUTDOWN.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import ray
import torch

from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.workers.grouped_mlp import LayerExperts, grouped_experts


class ExpertWorker:
    def __init__(self, worker: int, model_dir: str, pairs: list[tuple[int, int]], dtype: str, threads: int):
        self.worker = worker
        self.threads = threads  # torch threads of the serve loop (ServingConfig.worker_threads)
        self.model_dir = model_dir
        self.pairs = [tuple(p) for p in pairs]
        self.dtype = getattr(torch, dtype)
        self.layers: dict[int, LayerExperts] = {}  # layer -> its experts held here, stacked
        self.rows_received: Counter = Counter()  # (layer, expert) -> rows served
        self._lock = threading.Lock()

    def load(self) -> int:
        """Read this worker's experts straight from the safetensors files; returns bytes held."""
        checkpoint = Checkpoint(self.model_dir)
        self.config = checkpoint.config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        by_layer: dict[int, dict[int, tuple]] = {}
        for (layer, expert), ws in checkpoint.read_experts(self.pairs, self.dtype).items():
            by_layer.setdefault(layer, {})[expert] = tuple(w.to(self.device) for w in ws)
        self.layers = {layer: LayerExperts.stack(experts) for layer, experts in by_layer.items()}
        return sum(layer.nbytes for layer in self.layers.values())

    def where(self) -> dict:
        """Where this worker runs: for placement checks and for finding leftover processes."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address()}

    def join_group(self, init_method: str, world_size: int, backend: str, timeout_s: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
        wire.init_process_group(init_method, wire.worker_rank(self.worker), world_size, backend, timeout_s)

    def stats(self) -> dict:
        with self._lock:
            return {"worker": self.worker, "pairs": self.pairs,
                    "rows_received": {f"{l}:{e}": n for (l, e), n in self.rows_received.items()}}

    def serve(self) -> str:
        """The data-path loop. Returns how it ended; raises when a peer is lost or times out."""
        import torch.distributed as dist

        # Set on this thread: OpenMP thread counts are per calling thread, and a Ray threaded
        # actor runs each call on a pool thread.
        torch.set_num_threads(self.threads)
        router = wire.ROUTER_RANK
        hidden, num_experts = self.config.hidden_size, self.config.num_experts
        # gloo: one receive buffer stays posted for header and rows together (core/wire.py)
        buffer = (torch.empty(wire.message_capacity(num_experts, hidden, self.dtype), dtype=torch.uint8)
                  if wire.inlines_rows(dist.get_backend()) else None)
        while True:
            if buffer is not None:
                dist.recv(buffer, router)
                op, layer, inline, *counts = wire.unpack_header(buffer, num_experts)
            else:
                header = torch.empty(wire.header_size(num_experts), dtype=torch.int64, device=self.device)
                dist.recv(header, router)
                op, layer, inline, *counts = header.tolist()
            if op == wire.OP_SHUTDOWN:
                return "shutdown"
            if op == wire.OP_PING:
                continue
            used = [(e, n) for e, n in enumerate(counts) if n]
            if inline:
                rows = wire.inline_rows(buffer, num_experts, sum(counts), hidden, self.dtype)
            else:
                rows = torch.empty(sum(counts), hidden, dtype=self.dtype, device=self.device)
                dist.recv(rows, router)
            held = self.layers.get(layer)
            missing = [e for e, _ in used if held is None or e not in held.local]
            if missing:  # the router's plan and ours disagree: fail loudly, never compute garbage
                raise RuntimeError(f"worker {self.worker} got rows for expert ({layer}, {missing[0]}) "
                                   "which it does not hold")
            assert rows.shape == (sum(counts), hidden), rows.shape  # (N, D), grouped by expert
            out = grouped_experts(rows, held, [e for e, _ in used], [n for _, n in used])
            assert out.shape == rows.shape, out.shape
            with self._lock:  # counted before the results go back, so stats never lag the router
                for e, n in used:
                    self.rows_received[(layer, e)] += n
            dist.send(out, router)


# The Ray actor: one thread runs `serve`, the other answers control calls (stats) meanwhile.
# Made here rather than with a decorator so Ray pickles the class by reference, not by value.
RemoteExpertWorker = ray.remote(max_concurrency=2)(ExpertWorker)
