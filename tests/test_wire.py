"""The data-path message layout (core/wire.py): what the router packs a worker can read back."""

from __future__ import annotations

import pytest
import torch

from expertmesh.core import wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inline_message_reads_back_from_a_larger_buffer(dtype):
    experts, hidden = 8, 24
    counts = [0, 3, 0, 0, 2, 0, 0, 1]
    rows = torch.randn(sum(counts), hidden).to(dtype)
    message = wire.pack(wire.header(wire.OP_LAYER, 5, True, counts), rows)
    assert message.numel() == wire.header_size(experts) * 8 + rows.numel() * rows.element_size()
    buffer = torch.zeros(wire.message_capacity(experts, hidden, dtype), dtype=torch.uint8)
    buffer[:message.numel()] = message  # what a receive into the worker's posted buffer leaves
    op, layer, inline, *got_counts = wire.unpack_header(buffer, experts)
    assert (op, layer, inline, got_counts) == (wire.OP_LAYER, 5, 1, counts)
    assert torch.equal(wire.inline_rows(buffer, experts, sum(counts), hidden, dtype), rows)


def test_header_without_rows():
    head = wire.header(wire.OP_PING, num_experts=8)
    assert head.tolist() == [wire.OP_PING, 0, 0] + [0] * 8
    assert head.numel() == wire.header_size(8)


def test_replicas_split_an_experts_rows_into_contiguous_near_equal_parts():
    from expertmesh.router.dispatcher import split_among_replicas

    # expert 0: 7 rows on workers 2 and 0; expert 1: none; expert 2: 3 rows on worker 1 alone
    pieces = split_among_replicas([7, 0, 3], [(2, 0), (1,), (1,)], num_workers=3)
    assert pieces == [[(0, 4, 3)], [(2, 7, 3)], [(0, 0, 4)]]  # no rows given yet: the first holder takes the odd one
    rows = sorted((start, n) for worker in pieces for _, start, n in worker)
    assert rows == [(0, 4), (4, 3), (7, 3)]  # every row exactly once, in order
    assert split_among_replicas([0, 0], [(0,), (1,)], 2) == [[], []]  # no rows: no messages


def test_a_replicated_experts_odd_rows_go_to_its_least_busy_holder():
    from expertmesh.router.dispatcher import split_among_replicas

    # Decode at batch 1, every expert on both workers: the token's two experts go to different
    # workers, which then compute at the same time, not one after the other.
    both = [(0, 1)] * 4
    assert split_among_replicas([1, 0, 1, 0], both, 2) == [[(0, 0, 1)], [(2, 1, 1)]]
    assert split_among_replicas([0, 1, 1, 0], [(1, 0)] * 4, 2) == [[(2, 1, 1)], [(1, 0, 1)]]
    # a worker already busy with an unreplicated expert's rows gets no odd row of a replicated one
    pieces = split_among_replicas([3, 5], [(0,), (0, 1)], 2)
    assert pieces == [[(0, 0, 3), (1, 3, 2)], [(1, 5, 3)]]
