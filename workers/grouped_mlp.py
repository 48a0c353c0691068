"""The worker's grouped expert MLP: Triton on GPU when available, torch otherwise."""

from __future__ import annotations

import torch

from cluster.moe_math import grouped_swiglu


def grouped_experts(rows: torch.Tensor, counts: list[int], experts: list[tuple]) -> torch.Tensor:
    """rows (N, D) grouped by expert, counts[i] rows for experts[i] = (w1, w2, w3) -> (N, D)."""
    if rows.is_cuda:
        from workers.triton_moe import triton_grouped_swiglu

        return triton_grouped_swiglu(rows, counts, experts)
    return grouped_swiglu(rows, counts, experts)
