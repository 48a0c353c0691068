"""Model math that both the router and the expert workers need: RMSNorm, gating, sort, combine.

Shape legend: T tokens, D hidden, I expert intermediate, E experts, K experts per token,
N rows sent to experts (N = T * K before any split across workers).
"""

from __future__ import annotations

import torch

from expertmesh.core import cpu_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled in the input dtype (as Mixtral was trained)."""
    kernels = cpu_kernels.for_rows(x)
    if kernels is not None and weight.dtype == torch.float32 and x.is_contiguous():
        return kernels.rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def top_k_gating(gate_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral gating: softmax over all experts in fp32, keep the top k, renormalise.

    gate_logits (T, E) -> weights (T, K) fp32 summing to 1, expert ids (T, K) int64.
    """
    kernels = cpu_kernels.for_rows(gate_logits)
    if kernels is not None and gate_logits.is_contiguous():
        return kernels.gate_top_k(gate_logits, k)
    probs = torch.softmax(gate_logits.float(), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, k, dim=-1)  # (T, K)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the (token, slot) pairs by expert.

    expert_ids (T, K) -> order (T*K,) indices into the flattened pairs, grouped by expert and
    stable within an expert; counts (E,) rows per expert.
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


def combine_rows(expert_out: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
                 num_tokens: int, k: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, accumulated in fp32.

    expert_out (N, D) in the order given by `order` (indices into the flattened (T, K) pairs),
    weights (T, K) fp32 -> (T, D) fp32.
    """
    kernels = cpu_kernels.for_rows(expert_out)
    if kernels is not None and expert_out.is_contiguous() and weights.is_contiguous():
        return kernels.combine(expert_out, order.contiguous(), weights, num_tokens)
    out = torch.zeros(num_tokens, expert_out.shape[-1], dtype=torch.float32, device=expert_out.device)
    scaled = expert_out.float() * weights.reshape(-1)[order, None]  # (N, D)
    return out.index_add_(0, order // k, scaled)
