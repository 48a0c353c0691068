"""RoPE and GQA attention over flat token rows, reading keys and values through the paged cache.

Shape legend: T tokens in the step (all sequences, flat), H query heads, G kv heads, Dh head dim,
C context length of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from router.kv_cache import KVCache


@dataclass
class AttentionBatch:
    """Where each sequence's new tokens sit in the flat rows and in the cache."""
    positions: torch.Tensor  # (T,) position of each row in its sequence
    slot_mapping: torch.Tensor  # (T,) cache slot each row's k/v is written to
    query_lens: list[int]  # new tokens per sequence; rows are sequence-major
    context_slots: list[torch.Tensor]  # per sequence: (C,) slots of all its positions so far

    @classmethod
    def build(cls, cache: KVCache, block_tables: list[list[int]], starts: list[int],
              query_lens: list[int]) -> "AttentionBatch":
        """Sequence i has cached tokens [0, starts[i]) and brings query_lens[i] new ones."""
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, query_lens)])
        context = [cache.slots(table, 0, s + n) for table, s, n in zip(block_tables, starts, query_lens)]
        new = torch.cat([c[s:] for c, s in zip(context, starts)])
        return cls(positions, new, list(query_lens), context)


class Rope:
    """Rotary embedding in the hub's half-split layout, cos/sin tables built once."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, Dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, Dh)
        self.cos, self.sin = emb.cos(), emb.sin()

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (T, heads, Dh) -> same shape, rotated by each row's position."""
        cos = self.cos[positions].to(x.dtype)[:, None, :]  # (T, 1, Dh)
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch, sliding_window: int | None) -> torch.Tensor:
    """Causal (optionally windowed) attention of each sequence's new rows over its cached context.

    q (T, H, Dh); k_cache/v_cache (S, G, Dh) for one layer, new rows already written -> (T, H, Dh).
    Decode rows (one new token) of all sequences go through one padded, masked attention call;
    prompt chunks go one sequence at a time.
    """
    out = torch.empty_like(q)
    starts = [0]
    for n in batch.query_lens[:-1]:
        starts.append(starts[-1] + n)
    decode = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if decode:
        slots = [batch.context_slots[i] for i in decode]
        lens = torch.tensor([s.shape[0] for s in slots])  # (B,)
        padded = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)  # (B, Cmax), pads read slot 0
        k = k_cache[padded].transpose(1, 2)  # (B, G, Cmax, Dh)
        v = v_cache[padded].transpose(1, 2)
        rows = torch.tensor([starts[i] for i in decode])
        k_pos = torch.arange(padded.shape[1])[None, :]  # (1, Cmax)
        mask = k_pos < lens[:, None]  # (B, Cmax); the query sits at position len - 1
        if sliding_window is not None:
            mask &= k_pos > (lens - 1)[:, None] - sliding_window
        o = F.scaled_dot_product_attention(q[rows].unsqueeze(2), k, v, attn_mask=mask[:, None, None, :],
                                           enable_gqa=True)  # (B, H, 1, Dh)
        out[rows] = o.squeeze(2)
    for i, (n, slots) in enumerate(zip(batch.query_lens, batch.context_slots)):
        if n == 1:
            continue
        row, c = starts[i], slots.shape[0]
        k = k_cache[slots].transpose(0, 1)  # (G, C, Dh)
        v = v_cache[slots].transpose(0, 1)
        q_seq = q[row:row + n].transpose(0, 1)  # (H, n, Dh)
        q_pos = torch.arange(c - n, c)[:, None]  # (n, 1)
        k_pos = torch.arange(c)[None, :]  # (1, C)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        o = F.scaled_dot_product_attention(q_seq, k, v, attn_mask=mask, enable_gqa=True)  # (H, n, Dh)
        out[row:row + n] = o.transpose(0, 1)
    return out
