"""The worker's experts of one layer, stacked, and the grouped MLP over them.

On GPU, small steps (decode) use the Triton grouped kernel, one launch for all experts; larger ones
use cuBLAS per expert, which was faster there on an H200 at Mixtral 8x7B sizes
(bench/results/experts_gpu_h200.txt: Triton 1.17x faster at 64 tokens, 0.70x at 1024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.moe_math import grouped_swiglu

TRITON_MAX_ROWS = 128  # rows (tokens x top-k) up to which the Triton kernel beat cuBLAS


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
    if rows.is_cuda and rows.shape[0] <= TRITON_MAX_ROWS:
        from workers.triton_moe import triton_grouped_swiglu

        return triton_grouped_swiglu(rows, index, counts, layer.w1, layer.w2, layer.w3)
    return grouped_swiglu(rows, counts, [(layer.w1[i], layer.w2[i], layer.w3[i]) for i in index])
