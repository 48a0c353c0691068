"""The worker's experts of one layer, stacked, and the grouped MLP over them (Triton on GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.moe_math import grouped_swiglu


@dataclass
class LayerExperts:
    """The experts a worker holds in one layer, stacked so one kernel launch serves them all."""
    local: dict[int, int]  # global expert id -> index in the stacks
    w1: torch.Tensor  # (L, I, D)
    w2: torch.Tensor  # (L, D, I)
    w3: torch.Tensor  # (L, I, D)

    @classmethod
    def stack(cls, experts: dict[int, tuple]) -> "LayerExperts":
        ids = sorted(experts)
        return cls({e: i for i, e in enumerate(ids)},
                   *(torch.stack([experts[e][j] for e in ids]).contiguous() for j in range(3)))


def grouped_experts(rows: torch.Tensor, layer: LayerExperts, expert_ids: list[int],
                    counts: list[int]) -> torch.Tensor:
    """rows (N, D) grouped by expert: counts[g] rows for global expert expert_ids[g] -> (N, D)."""
    index = [layer.local[e] for e in expert_ids]
    if rows.is_cuda:
        from workers.triton_moe import triton_grouped_swiglu

        return triton_grouped_swiglu(rows, index, counts, layer.w1, layer.w2, layer.w3)
    return grouped_swiglu(rows, counts, [(layer.w1[i], layer.w2[i], layer.w3[i]) for i in index])
