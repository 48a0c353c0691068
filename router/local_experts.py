"""All experts in the router's own process: the reference engine's MoE, no workers involved."""

from __future__ import annotations

import torch

from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.config import MixtralConfig
from expertmesh.core.grouped_experts import fused_expert, grouped_swiglu, swiglu_expert
from expertmesh.core.linear import Linear
from expertmesh.core.moe_math import combine_rows, sort_by_expert

FEW_TOKENS = 4  # up to this many tokens per step, experts run per token (decode at small batch)


class LocalExperts:
    def __init__(self, config: MixtralConfig, weights: dict[tuple[int, int], tuple[Linear, Linear]]):
        self.config = config
        self.weights = weights  # (layer, expert) -> (w13 (2I, D), w2 (D, I)), see fused_expert

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype,
                        device: str | torch.device = "cpu") -> "LocalExperts":
        c = checkpoint.config
        pairs = [(layer, e) for layer in range(c.num_layers) for e in range(c.num_experts)]
        weights = checkpoint.read_experts(pairs, dtype)
        return cls(c, {p: fused_expert(*(w.to(device) for w in ws)) for p, ws in weights.items()})

    def run(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x (T, D), weights/ids (T, K) -> sum_k weights[:, k] * expert_{ids[:, k]}(x) (T, D) fp32."""
        if x.shape[0] <= FEW_TOKENS and x.device.type == "cpu":
            return self._per_token(layer, x, weights, ids)
        k, num_experts = self.config.experts_per_token, self.config.num_experts
        order, counts = sort_by_expert(ids, num_experts)
        rows = x[order // k]  # (T*K, D) grouped by expert
        experts = [self.weights[(layer, e)] for e in range(num_experts)]
        out = grouped_swiglu(rows, counts.tolist(), experts)
        return combine_rows(out, order, weights, x.shape[0], k)

    def _per_token(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum for a few tokens, without the sort, gather and scatter that grouping rows by
        expert takes: each token through its K experts, one row each (the GEMV kernel's case).
        Reads ids and weights on the host: no device to sync with on the CPU."""
        rows = []
        for t, (token_ids, token_weights) in enumerate(zip(ids.tolist(), weights.tolist())):
            acc = None
            for e, w in zip(token_ids, token_weights):
                y = swiglu_expert(x[t:t + 1], *self.weights[(layer, e)]).float()  # (1, D), a fresh tensor
                acc = y.mul_(w) if acc is None else acc.add_(y, alpha=w)
            rows.append(acc)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    # The same start/finish interface as the dispatcher, so one forward loop serves both.
    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.run(layer, x, weights, ids)

    def finish(self, result: torch.Tensor) -> torch.Tensor:
        return result
