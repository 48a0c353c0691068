"""y = x W^T with the weight prepared once, at load, for the fastest kernel of its device.

On the CPU the weight is reordered ("prepacked") for oneDNN once, as torch.compile's frozen graphs
do. On the 2-core CI machine (bench/linear.py) that ran the 32000-row lm_head 2-4x faster than
torch's default GEMM and the expert layers up to 3x faster from 8 rows up; the smallest layer
(384x256) came out about even, and a single row through a small layer slower by 0.01-0.02 ms.
Elsewhere (CUDA), or where oneDNN lacks the dtype, it is plain F.linear on the weight as given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_BATCH_HINT = 32  # rows the packed layout is tuned for; any row count works


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    except (RuntimeError, AttributeError):  # a torch build without these oneDNN ops
        return None


class Linear:
    """A bias-free linear layer; weight (out, in). Calling it maps x (n, in) -> (n, out)."""

    def __init__(self, weight: torch.Tensor):
        self.nbytes = weight.numel() * weight.element_size()
        self._packed = _prepack(weight)
        self.weight = weight if self._packed is None else None  # the packed copy replaces it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
