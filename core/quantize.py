"""Weight-only quantization at load: int8 or fp8 per output channel, int4 per group of 32 columns.

int8: W (n, k) -> q (n, k) int8 in [-127, 127] and scale (n,) fp32 with W ~= q * scale[:, None], scale
= max |W[o, :]| / 127. int4: the same per group of GROUP columns of a row, q in [-8, 7] (the largest
|W| of the group maps to 7), scale (n, ceil(k / GROUP)) rounded to bf16 first (what is stored: 4.5 bits
a weight in all, as llama.cpp's Q4_0). Only the weights' bytes shrink, which is what bounds decode at
small batches: the activations stay fp32 (bf16 on the GPU); the CPU's int8 and int4 kernels write
each row of x as two int16 digits for integer products (core/cpu_kernels.c), as fine as fp32 for
every value above 1/256 of the row's largest. w8a8: int8's weights, and the CPU kernel puts each row
of x on an int8 grid per block of 32 columns too (llama.cpp's Q8_0 arithmetic: byte products, about
twice int8's prefill speed; a token decoded and the same token prefilled then differ by more than
fp32's rounding); elsewhere it is int8. w4a8: int4's weights times x on those grids (llama.cpp's
Q4_0 x Q8_0); elsewhere int4. A weight's error is at most half a step
(plus the bf16 rounding of int4's scale); tests/test_quantize.py bounds what that does to the logits.

fp8: W -> q (n, k) float8 e4m3 and scale (n,) fp32, scale = max |W[o, :]| / 448 (e4m3's largest
finite value), as vLLM's per-channel fp8 checkpoints. e4m3 keeps 3 mantissa bits: a weight's error
is relative (at most 1/16 of it), not a fixed step, so small weights keep more of their value than
in int8 and large ones less. For GPU workers (Hopper: the Triton grouped kernel widens it as it
loads); elsewhere each call dequantizes, which saves the memory but not the time.
"""

from __future__ import annotations

import torch

QUANTIZE = ("none", "int8", "int4", "fp8", "w8a8", "w4a8")  # the values of --quantize
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
GROUP = 32  # int4's columns per scale (core/cpu_kernels.c's GROUP)
ROWS_AT_ONCE = 4096  # rows converted per pass: bounds the fp32 working copy of a large bf16 weight


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (n, k), any float dtype -> (q (n, k) int8, scale (n,) fp32). Rows of zeros get scale 1."""
    return _per_output_channel(weight, torch.int8, 127, lambda scaled: torch.round(scaled).clamp_(-127, 127))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (n, k), any float dtype -> (q (n, k) float8 e4m3, scale (n,) fp32). Rows of zeros get scale 1."""
    return _per_output_channel(weight, FP8, FP8_MAX, lambda scaled: scaled.clamp_(-FP8_MAX, FP8_MAX))


def _per_output_channel(weight: torch.Tensor, dtype: torch.dtype, top: float, to_grid) -> tuple:
    """Each row scaled so that its largest |w| is `top`, put on dtype's grid by `to_grid` and cast:
    (q (n, k) dtype, scale (n,) fp32)."""
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, ROWS_AT_ONCE):
        rows = weight[start:start + ROWS_AT_ONCE].float()
        step = rows.abs().amax(dim=1) / top
        step = torch.where(step > 0, step, torch.ones_like(step))
        q[start:start + ROWS_AT_ONCE] = to_grid(rows / step[:, None]).to(dtype)
        scale[start:start + ROWS_AT_ONCE] = step
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (n, k) int8 or fp8, scale (n,) -> (n, k) in dtype."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (n, k) -> (q (n, k) int8 in [-8, 7], scale (n, ceil(k / GROUP)) bf16)."""
    n, k = weight.shape
    groups = -(-k // GROUP)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, groups, dtype=torch.bfloat16, device=weight.device)
    for start in range(0, n, ROWS_AT_ONCE):
        rows = weight[start:start + ROWS_AT_ONCE].float()
        padded = torch.nn.functional.pad(rows, (0, groups * GROUP - k)).view(rows.shape[0], groups, GROUP)
        step = (padded.abs().amax(dim=2) / 7).to(torch.bfloat16)
        step = torch.where(step > 0, step, torch.ones_like(step))
        quantized = torch.round(padded / step.float()[:, :, None]).clamp_(-8, 7)
        q[start:start + ROWS_AT_ONCE] = quantized.view(rows.shape[0], -1)[:, :k].to(torch.int8)
        scale[start:start + ROWS_AT_ONCE] = step
    return q, scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (n, k) in [-8, 7], scale (n, groups) -> (n, k) in dtype."""
    k = q.shape[1]
    return (q.float() * scale.float().repeat_interleave(GROUP, dim=1)[:, :k]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., k) in [-8, 7] -> (..., ceil(k / 2)) uint8, entries 2c and 2c + 1 of the last dimension in
    byte c's low and high nibble."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    nibbles = q.to(torch.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """pack_int4's inverse: (n, ceil(k / 2)) uint8 -> (n, k) int8."""
    low = (packed << 4).view(torch.int8) >> 4  # sign-extended
    high = packed.view(torch.int8) >> 4
    return torch.stack([low, high], dim=2).view(packed.shape[0], -1)[:, :k]


Q8_BLOCK = 32  # w8a8: columns of x per int8 grid (core/cpu_kernels.c's QB)


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """What the w8a8 kernel multiplies its weights by (core/cpu_kernels.c): each row of x (m, k) on an
    int8 grid of its own per block of Q8_BLOCK columns, x ~= xs * q with xs = the block's max |x| / 127
    and |q| <= 127; returned dequantized, fp32 (m, k)."""
    m, k = x.shape
    padded = torch.zeros(m, -(-k // Q8_BLOCK) * Q8_BLOCK, dtype=torch.float32)
    padded[:, :k] = x
    blocks = padded.view(m, padded.shape[1] // Q8_BLOCK, Q8_BLOCK)
    top = blocks.abs().amax(-1, keepdim=True)
    step = top / 127.0
    inverse = torch.where(top > 0, 127.0 / torch.where(top > 0, top, 1.0), 0.0)
    q = torch.round(blocks * inverse).clamp(-127, 127)
    return (q * step).view(m, padded.shape[1])[:, :k]
