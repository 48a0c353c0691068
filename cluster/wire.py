"""The data-path protocol between the router (rank 0) and expert workers (ranks 1..W).

Point-to-point messages on one torch.distributed group, in order per (router, worker) pair:
  router -> worker: header, int64 (header_size,): [op, layer, rows for expert 0, ..., expert E-1]
  router -> worker: for OP_LAYER, the rows (sum of counts, D), grouped by expert
  worker -> router: the expert outputs, same shape and order
A worker with no rows in a layer gets no message at all. With one router, an all-to-all would carry
data only on these router<->worker pairs; sending just those pairs was 3-6x faster on gloo
(bench/transport.py), as no rank waits for unrelated ones.
"""

from __future__ import annotations

from datetime import timedelta

OP_LAYER = 1  # run experts of `layer` on the rows that follow
OP_PING = 2  # keep-alive while the router is idle; no rows follow
OP_SHUTDOWN = 3  # leave the serve loop

ROUTER_RANK = 0


def header_size(num_experts: int) -> int:
    return 2 + num_experts


def worker_rank(worker: int) -> int:
    return worker + 1


def init_process_group(init_method: str, rank: int, world_size: int, backend: str,
                       timeout_s: float) -> None:
    """Join the group; every send/recv on it fails after timeout_s instead of hanging."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
