"""Grouped SwiGLU experts in Triton: one launch per GEMM for all experts of a layer.

Rows arrive sorted by expert. The host cuts each expert's rows into tiles of BLOCK_M rows (a tile
never crosses an expert boundary), and each program computes one (tile, BLOCK_N columns) block
against that tile's expert, reading the stacked weights in place: no padding to capacity and no
per-row weight gathering. Kernel 1 fuses w1/w3 and SiLU (h = silu(x w1^T) * x w3^T), kernel 2 is
the down projection (y = h w2^T). Runs on GPU, and on the CPU under TRITON_INTERPRET=1 for tests.

int8 or fp8 weights (w8a16, core/quantize.py): the stacks hold int8 or float8 e4m3 and a scale per
output row; a weight tile is widened to the rows' dtype as it is loaded (fp8 e4m3 needs a GPU that
has it: Ada, Hopper), and each output column's sum is multiplied by its scale once, after the loop
over k (a per-output scale factors out of the sum). int4 (w4a16): the stacks hold two weights a byte
(pack_int4's layout: column 2c in byte c's low nibble) and a bf16 scale per output row and GROUP
columns; a tile's nibbles are unpacked, sign-extended and times their group's scale as they load
(the scale changes along k, so it cannot wait for the end).

Shape legend: N rows, D hidden, I intermediate, L local experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from expertmesh.core.quantize import GROUP


@triton.jit
def _nibbles(w_ptrs, s_ptrs, shift, mask, dtype: tl.constexpr):
    """A tile of int4 weights: each byte's nibble at `shift`, sign-extended (-8..7), times its scale."""
    nibble = (tl.load(w_ptrs, mask=mask, other=0).to(tl.int32) >> shift) & 0xF
    scale = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    return (((nibble ^ 8) - 8).to(tl.float32) * scale).to(dtype)


@triton.jit
def _grouped_gemm(x_ptr, w_ptr, w3_ptr, out_ptr, tile_start_ptr, tile_end_ptr, tile_expert_ptr,
                  s_ptr, s3_ptr, N_COLS, K, stride_xm, stride_we, stride_wn, stride_om, stride_se, stride_sn,
                  FUSE_SWIGLU: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    col_block = tl.program_id(1)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N_COLS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        w_mask = k_ok[:, None] & col_ok[None, :]
        if INT4:  # (BK, BN) = W^T: byte k // 2 of each output row, its k % 2 nibble, times its group's scale
            w_offsets = expert * stride_we + cols[None, :] * stride_wn + (ks // 2)[:, None]
            s_offsets = expert * stride_se + cols[None, :] * stride_sn + (ks // GROUP)[:, None]
            shift = ((ks % 2) * 4)[:, None]
            acc += tl.dot(x, _nibbles(w_ptr + w_offsets, s_ptr + s_offsets, shift, w_mask, x.dtype))
            if FUSE_SWIGLU:
                acc3 += tl.dot(x, _nibbles(w3_ptr + w_offsets, s3_ptr + s_offsets, shift, w_mask, x.dtype))
        else:
            w_offsets = expert * stride_we + cols[None, :] * stride_wn + ks[:, None]  # (BK, BN) = W^T
            acc += tl.dot(x, tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0).to(x.dtype))
            if FUSE_SWIGLU:
                acc3 += tl.dot(x, tl.load(w3_ptr + w_offsets, mask=w_mask, other=0.0).to(x.dtype))
    if SCALED:  # int8 / fp8 weights: each output column times its row's scale
        acc *= tl.load(s_ptr + expert * stride_se + cols, mask=col_ok, other=0.0)[None, :]
        if FUSE_SWIGLU:
            acc3 *= tl.load(s3_ptr + expert * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    if FUSE_SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc3  # silu(x w1^T) * (x w3^T)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _tiles(expert_index: list[int], counts: list[int], block_m: int, device) -> tuple:
    starts, ends, experts = [], [], []
    row = 0
    for idx, count in zip(expert_index, counts):
        for s in range(row, row + count, block_m):
            starts.append(s)
            ends.append(min(s + block_m, row + count))
            experts.append(idx)
        row += count
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(starts), as_tensor(ends), as_tensor(experts)


def triton_grouped_swiglu(rows: torch.Tensor, expert_index: list[int], counts: list[int],
                          w13s: torch.Tensor, w2s: torch.Tensor, scales: tuple | None = None,
                          block_m: int = 64, block_n: int = 128, block_k: int = 64,
                          num_warps: int = 8, num_stages: int = 4) -> torch.Tensor:
    """rows (N, D) grouped: counts[g] rows for stacked expert expert_index[g];
    w13s (L, 2I, D) contiguous (w1 rows, then w3 rows), w2s (L, D, I) contiguous -> (N, D).
    int8 and fp8 stacks come with scales = (s13 (L, 2I), s2 (L, D)) fp32, one per output row; int4
    ones (uint8, (L, 2I, ceil(D / 2)) and (L, D, ceil(I / 2))) with group scales (s13 (L, 2I,
    ceil(D / GROUP)), s2 (L, D, ceil(I / GROUP))) bf16."""
    n, d = rows.shape
    inter = w13s.shape[1] // 2
    out = torch.empty_like(rows)
    if n == 0:
        return out
    rows = rows.contiguous()
    starts, ends, experts = _tiles(expert_index, counts, block_m, rows.device)
    h = torch.empty(n, inter, dtype=rows.dtype, device=rows.device)  # (N, I)
    int4 = w13s.dtype == torch.uint8
    assert (scales is not None) == (w13s.dtype in (torch.int8, torch.float8_e4m3fn, torch.uint8)), \
        "int8, fp8 and int4 stacks need their scales, and only they"
    s13, s2 = scales if scales is not None else (w13s, w2s)  # (unread when not SCALED nor INT4)
    per_row = scales is not None and not int4
    # w1 and w3 of an expert share strides inside w13s (and s13); w3 starts `inter` rows further on.
    _grouped_gemm[(len(starts), triton.cdiv(inter, block_n))](
        rows, w13s, w13s[:, inter:], h, starts, ends, experts, s13, s13[:, inter:], inter, d, rows.stride(0),
        w13s.stride(0), w13s.stride(1), h.stride(0), s13.stride(0), s13.stride(1), FUSE_SWIGLU=True,
        SCALED=per_row, INT4=int4, GROUP=GROUP, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    _grouped_gemm[(len(starts), triton.cdiv(d, block_n))](
        h, w2s, w2s, out, starts, ends, experts, s2, s2, d, inter, h.stride(0), w2s.stride(0),
        w2s.stride(1), out.stride(0), s2.stride(0), s2.stride(1), FUSE_SWIGLU=False, SCALED=per_row,
        INT4=int4, GROUP=GROUP, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages)
    return out
