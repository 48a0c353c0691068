"""RoPE and GQA attention over flat token rows, reading keys and values through the paged cache.

Shape legend: T tokens in the step (all sequences, flat), H query heads, G kv heads, Dh head dim,
C context length of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertmesh.router.kv_cache import KVCache


@dataclass
class AttentionBatch:
    """Where each sequence's new tokens sit in the flat rows and in the cache, and the attention
    plan of the step (masks, padded slot tables), built once and used by every layer."""
    positions: torch.Tensor  # (T,) position of each row in its sequence
    slot_mapping: torch.Tensor  # (T,) cache slot each row's k/v is written to
    query_lens: list[int]  # new tokens per sequence; rows are sequence-major
    decode_rows: torch.Tensor | None  # (B,) rows of the sequences with one new token
    decode_slots: torch.Tensor | None  # (B, Cmax) their context slots, padded (pads read slot 0)
    decode_mask: torch.Tensor | None  # (B, 1, 1, Cmax) True where a key is attended; None: every key
    decode_lens: torch.Tensor | None  # (B,) context length of each of them (its query is the last)
    # (first row, n, slots (C,), mask (n, C) or None: causal over the n rows alone, C == n)
    prefill: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) at `positions`, set on first use

    @property
    def all_decode(self) -> bool:
        """Every sequence brings one token: the decode rows are all the rows, in order."""
        return not self.prefill

    @classmethod
    def build(cls, cache: KVCache, block_tables: list[list[int]], starts: list[int],
              query_lens: list[int], sliding_window: int | None = None) -> "AttentionBatch":
        """Sequence i has cached tokens [0, starts[i]) and brings query_lens[i] new ones."""
        if all(n == 1 for n in query_lens):
            return cls._decode_step(cache, block_tables, starts, sliding_window)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, query_lens)])
        context = [cache.slots(table, 0, s + n) for table, s, n in zip(block_tables, starts, query_lens)]
        new = torch.cat([c[s:] for c, s in zip(context, starts)])
        first_rows = torch.tensor([0, *query_lens[:-1]]).cumsum(0).tolist()
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        decode_rows = decode_slots = decode_mask = lens = None
        if decode:
            slots = [context[i] for i in decode]
            lens = torch.tensor([c.shape[0] for c in slots])  # (B,); the query sits at lens - 1
            decode_slots = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True)  # (B, Cmax)
            k_pos = torch.arange(decode_slots.shape[1])[None, :]  # (1, Cmax)
            mask = k_pos < lens[:, None]
            if sliding_window is not None:
                mask &= k_pos > (lens - 1)[:, None] - sliding_window
            decode_mask = mask[:, None, None, :]
            decode_rows = torch.tensor([first_rows[i] for i in decode])
        prefill = []
        for i, n in enumerate(query_lens):
            if n > 1:
                c = context[i].shape[0]
                mask = None  # a whole prompt, no window: plain causal, which SDPA's flash path takes unmasked
                if c > n or sliding_window is not None:
                    q_pos = torch.arange(c - n, c)[:, None]  # (n, 1)
                    k_pos = torch.arange(c)[None, :]  # (1, C)
                    mask = k_pos <= q_pos
                    if sliding_window is not None:
                        mask &= k_pos > q_pos - sliding_window
                prefill.append((first_rows[i], n, context[i], mask))
        return cls._on(cache.k.device, positions, new, list(query_lens), decode_rows, decode_slots, decode_mask,
                       lens, prefill)

    @classmethod
    def _decode_step(cls, cache: KVCache, block_tables: list[list[int]], starts: list[int],
                     sliding_window: int | None) -> "AttentionBatch":
        """Decode rows only (one new token per sequence, the common step): every sequence's slots
        from one padded block table in a few tensor ops, not per sequence."""
        bs, longest = cache.block_size, max(starts) + 1
        width = -(-longest // bs)  # blocks of the longest context
        table = torch.tensor([t[:width] + [0] * (width - min(len(t), width)) for t in block_tables])  # (B, nb)
        k_pos = torch.arange(longest)  # (Cmax,)
        slots = table[:, k_pos // bs] * bs + k_pos % bs  # (B, Cmax); past a sequence's end: padding
        lens = torch.tensor(starts) + 1  # (B,)
        positions = lens - 1
        new = slots.gather(1, positions[:, None]).squeeze(1)  # (B,) where this step's k/v go
        mask = None
        if sliding_window is not None and longest > sliding_window or min(starts) + 1 < longest:
            mask = k_pos[None, :] < lens[:, None]
            if sliding_window is not None:
                mask &= k_pos[None, :] > positions[:, None] - sliding_window
            mask = mask[:, None, None, :]
        rows = torch.arange(len(starts))
        return cls._on(cache.k.device, positions, new, [1] * len(starts), rows, slots, mask, lens, [])

    @classmethod
    def _on(cls, device: torch.device, positions, new, query_lens, decode_rows, decode_slots, decode_mask, lens,
            prefill) -> "AttentionBatch":
        """Built on the CPU (small integer work), used where the cache lives."""
        if device.type != "cpu":
            to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
            positions, new, decode_rows, decode_slots, decode_mask, lens = map(
                to, (positions, new, decode_rows, decode_slots, decode_mask, lens))
            prefill = [(row, n, to(slots), to(mask)) for row, n, slots, mask in prefill]
        return cls(positions, new, query_lens, decode_rows, decode_slots, decode_mask, lens, prefill)


class Rope:
    """Rotary embedding in the hub's half-split layout, cos/sin tables built once."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device | None = None):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, Dh/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (P, Dh)
        self.cos, self.sin = emb.cos().to(device), emb.sin().to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, 1, Dh), at the rows' positions."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, heads, Dh) -> same shape, rotated by each row's position."""
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    batch: AttentionBatch) -> torch.Tensor:
    """Causal (optionally windowed) attention of each sequence's new rows over its cached context.

    q (T, H, Dh); k_cache/v_cache (S, G, Dh) for one layer, new rows already written -> (T, H, Dh).
    Decode rows (one new token) of all sequences go through one padded, masked attention call;
    prompt chunks go one sequence at a time.
    """
    if batch.decode_rows is not None:
        slots = batch.decode_slots  # (B, Cmax)
        shape = (*slots.shape, *k_cache.shape[1:])
        k = k_cache.index_select(0, slots.view(-1)).view(shape).transpose(1, 2)  # (B, G, Cmax, Dh)
        v = v_cache.index_select(0, slots.view(-1)).view(shape).transpose(1, 2)
        q_decode = q if batch.all_decode else q[batch.decode_rows]  # (B, H, Dh)
        o = F.scaled_dot_product_attention(q_decode.unsqueeze(2), k, v,
                                           attn_mask=batch.decode_mask, enable_gqa=True)  # (B, H, 1, Dh)
        if batch.all_decode:
            return o.squeeze(2)
    out = torch.empty_like(q)
    if batch.decode_rows is not None:
        out[batch.decode_rows] = o.squeeze(2)
    for row, n, slots, mask in batch.prefill:
        # 4-d (a batch of one): the form SDPA's tiled (flash) CPU kernel takes; 3-d went through the
        # math path, which holds every (head, query, key) score (512 MB a layer at 4k tokens, 8 heads)
        k = k_cache[slots].transpose(0, 1)[None]  # (1, G, C, Dh)
        v = v_cache[slots].transpose(0, 1)[None]
        q_seq = q[row:row + n].transpose(0, 1)[None]  # (1, H, n, Dh)
        o = F.scaled_dot_product_attention(q_seq, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # (1, H, n, Dh)
        out[row:row + n] = o[0].transpose(0, 1)
    return out
