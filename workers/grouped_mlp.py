"""The worker's experts of one layer, and the grouped MLP over them.

On GPU, small steps (decode) use the Triton grouped kernel, one launch for all experts over the
stacked weights; larger ones use cuBLAS per expert, which was faster there on an H200 at Mixtral
8x7B sizes (bench/results/experts_gpu_h200.txt: Triton 1.17x faster at 64 tokens, 0.70x at 1024).
On the CPU each expert is a pair of linear layers (core/linear.py) and no stacks are kept. Quantized
experts on GPU are stacks the Triton kernel reads at every row count (it widens a weight tile as it
loads it): int8 or fp8 e4m3 with a scale per output row, int4 two weights a byte with a bf16 scale
per output row and 32 columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertmesh.core import cpu_kernels
from expertmesh.core.grouped_experts import fused_expert, grouped_swiglu
from expertmesh.core.linear import Linear, held_bytes
from expertmesh.core.quantize import pack_int4, quantize_fp8, quantize_int4, quantize_int8

TRITON_MAX_ROWS = 128  # rows (tokens x top-k) up to which the Triton kernel beat cuBLAS


def _packed_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (n, k) -> (two a byte (n, ceil(k / 2)) uint8, group scales (n, ceil(k / 32)) bf16)."""
    q, scale = quantize_int4(weight)
    return pack_int4(q), scale


@dataclass
class LayerExperts:
    """The experts a worker holds in one layer."""
    local: dict[int, int]  # global expert id -> local index
    mlps: list[tuple[Linear, Linear]]  # per local index: (w13 (2I, D), w2 (D, I)), as fused_expert; none
    # for quantized stacks
    w13: torch.Tensor | None  # (L, 2I, D): w1 then w3 of each expert, stacked for the Triton kernel
    w2: torch.Tensor | None  # (L, D, I)
    quantize: str = "none"  # "int8", "int4" or "fp8": each expert's layers quantized (core/quantize.py)
    # int8 / fp8 stacks': (s13 (L, 2I), s2 (L, D)) fp32; int4's: (s13 (L, 2I, D / 32), s2 (L, D, I / 32)) bf16
    scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def stack(cls, experts: dict[int, tuple], keep_stacks: bool | None = None,
              quantize: str = "none") -> "LayerExperts":
        """experts: global id -> (w1 (I, D), w2 (D, I), w3 (I, D)). Stacks are kept on GPU (or when
        asked), where the per-expert layers are views into them (quantized stacks have none). Without
        stacks it takes each expert out of `experts` as it prepares it: the plain weights go as it goes."""
        ids = sorted(experts)
        if keep_stacks is None:
            keep_stacks = experts[ids[0]][0].is_cuda
        local = {e: i for i, e in enumerate(ids)}
        if not keep_stacks:
            return cls(local, [fused_expert(*experts.pop(e), quantize) for e in ids], None, None, quantize)
        return cls._stacked(local, [(torch.cat([experts[e][0], experts[e][2]]), experts[e][1]) for e in ids],
                            quantize)

    @classmethod
    def _stacked(cls, local: dict[int, int], experts: list[tuple], quantize: str) -> "LayerExperts":
        """experts: per local index (w13 (2I, D), w2 (D, I)) in the checkpoint's dtype, or, for int8,
        fp8 and int4, already quantized ((q13, s13), (q2, s2)) (int4: q packed two a byte)."""
        if quantize == "none":
            w13 = torch.stack([w13 for w13, _ in experts]).contiguous()
            w2 = torch.stack([w2 for _, w2 in experts]).contiguous()
            return cls(local, [(Linear(w13[i]), Linear(w2[i])) for i in range(len(experts))], w13, w2)
        quantize = {"w8a8": "int8", "w4a8": "int4"}.get(quantize, quantize)  # the GPU's activations stay bf16
        quantized = {"fp8": quantize_fp8, "int8": quantize_int8, "int4": _packed_int4}[quantize]
        experts = [(w13, w2) if isinstance(w13, tuple) else (quantized(w13), quantized(w2)) for w13, w2 in experts]
        q13, s13 = torch.stack([q for (q, _), _ in experts]), torch.stack([s for (_, s), _ in experts])
        q2, s2 = torch.stack([q for _, (q, _) in experts]), torch.stack([s for _, (_, s) in experts])
        return cls(local, [], q13, q2, quantize, (s13, s2))

    @classmethod
    def empty(cls, quantize: str) -> "LayerExperts":
        """No expert yet (per-expert layers): what `changed` grows from."""
        return cls({}, [], None, None, quantize)

    def export(self, expert: int) -> tuple | None:
        """Expert `expert` as held, for a peer to take whole (`changed(prepared=...)`); None where it
        cannot leave this process (on a GPU, oneDNN's packed layout): read it from the checkpoint."""
        layers = self.mlps[self.local[expert]] if self.w13 is None else ()
        if not layers or layers[0].weight.device.type != "cpu":
            return None
        states = tuple(layer.state() for layer in layers)
        return None if None in states else states

    def changed(self, new: dict[int, tuple], gone: set[int], prepared: dict[int, tuple] | None = None,
                ) -> "LayerExperts | None":
        """This layer with experts `new` (global id -> raw (w1, w2, w3)) and `prepared` (global id ->
        (w13, w2) Linear layers, from a peer's `export`) added and `gone` removed; the experts that
        stay keep their prepared weights (nothing is read or packed again). None when no expert is left."""
        prepared = prepared or {}
        kept = [e for e in sorted(self.local) if e not in gone]
        ids = sorted(set(kept) | set(new) | set(prepared))
        if not ids:
            return None
        local = {e: i for i, e in enumerate(ids)}
        if self.w13 is None:
            mlps = [self.mlps[self.local[e]] if e in self.local
                    else prepared[e] if e in prepared
                    else fused_expert(*new[e], self.quantize) for e in ids]
            return LayerExperts(local, mlps, None, None, self.quantize)
        assert not prepared, "stacks take no prepared experts"
        return self._stacked(local, [self._held(self.local[e]) if e in self.local
                                     else (torch.cat([new[e][0], new[e][2]]), new[e][1]) for e in ids], self.quantize)

    def _held(self, i: int) -> tuple:
        """Stacked expert i as _stacked takes it back."""
        if self.scales is None:
            return self.w13[i], self.w2[i]
        return (self.w13[i], self.scales[0][i]), (self.w2[i], self.scales[1][i])

    @staticmethod
    def bytes_per_expert(hidden: int, intermediate: int, dtype: torch.dtype, quantize: str, device: str) -> int:
        """What one expert of these sizes takes here, from the shapes alone: as `stack` holds it on
        `device` ("cuda": the weights or quantized stacks as given; "cpu": the kernels' blocked layout,
        where they build). The placement's memory budget counts with it."""
        kernels = cpu_kernels.kernels() if device == "cpu" else None
        panel = kernels.panel if kernels is not None else 1
        return (held_bytes(2 * intermediate, hidden, dtype, quantize, panel)
                + held_bytes(hidden, intermediate, dtype, quantize, panel))

    @property
    def nbytes(self) -> int:
        if self.w13 is not None:  # the stacks (the per-expert layers are views of them)
            tensors = [self.w13, self.w2, *(self.scales or ())]
            return sum(t.numel() * t.element_size() for t in tensors)
        return sum(w13.nbytes + w2.nbytes for w13, w2 in self.mlps)


def grouped_experts(rows: torch.Tensor, layer: LayerExperts, expert_ids: list[int],
                    counts: list[int]) -> torch.Tensor:
    """rows (N, D) grouped by expert: counts[g] rows for global expert expert_ids[g] -> (N, D)."""
    index = [layer.local[e] for e in expert_ids]
    if layer.w13 is not None and (not layer.mlps or rows.is_cuda and rows.shape[0] <= TRITON_MAX_ROWS):
        from expertmesh.core.grouped_experts_triton import triton_grouped_swiglu

        return triton_grouped_swiglu(rows, index, counts, layer.w13, layer.w2, layer.scales)
    return grouped_swiglu(rows, counts, [layer.mlps[i] for i in index])
