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


@pytest.mark.parametrize("quantize, dtype", [("int8", torch.int8), ("fp8", torch.float8_e4m3fn),
                                             ("int4", torch.uint8)])
@pytest.mark.parametrize("counts", [[5, 0, 17, 1], [1], [33, 16]])
def test_triton_reads_quantized_stacks_as_the_per_expert_layers_compute(counts, quantize, dtype):
    """w8a16 and w4a16: int8, fp8 (e4m3) or int4 stacks and their scales through the Triton kernel (at
    any row count: there is no GEMM over such weights to hand large steps to) against the per-expert
    layers of the same experts, quantized the same way. int4's group scales change along k within a
    tile (d = 48: a group and a half; 80: two and a half)."""
    gen = torch.Generator().manual_seed(len(counts))
    d, inter = 48, 80
    experts = {e: (torch.randn(inter, d, generator=gen) * 0.1, torch.randn(d, inter, generator=gen) * 0.1,
                   torch.randn(inter, d, generator=gen) * 0.1) for e in range(0, 6, 2)}
    stacked = LayerExperts.stack(dict(experts), keep_stacks=True, quantize=quantize)
    per_expert = LayerExperts.stack(dict(experts), keep_stacks=False, quantize=quantize)
    assert stacked.w13.dtype == stacked.w2.dtype == dtype and not stacked.mlps
    if quantize != "int4":
        assert stacked.nbytes == 3 * (2 * inter * d + d * inter) + 3 * (2 * inter + d) * 4  # a byte + a scale per row
    else:  # half a byte a weight, a bf16 scale per row and 32 columns
        assert stacked.nbytes == 3 * (2 * inter * d // 2 + d * inter // 2) + 3 * (2 * inter * 2 + d * 3) * 2
    assert stacked.nbytes == 3 * LayerExperts.bytes_per_expert(d, inter, torch.float32, quantize, "cuda")
    expert_ids = [0, 2, 4, 2][: len(counts)]
    rows = torch.randn(sum(counts), d, generator=gen)
    expected = grouped_experts(rows, per_expert, expert_ids, counts)
    assert (grouped_experts(rows, stacked, expert_ids, counts) - expected).abs().max().item() < 1e-4
    # a change keeps the 8-bit rows and scales of the experts that stay, and quantizes the new one
    changed = stacked.changed({1: tuple(torch.randn(*w.shape, generator=gen) * 0.1 for w in experts[0])}, {2})
    assert sorted(changed.local) == [0, 1, 4] and changed.w13.dtype == dtype
    for e in (0, 4):
        assert torch.equal(changed.w13[changed.local[e]], stacked.w13[stacked.local[e]])
        assert torch.equal(changed.scales[1][changed.local[e]], stacked.scales[1][stacked.local[e]])
