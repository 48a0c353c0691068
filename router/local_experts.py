"""All experts in the router's own process: the reference engine's MoE, no workers involved."""

from __future__ import annotations

import torch

from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.config import MixtralConfig
from expertmesh.core.grouped_experts import fused_expert, grouped_swiglu, grouped_swiglu_by_offsets, swiglu_expert
from expertmesh.core.heap import release_free_heap
from expertmesh.core.linear import Linear
from expertmesh.core.moe_math import combine_rows, sort_by_expert

FEW_TOKENS = 4  # up to this many tokens per step, experts run per token (decode at small batch)


class LocalExperts:
    def __init__(self, config: MixtralConfig, weights: dict[tuple[int, int], tuple[Linear, Linear]],
                 stacks: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.config = config
        self.weights = weights  # (layer, expert) -> (w13 (2I, D), w2 (D, I)), see fused_expert
        # (w13 (L, E, 2I, D), w2 (L, E, D, I)) for run_by_offsets; the layers above are views of them
        self.stacks = stacks

    @property
    def nbytes(self) -> int:
        """The bytes held (the stacks, where there are, once: the GPU's layers are views of them)."""
        if self.stacks is not None and self.stacks[0].device.type == "cuda":
            return sum(s.nbytes for s in self.stacks)
        return sum(w13.nbytes + w2.nbytes for w13, w2 in self.weights.values()) + (
            sum(s.nbytes for s in self.stacks) if self.stacks is not None else 0)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype, device: str | torch.device = "cpu",
                        stacked: bool = False, quantize: str = "none") -> "LocalExperts":
        """stacked: also hold each layer's experts as one tensor, for run_by_offsets (the per-expert
        layers become views of it on the GPU; the CPU's blocked layers are copies)."""
        c = checkpoint.config
        pairs = [(layer, e) for layer in range(c.num_layers) for e in range(c.num_experts)]
        weights = {p: tuple(w.to(device) for w in ws) for p, ws in checkpoint.read_experts(pairs, dtype).items()}
        if not stacked:
            experts = cls(c, {p: fused_expert(*weights.pop(p), quantize) for p in pairs})
            release_free_heap()  # the load's transients
            return experts
        assert quantize == "none", "the stacks' grouped GEMMs read unquantized weights"
        experts = [[weights[(layer, e)] for e in range(c.num_experts)] for layer in range(c.num_layers)]
        w13 = torch.stack([torch.stack([torch.cat([w1, w3]) for w1, _, w3 in layer]) for layer in experts])
        w2 = torch.stack([torch.stack([w2 for _, w2, _ in layer]) for layer in experts])
        del weights, experts
        layers = {(layer, e): (Linear(w13[layer, e]), Linear(w2[layer, e]))
                  for layer in range(c.num_layers) for e in range(c.num_experts)}
        return cls(c, layers, (w13, w2))

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
        expert takes: each token through its K experts, one row each (the linear kernel's bandwidth-bound case).
        Reads ids and weights on the host: no device to sync with on the CPU."""
        rows = []
        for t, (token_ids, token_weights) in enumerate(zip(ids.tolist(), weights.tolist())):
            acc = None
            for e, w in zip(token_ids, token_weights):
                y = swiglu_expert(x[t:t + 1], *self.weights[(layer, e)]).float()  # (1, D), a fresh tensor
                acc = y.mul_(w) if acc is None else acc.add_(y, alpha=w)
            rows.append(acc)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def run_by_offsets(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same sum with no host sync (needs `stacks`): rows sorted and counted on the device,
        the experts as grouped GEMMs over device-side offsets. What a captured graph replays."""
        k, num_experts = self.config.experts_per_token, self.config.num_experts
        flat = ids.reshape(-1)  # (N,)
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).index_add_(
            0, flat, torch.ones_like(flat))  # bincount syncs on CUDA to size its output; this does not
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        w13, w2 = self.stacks
        out = grouped_swiglu_by_offsets(x[order // k], offsets, w13[layer], w2[layer])
        return combine_rows(out, order, weights, x.shape[0], k)

    # The same start/finish interface as the dispatcher, so one forward loop serves both.
    def start(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.run(layer, x, weights, ids)

    def finish(self, result: torch.Tensor) -> torch.Tensor:
        return result
