"""Decode steps on fixed-size buffers, captured as CUDA graphs and replayed: the GPU's small-batch path.

At batch 1 on a GPU a decode step is a few hundred kernel launches whose arithmetic takes
microseconds: the launches are the step. Captured once per (batch bucket, context bucket) as a CUDA
graph, as vLLM and gpt-fast do, a step is one replay. Everything in it has a fixed shape: the batch
padded up to its bucket (padding rows write their k/v to the cache's scratch slot and are dropped),
the context padded up to a power of two with the mask built inside the graph from each sequence's
length, and the experts run as grouped GEMMs over device-side offsets (no host sync:
LocalExperts.run_by_offsets).

On the CPU the same function runs eagerly on the same buffers (capture=False), which is how the
tests check it: its tokens must equal the plain engine's.
Shape legend: B batch bucket, C context bucket, V vocab.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from expertmesh.router.attention import AttentionBatch
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.local_experts import LocalExperts
from expertmesh.router.model import RouterModel

log = logging.getLogger("expertmesh.graphs")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)  # decode steps of more sequences run the plain way
MIN_CONTEXT = 256  # the smallest context bucket; each next one doubles


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Where graphs are captured: CUDA, bf16, compute capability 8.0+ (the grouped GEMM's needs)."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@dataclass
class _Step:
    """One bucket's fixed buffers, and its graph once captured."""
    token_ids: torch.Tensor  # (B,) this step's token of each sequence
    positions: torch.Tensor  # (B,) its position
    slot_mapping: torch.Tensor  # (B,) where its k/v go
    context_slots: torch.Tensor  # (B, C) the slots of each sequence's context, this token's included
    lens: torch.Tensor  # (B,) context length
    rows: torch.Tensor  # (B,) 0..B-1: every row is a decode row
    logits: torch.Tensor | None = None  # (B, V) fp32, the graph's output
    graph: object = None


class _ByOffsets:
    """LocalExperts through their sync-free path, behind the start/finish interface of the model."""

    def __init__(self, experts: LocalExperts):
        self.experts = experts

    def start(self, layer, x, weights, ids):
        return self.experts.run_by_offsets(layer, x, weights, ids)

    def finish(self, result):
        return result


class DecodeGraphs:
    def __init__(self, model: RouterModel, experts: LocalExperts, cache: KVCache, capture: bool):
        assert experts.stacks is not None, "graphs need the experts stacked (LocalExperts(stacked=True))"
        self.model, self.cache, self.capture = model, cache, capture
        self.experts = _ByOffsets(experts)
        self.device = cache.k.device
        self.max_context = min(model.config.max_position_embeddings, cache.num_blocks * cache.block_size)
        self._steps: dict[tuple[int, int], _Step] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # steps run through here (tests and logs)

    def covers(self, seqs, num_new: list[int]) -> bool:
        """A decode step (one new token each) of at most the largest bucket's sequences."""
        return (len(seqs) <= BATCH_BUCKETS[-1] and all(n == 1 for n in num_new)
                and max(s.num_cached for s in seqs) < self.max_context)

    def run(self, seqs) -> torch.Tensor:
        """The step of `seqs` (see covers) -> logits (S, V) fp32 on the CPU."""
        b = len(seqs)
        batch = next(size for size in BATCH_BUCKETS if size >= b)
        context = MIN_CONTEXT
        while context < max(s.num_cached for s in seqs) + 1:
            context *= 2
        context = min(context, self.max_context)
        step = self._steps.get((batch, context)) or self._new_step(batch, context)
        self._fill(step, seqs)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._forward(step)
        self.replays += 1
        return step.logits[:b].cpu()

    def _new_step(self, batch: int, context: int) -> _Step:
        scratch = self.cache.scratch_slot
        full = lambda shape, value: torch.full(shape, value, dtype=torch.int64, device=self.device)  # noqa: E731
        # Padding values until the first fill: the warm-up and capture runs write only the scratch slot.
        step = _Step(token_ids=full((batch,), 0), positions=full((batch,), 0), slot_mapping=full((batch,), scratch),
                     context_slots=full((batch, context), scratch), lens=full((batch,), 1),
                     rows=torch.arange(batch, device=self.device))
        if self.capture:
            log.info("capturing the decode step for batch %d, context %d as a CUDA graph", batch, context)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # allocations and kernel autotuning happen outside the graph
                    self._forward(step)
            torch.cuda.current_stream().wait_stream(side)
            step.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(step.graph, pool=self._pool):
                step.logits = self._forward(step)
        self._steps[(batch, context)] = step
        return step

    def _fill(self, step: _Step, seqs) -> None:
        """This step's values into the fixed buffers; rows past len(seqs) are padding."""
        batch, context = step.context_slots.shape
        bs, scratch = self.cache.block_size, self.cache.scratch_slot
        lens = [s.num_cached + 1 for s in seqs]
        width = -(-context // bs)
        table = torch.tensor([s.block_table[:width] + [0] * (width - min(len(s.block_table), width)) for s in seqs])
        k_pos = torch.arange(context)
        slots = table[:, k_pos // bs] * bs + k_pos % bs  # (b, C)
        slots[k_pos[None, :] >= torch.tensor(lens)[:, None]] = scratch  # past each context's end
        pad = batch - len(seqs)
        host = {
            "token_ids": [s.token_ids[s.num_cached] for s in seqs] + [0] * pad,
            "positions": [n - 1 for n in lens] + [0] * pad,
            "slot_mapping": [int(slots[i, n - 1]) for i, n in enumerate(lens)] + [scratch] * pad,
            "lens": lens + [1] * pad,
        }
        for name, values in host.items():
            getattr(step, name).copy_(torch.tensor(values), non_blocking=True)
        step.context_slots[:len(seqs)].copy_(slots, non_blocking=True)
        step.context_slots[len(seqs):] = scratch

    def _forward(self, step: _Step) -> torch.Tensor:
        """The decode step on the fixed buffers -> logits (B, V) fp32. Captured as is."""
        batch, context = step.context_slots.shape
        k_pos = torch.arange(context, device=self.device)[None, :]  # (1, C)
        mask = k_pos < step.lens[:, None]  # (B, C)
        window = self.model.config.sliding_window
        if window is not None:
            mask &= k_pos > (step.lens - 1)[:, None] - window
        attention = AttentionBatch(positions=step.positions, slot_mapping=step.slot_mapping, query_lens=[1] * batch,
                                   decode_rows=step.rows, decode_slots=step.context_slots,
                                   decode_mask=mask[:, None, None, :], decode_lens=step.lens, prefill=[])
        h = self.model.forward([(step.token_ids, attention)], self.cache, self.experts)[0]
        return self.model.logits(h)
