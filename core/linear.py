"""y = x W^T with the weight held once, at load, in the layout of the kernel that reads it.

  - CPU, where core/cpu_kernels.c builds: its blocked layout (panels of 16 outputs, k-major), read
    by one kernel at every row count: it streams the weight at 26-50 GB/s for decode's 1-8 rows
    (oneDNN's prepacked GEMM: 20-30) and is level with oneDNN from 32 rows up (bench/linear.py);
  - CPU without the kernels: oneDNN's prepacked copy where oneDNN takes the dtype (it refuses bf16
    on CPUs without AVX-512 BF16), else the weight as given for torch's F.linear;
  - GPU: the weight as given (cuBLAS).
`quantize="int8"` holds int8 and a scale per output, `"int4"` two weights a byte and a bf16 scale per
32 columns (core/quantize.py): the blocked kernel multiplies them as integers, with each row of x as
two int16 digits (core/cpu_kernels.c); elsewhere (GPU,
no kernels) each call dequantizes a chunk of outputs at a time, which saves the memory but not the
time. `"fp8"` (e4m3, a scale per output) is for GPU workers' expert stacks (the Triton kernel reads
them); a Linear holds it plain and dequantizes per call. Only one layout is ever held: `nbytes` is
the truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.core import cpu_kernels
from expertmesh.core.quantize import (
    GROUP,
    Q8_BLOCK,
    QUANTIZE,
    dequantize,
    dequantize_int4,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

BLOCKED = ("blocked", "blocked_q8", "blocked_q4")  # the layouts of core/cpu_kernels.c
PACK_BATCH_HINT = 32  # rows oneDNN's packed layout is tuned for; any row count works
DEQUANTIZE_ROWS = 2048  # outputs dequantized per pass where no int8 kernel reads the weight
_DEFAULT = object()


def _prepack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    except (RuntimeError, AttributeError):  # a torch build or a CPU without these oneDNN ops
        return None


def held_bytes(out_features: int, in_features: int, dtype: torch.dtype, quantize: str = "none",
               panel: int = 1) -> int:
    """The bytes Linear holds for an (out, in) weight of `dtype`, counted from the shape alone (the
    planner budgets Mixtral's 352 MB experts without reading one). panel: the C kernels' blocked
    layout pads the outputs to whole panels of this many; 1 for the other layouts."""
    if quantize == "fp8":  # e4m3, a fp32 scale per output; no kernel lays it out: never padded
        return out_features * in_features + out_features * 4
    rows = -(-out_features // panel) * panel
    if quantize == "w8a8" and panel > 1:  # int8, a fp32 scale per output; columns padded to Q8_BLOCK
        return rows * -(-in_features // Q8_BLOCK) * Q8_BLOCK + rows * 4
    if quantize == "w4a8" and panel > 1:  # two weights a byte, columns padded to Q8_BLOCK; int4's scales
        return rows * -(-in_features // Q8_BLOCK) * Q8_BLOCK // 2 + rows * -(-in_features // GROUP) * 2
    if quantize in ("int8", "w8a8"):  # int8, a fp32 scale per output; the blocked layout pairs the columns
        return rows * (in_features + (in_features % 2 if panel > 1 else 0)) + rows * 4
    if quantize in ("int4", "w4a8"):  # two weights a byte, a bf16 scale per GROUP columns
        return rows * -(-in_features // 2) + rows * -(-in_features // GROUP) * 2
    return rows * in_features * dtype.itemsize


class Linear:
    """A bias-free linear layer; weight (out, in). Calling it maps x (n, in) -> (n, out) in x's dtype.

    quantize: "none", "int8", "int4", "fp8", "w8a8" or "w4a8" (int8's or int4's weights; the C kernel
    also puts x on int8 grids, core/quantize.py). kernels: core/cpu_kernels.py's (default, where they
    build) or None (off: the torch paths, as on a machine without a C compiler).
    layout: "blocked" (the C kernel), "blocked_q8" / "blocked_q4" (its w8a8 / w4a8 kernels), "packed" (oneDNN), "plain"
    (F.linear), or "int8" / "int4" / "fp8" (plain, dequantized per call).
    """

    def __init__(self, weight: torch.Tensor | tuple[torch.Tensor, ...], quantize: str = "none", kernels=_DEFAULT):
        """weight: (out, in), or its rows in parts ((out_i, in) each: an expert's w1 and w3), which the
        kernel's layout takes unquantized straight into place, with no joined copy first (so parts
        may be views of a checkpoint's mapping)."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
        parts = weight if isinstance(weight, tuple) else (weight,)
        self.out_features, self.in_features = sum(part.shape[0] for part in parts), parts[0].shape[1]
        kernels = cpu_kernels.kernels() if kernels is _DEFAULT else kernels
        self.scale = self.group_scale = None  # int8's and fp8's per output; int4's per (output, group)
        if quantize == "none" and kernels is not None and kernels.supports(parts[0]):
            self.layout, self._kernels, self.weight = "blocked", kernels, kernels.blocked(*parts)  # (P, in, panel)
            return
        weight = torch.cat(parts) if len(parts) > 1 else parts[0]
        if quantize in ("int8", "w8a8"):
            weight, self.scale = quantize_int8(weight)
        elif quantize == "fp8":
            weight, self.scale = quantize_fp8(weight)
        elif quantize in ("int4", "w4a8"):
            weight, self.group_scale = quantize_int4(weight)  # (n, k) int8 in [-8, 7]
        if kernels is not None and quantize == "w4a8" and weight.device.type == "cpu":
            self.layout, self._kernels = "blocked_q4", kernels
            self.weight, self.group_scale = kernels.blocked_q4(weight, self.group_scale)
            return
        if kernels is not None and quantize == "w8a8" and weight.device.type == "cpu":
            self.layout, self._kernels, self.weight = "blocked_q8", kernels, kernels.blocked_q8(weight)
            self.scale = torch.cat([self.scale, self.scale.new_ones(-self.out_features % kernels.panel)])
            return
        if kernels is not None and quantize in ("int8", "int4") and weight.device.type == "cpu":
            self.layout, self._kernels = "blocked", kernels
            if quantize == "int4":  # (P, in / 2, panel) bytes, (P, groups, panel)
                self.weight, self.group_scale = kernels.blocked_int4(weight, self.group_scale)
            else:
                self.weight = kernels.blocked_int8(weight)  # (P, in / 2, 2 * panel): int8
            if self.scale is not None:  # one per output of the padded panels
                self.scale = torch.cat([self.scale, self.scale.new_ones(-self.out_features % kernels.panel)])
        elif quantize in ("int8", "fp8", "w8a8"):  # w8a8 without the kernels: int8's dequantizing path
            self.layout, self.weight = "int8" if quantize == "w8a8" else quantize, weight.contiguous()
        elif quantize in ("int4", "w4a8"):  # w4a8 without the kernels: int4's dequantizing path
            self.layout, self.weight = "int4", pack_int4(weight)  # (out, in / 2) bytes
        else:
            packed = _prepack(weight)
            self.layout = "plain" if packed is None else "packed"
            self.weight = weight.contiguous() if packed is None else packed

    @property
    def nbytes(self) -> int:
        """The bytes held: the weight in its layout and the scales beside it."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.group_scale)
                   if t is not None)

    def state(self) -> dict | None:
        """The held form, to hand to another process (a new copy of an expert from a peer's memory:
        nothing to read, convert, quantize or re-lay). `from_state` takes it back. None for oneDNN's
        packed layout, an opaque tensor that cannot leave its process."""
        if self.layout == "packed":
            return None
        return {"layout": self.layout, "weight": self.weight, "scale": self.scale, "group_scale": self.group_scale,
                "out_features": self.out_features, "in_features": self.in_features,
                "panel": self._kernels.panel if self.layout in BLOCKED else None}

    @classmethod
    def from_state(cls, state: dict) -> "Linear | None":
        """A layer from `state()`'s output; None where this process cannot read that layout (the
        sender's C kernels are not built here, or lay out other panels): read it from the checkpoint."""
        blocked = state["layout"] in BLOCKED
        kernels = cpu_kernels.kernels() if blocked else None
        if blocked and (kernels is None or kernels.panel != state["panel"]):
            return None
        layer = cls.__new__(cls)
        layer.layout, layer._kernels = state["layout"], kernels
        layer.weight, layer.scale, layer.group_scale = state["weight"], state["scale"], state["group_scale"]
        layer.out_features, layer.in_features = state["out_features"], state["in_features"]
        return layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout in ("blocked_q8", "blocked_q4"):
            y = (self._kernels.linear_q8(x, self.weight, self.out_features, self.scale) if self.layout == "blocked_q8"
                 else self._kernels.linear_q4(x, self.weight, self.out_features, self.group_scale))
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.layout == "blocked":
            y = self._kernels.linear(x, self.weight, self.out_features, self.scale, self.group_scale)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.layout == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        if self.layout == "plain":
            return F.linear(x, self.weight)
        y = torch.empty(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, DEQUANTIZE_ROWS):
            end = start + DEQUANTIZE_ROWS
            if self.layout in ("int8", "fp8"):
                weight = dequantize(self.weight[start:end], self.scale[start:end], x.dtype)
            else:
                q = unpack_int4(self.weight[start:end], self.in_features)
                weight = dequantize_int4(q, self.group_scale[start:end], x.dtype)
            y[:, start:end] = F.linear(x, weight)
        return y
