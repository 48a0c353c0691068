"""The Triton grouped-expert kernel against the torch path, on the CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run kernels on the CPU
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

from expertmesh.core.grouped_experts_triton import triton_grouped_swiglu  # noqa: E402
from expertmesh.workers.grouped_mlp import LayerExperts, grouped_experts  # noqa: E402


@pytest.mark.parametrize("counts", [[5, 0, 17, 1], [1], [0, 0, 3], [33, 16]])
def test_triton_matches_torch(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    d, inter, num_experts = 48, 80, 6  # not multiples of the block sizes: masks are exercised
    experts = {e: (torch.randn(inter, d, generator=gen) * 0.1, torch.randn(d, inter, generator=gen) * 0.1,
                   torch.randn(inter, d, generator=gen) * 0.1) for e in range(0, num_experts, 2)}
    layer = LayerExperts.stack(experts, keep_stacks=True)  # holds experts 0, 2, 4 of the layer
    expert_ids = [0, 2, 4, 2][: len(counts)]
    rows = torch.randn(sum(counts), d, generator=gen)
    expected = grouped_experts(rows, layer, expert_ids, counts)  # torch path (CPU tensors)
    got = triton_grouped_swiglu(rows, [layer.local[e] for e in expert_ids], counts, layer.w13, layer.w2)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
