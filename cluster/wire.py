"""The data-path protocol between the router (rank 0) and expert workers (ranks 1..W).

Every message is one `all_to_all_single` of fixed-size int64 headers, then, for OP_LAYER, two
`all_to_all_single` of hidden-state rows with uneven splits: router -> workers (rows grouped by
expert), then workers -> router (results in the same order). Only rows that must travel are sent.

Header the router sends to worker w: [op, layer, rows for expert 0, ..., rows for expert E-1].
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
    """Join the group; every collective on it fails after timeout_s instead of hanging."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
