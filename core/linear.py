"""y = x W^T with the weight prepared once, at load, for the fastest kernel of its device.

On the CPU two paths, chosen per call by the number of rows (bench/linear.py measures both):
  - up to 2 rows (decode at batch 1-2, an expert's few rows): the bandwidth-bound GEMV of
    core/cpu_kernels.c over the weight as given, 1.2-2x oneDNN's speed at one row here;
  - more rows: oneDNN's GEMM on a copy of the weight reordered ("prepacked") for it once, as
    torch.compile's frozen graphs do; on the 2-core CI machine 2-4x torch's default GEMM on the
    32000-row lm_head and up to 3x on the expert layers from 8 rows up.
Holding both layouts costs the CPU twice the weights' memory. Elsewhere (CUDA), or where oneDNN lacks
the dtype, it is plain F.linear on the weight as given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels

PACK_BATCH_HINT = 32  # rows the packed layout is tuned for; any row count works
_DEFAULT = object()


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
    """A bias-free linear layer; weight (out, in). Calling it maps x (n, in) -> (n, out).

    gemv_kernel: the kernels for calls of few rows (default: core/cpu_kernels.py's, where they build;
    None: off).
    """

    def __init__(self, weight: torch.Tensor, gemv_kernel=_DEFAULT):
        self.nbytes = weight.numel() * weight.element_size()
        self._packed = _prepack(weight)
        small = cpu_kernels.kernels() if gemv_kernel is _DEFAULT else gemv_kernel
        self._small = small if small is not None and small.supports(weight) else None
        self.small_rows = self._small.max_rows if self._small is not None else 0  # calls the kernel takes
        keep_plain = self._packed is None or self._small is not None
        self.weight = weight.contiguous() if keep_plain else None  # else the packed copy replaces it

    @property
    def packed(self) -> bool:
        """oneDNN took the weight (it refuses bf16 on CPUs without AVX-512 BF16 support, e.g. AVX2)."""
        return self._packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.small_rows and x.shape[0]:
            return self._small.gemv(x, self.weight)
        if self._packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")
