"""Grouped SwiGLU experts, torch path (the CPU's, and the GPU's above TRITON_MAX_ROWS).

Its Triton twin for GPUs is `grouped_experts_triton.py`, beside it. Shape legend: N rows sent to
experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear


def fused_expert(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> tuple[Linear, Linear]:
    """An expert as two linear layers: w13 = [w1; w3] (2I, D), one GEMM for gate and up, and w2."""
    return Linear(torch.cat([w1, w3])), Linear(w2)


def swiglu_expert(x: torch.Tensor, w13: Linear, w2: Linear) -> torch.Tensor:
    """One expert: w2(silu(w1 x) * w3 x). x (n, D) -> (n, D)."""
    gate_up = w13(x)  # (n, 2I): gate, then up
    kernels = cpu_kernels.for_rows(gate_up)
    if kernels is not None:
        return w2(kernels.silu_mul(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)  # (n, I) each
    return w2(F.silu(gate) * up)


def grouped_swiglu(rows: torch.Tensor, counts: list[int], experts: list[tuple[Linear, Linear]]) -> torch.Tensor:
    """SwiGLU experts over rows already grouped by expert (torch path).

    rows (N, D) with counts[i] consecutive rows for experts[i] = (w13, w2) -> (N, D).
    One GEMM chain per expert over its contiguous rows: no per-row weight gathering.
    """
    out = torch.empty_like(rows)
    start = 0
    for count, (w13, w2) in zip(counts, experts):
        if count:
            out[start:start + count] = swiglu_expert(rows[start:start + count], w13, w2)
        start += count
    return out
