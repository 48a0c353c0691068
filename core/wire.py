"""The data-path protocol between the router (rank 0) and expert workers (ranks 1..W).

Pairs and membership epochs: in each epoch each router talks to each worker over a process group of
two of their own (router rank 0, worker rank 1), built directly on one long-lived store (the serve
process hosts it) under the prefix "epoch{N}/worker{id}/" (router 0, the serve process's own) or
"epoch{N}/router{R}/worker{id}/" (router R of the fleet, a Ray actor). Pairs, not one group of all: gloo fails every op
of a group, on every member, once any member dies (measured), so one worker's death would stop all
the others; with pairs it fails only its own, and the router sends its rows to other copies. The
next epoch's pairs form while the current ones serve; an OP_SWITCH on the current pair moves a
worker to the next one, so no message of an old epoch is ever read in a new one.

Messages on a pair, in order:
  router -> worker: header, int64 (header_size,): [op, layer, inline, rows for expert 0..E-1]
  router -> worker: for OP_LAYER, the rows (sum of counts, D), grouped by expert
  worker -> router: the expert outputs, same shape and order
On gloo the rows ride in the header's message (inline = 1, up to INLINE_MAX_ROWS): gloo lets a
receive buffer be larger than the message, so a worker keeps one buffer posted and every layer is
one message each way. NCCL needs matching sizes, so there the rows follow in a message of their own.
A worker with no rows in a layer gets no message at all. With one router, an all-to-all would carry
data only on these router<->worker pairs; sending just those pairs was 5x faster on gloo
(bench/transport.py), as no rank waits for unrelated ones.
"""

from __future__ import annotations

from datetime import timedelta

import torch

OP_LAYER = 1  # run experts of `layer` on the rows that follow
OP_PING = 2  # keep-alive while the router is idle; no rows follow
OP_SHUTDOWN = 3  # leave the serve loop
OP_SWITCH = 4  # go on in the epoch named by the header's layer field (its pairs are already formed)

ROUTER_RANK, WORKER_RANK = 0, 1  # ranks in every pair
INLINE_MAX_ROWS = 4096  # rows per message that travel inline (2048 tokens x top-2)


def header_size(num_experts: int) -> int:
    return 3 + num_experts


def inlines_rows(backend: str) -> bool:
    return backend == "gloo"


def header(op: int, layer: int = 0, inline: bool = False, counts: list[int] | None = None,
           num_experts: int = 0) -> torch.Tensor:
    """(header_size,) int64 on the CPU."""
    return torch.tensor([op, layer, int(inline), *(counts or [0] * num_experts)], dtype=torch.int64)


def pack(head: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One message: the header's bytes, then the rows' bytes -> uint8 (H*8 + N*D*itemsize,)."""
    head_bytes = head.view(torch.uint8)
    message = torch.empty(head_bytes.numel() + rows.numel() * rows.element_size(), dtype=torch.uint8)
    message[:head_bytes.numel()] = head_bytes
    message[head_bytes.numel():].view(rows.dtype).view(rows.shape).copy_(rows)
    return message


def message_capacity(num_experts: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the largest inline message: what a worker's receive buffer holds."""
    return header_size(num_experts) * 8 + INLINE_MAX_ROWS * hidden * dtype.itemsize


def unpack_header(message: torch.Tensor, num_experts: int) -> list[int]:
    return message[:header_size(num_experts) * 8].view(torch.int64).tolist()


def inline_rows(message: torch.Tensor, num_experts: int, rows: int, hidden: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The rows of an inline message, a view (rows, hidden) into the receive buffer."""
    start = header_size(num_experts) * 8
    return message[start:start + rows * hidden * dtype.itemsize].view(dtype).view(rows, hidden)


def open_store(host: str, port: int, is_router: bool, timeout_s: float):
    """The long-lived store every epoch's pairs form on: the router hosts it, workers connect."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=is_router, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def open_pair(store, epoch: int, worker: int, rank: int, backend: str, timeout_s: float, router: int = 0):
    """This process's end (rank ROUTER_RANK or WORKER_RANK) of the pair of router `router` and worker
    `worker` (stable ids) in epoch `epoch`; blocks until the other end joins. Every send and receive
    on it fails after timeout_s instead of hanging."""
    import torch.distributed as dist

    name = f"epoch{epoch}/worker{worker}/" if router == 0 else f"epoch{epoch}/router{router}/worker{worker}/"
    prefixed = dist.PrefixStore(name, store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)


def close_pair(pair, backend: str) -> None:
    """Let a pair go. NCCL: abort its communicator (a destroy could hang on a dead peer); gloo: its
    sockets close with the object."""
    if backend == "nccl":
        pair.abort()
