"""Weight-only int8: symmetric, one scale per output channel, quantized at load.

W (n, k) -> q (n, k) int8 in [-127, 127] and scale (n,) fp32 with W ~= q * scale[:, None], scale =
max |W[o, :]| / 127. The activations stay fp32 (bf16 on the GPU): only the weights' bytes shrink (4x
from fp32, 2x from bf16), which is what bounds decode at small batches. A weight's error is at most
scale / 2 per entry (half a step); tests/test_quantize.py bounds what that does to the logits.
"""

from __future__ import annotations

import torch

QUANTIZE = ("none", "int8")  # the values of --quantize
ROWS_AT_ONCE = 4096  # rows converted per pass: bounds the fp32 working copy of a large bf16 weight


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (n, k), any float dtype -> (q (n, k) int8, scale (n,) fp32). Rows of zeros get scale 1."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, ROWS_AT_ONCE):
        rows = weight[start:start + ROWS_AT_ONCE].float()
        step = rows.abs().amax(dim=1) / 127
        step = torch.where(step > 0, step, torch.ones_like(step))
        q[start:start + ROWS_AT_ONCE] = torch.round(rows / step[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + ROWS_AT_ONCE] = step
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (n, k) int8, scale (n,) -> (n, k) in dtype."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)
