"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, read through block tables.

Storage per layer is flat slots: slot = block * block_size + offset. Shape legend: L layers,
S slots (num_blocks * block_size), G kv heads, Dh head dim.

Prefix caching: a full block is named by the hash of its tokens chained with its predecessors'.
A new sequence whose prompt starts with known full blocks shares them (reference counted). A freed
block keeps its name until it is handed out again, so a repeated prompt finds its blocks even after
the first request finished; free blocks are reused oldest-first.
"""

from __future__ import annotations

from collections import deque

import torch

from expertmesh.core.config import MixtralConfig


class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


class KVCache:
    def __init__(self, config: MixtralConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        # One slot more than the blocks hold: where padding rows of a fixed-size (graph-captured)
        # step write their k/v; never handed out, never read as context.
        self.scratch_slot = slots
        shape = (config.num_layers, slots + 1, config.num_kv_heads, config.head_dim)  # (L, S + 1, G, Dh)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))  # oldest-freed first
        self._name_of: dict[int, int] = {}  # block -> hash of its full contents (prefix chain)
        self._block_named: dict[int, int] = {}  # hash -> block

    @staticmethod
    def bytes_per_block(config: MixtralConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks("KV cache is full")
        block = self._free.popleft()
        name = self._name_of.pop(block, None)
        if name is not None:  # its old contents are overwritten from now on
            del self._block_named[name]
        self.ref_counts[block] = 1
        return block

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

    def _chain(self, tokens: list[int], num_blocks: int) -> list[int]:
        names, parent = [], 0
        for b in range(num_blocks):
            parent = hash((parent, tuple(tokens[b * self.block_size:(b + 1) * self.block_size])))
            names.append(parent)
        return names

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Share the cached full blocks that start `tokens`; at least one token is left to compute
        (its logits are needed). Returns the shared blocks, to start the sequence's block table."""
        shared = []
        for name in self._chain(tokens, (len(tokens) - 1) // self.block_size):
            block = self._block_named.get(name)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                self._free.remove(block)
                self.ref_counts[block] = 1
            else:
                self.ref_counts[block] += 1
            shared.append(block)
        return shared

    def name_full_blocks(self, block_table: list[int], tokens: list[int], num_cached: int) -> None:
        """Make the sequence's full, computed blocks findable by later prompts."""
        full = min(num_cached // self.block_size, len(block_table))
        if full == 0 or block_table[full - 1] in self._name_of:
            return  # nothing new became full since the last call: skip re-hashing the prefix
        for block, name in zip(block_table[:full], self._chain(tokens, full)):
            if block not in self._name_of and name not in self._block_named:
                self._name_of[block] = name
                self._block_named[name] = block

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a step's keys and values: k, v (T, G, Dh) at slots slot_mapping (T,) of `layer`."""
        self.k[layer][slot_mapping] = k
        self.v[layer][slot_mapping] = v

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of token positions [start, end) of a sequence. -> (end - start,) int64"""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
