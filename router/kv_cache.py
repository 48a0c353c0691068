"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, read through block tables.

Storage per layer is flat slots: slot = block * block_size + offset. Shape legend: L layers,
S slots (num_blocks * block_size), G kv heads, Dh head dim.
"""

from __future__ import annotations

import torch

from cluster.config import MixtralConfig


class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


class KVCache:
    def __init__(self, config: MixtralConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)  # (L, S, G, Dh)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.ref_counts = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives low ids first

    @staticmethod
    def bytes_per_block(config: MixtralConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    @classmethod
    def from_memory_budget(cls, config: MixtralConfig, budget_bytes: int, block_size: int = 16,
                           dtype: torch.dtype = torch.float32) -> "KVCache":
        num_blocks = budget_bytes // cls.bytes_per_block(config, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget_bytes} bytes holds no block of "
                             f"{cls.bytes_per_block(config, block_size, dtype)} bytes")
        return cls(config, int(num_blocks), block_size, dtype)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV cache is full")
        block = self._free.pop()
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """Another sequence uses this block too (prefix sharing)."""
        assert self.ref_counts[block] > 0, "sharing a free block"
        self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            assert self.ref_counts[block] > 0, f"block {block} released twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append blocks to a table until it holds num_tokens (all or nothing)."""
        needed = self.blocks_needed(num_tokens) - len(block_table)
        if needed > len(self._free):
            raise OutOfBlocks(f"need {needed} blocks, {len(self._free)} free")
        block_table.extend(self.allocate() for _ in range(needed))

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of token positions [start, end) of a sequence. -> (end - start,) int64"""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
