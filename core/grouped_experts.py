"""Grouped SwiGLU experts, torch paths: per expert over host-side counts (the CPU's, and the GPU's
above TRITON_MAX_ROWS), and over device-side offsets with grouped GEMMs (no host sync: what a
captured CUDA graph can replay, router/decode_graphs.py).

Its Triton twin for GPUs is `grouped_experts_triton.py`, beside it. Shape legend: N rows sent to
experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels
from expertmesh.core.linear import Linear


def fused_expert(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                 quantize: str = "none") -> tuple[Linear, Linear]:
    """An expert as two linear layers: w13 = [w1; w3] (2I, D), one GEMM for gate and up, and w2.
    The weights may be views of a checkpoint's mapping (Linear lays w1 and w3 out in one copy)."""
    return Linear((w1, w3), quantize), Linear(w2, quantize)


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


def grouped_swiglu_by_offsets(rows: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor,
                              w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows grouped by expert, with no host sync (device-side group ends).

    rows (N, D) grouped by expert, expert e's rows ending at offsets[e] (E,) int32; w13 (E, 2I, D)
    (w1 then w3 of each expert), w2 (E, D, I) -> (N, D). Two grouped GEMMs, each reading every
    expert's weights once; an expert with no rows costs nothing.
    """
    gate, up = F.grouped_mm(rows, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # (N, I) each
    return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
