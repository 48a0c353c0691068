"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, read through block tables.

Storage per layer is flat slots: slot = block * block_size + offset. Shape legend: L layers,
S slots (num_blocks * block_size), G kv heads, Dh head dim.

Prefix caching: a full block is named by the SHA-256 of its tokens chained with its predecessors'
name and the request's cache salt (tenants that pass different salts never share a block). A new
sequence whose prompt starts with known full blocks shares them (reference counted), and only after
comparing each block's own record (its tokens, salt and parent block) with the prompt: a name
collision alone never hands one request another's cache. A freed block keeps its name until it is
handed out again, so a repeated prompt finds its blocks even after the first request finished;
free blocks are reused oldest-first.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

import torch

from expertmesh.core.config import MixtralConfig


class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


def sha256_name(parent: bytes, tokens: tuple[int, ...], salt: str) -> bytes:
    """A full block's name: SHA-256 over its parent's name, the cache salt and its token ids."""
    h = hashlib.sha256(parent)
    h.update(salt.encode())
    h.update(b"\0" + ",".join(map(str, tokens)).encode())
    return h.digest()


@dataclass(frozen=True)
class BlockRecord:
    """What a named block holds, checked on every match: its tokens, salt and parent (the block
    before it, as of that block's allocation `generation`; None for a prompt's first block)."""
    tokens: tuple[int, ...]
    salt: str
    parent: tuple[int, int] | None


class KVCache:
    def __init__(self, config: MixtralConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", name_block=sha256_name):
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
        self.name_block = name_block  # (parent name, tokens, salt) -> name
        self._name_of: dict[int, bytes] = {}  # block -> name of its full contents (prefix chain)
        self._block_named: dict[bytes, int] = {}  # name -> block
        self._record: dict[int, BlockRecord] = {}  # named block -> what it holds
        self._generation = [0] * num_blocks  # times each block was handed out

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
            del self._block_named[name], self._record[block]
        self._generation[block] += 1
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

    def _chain(self, tokens: list[int], start: int, stop: int, salt: str, parent: bytes = b""):
        """(name, tokens) of full blocks start..stop-1 of `tokens`, one at a time (a caller that stops
        early hashes no further); `parent`: the name of block start-1."""
        for b in range(start, stop):
            piece = tuple(tokens[b * self.block_size:(b + 1) * self.block_size])
            parent = self.name_block(parent, piece, salt)
            yield parent, piece

    def _parent(self, previous: int | None) -> tuple[int, int] | None:
        return None if previous is None else (previous, self._generation[previous])

    def match_prefix(self, tokens: list[int], salt: str = "") -> list[int]:
        """Share the cached full blocks that start `tokens` (under the same salt); at least one token
        is left to compute (its logits are needed). Returns the shared blocks, to start the
        sequence's block table."""
        shared: list[int] = []
        for name, piece in self._chain(tokens, 0, (len(tokens) - 1) // self.block_size, salt):
            block = self._block_named.get(name)
            parent = self._parent(shared[-1] if shared else None)
            if block is None or self._record[block] != BlockRecord(piece, salt, parent):
                break  # not cached, or a name collision: the block holds something else
            if self.ref_counts[block] == 0:
                self._free.remove(block)
                self.ref_counts[block] = 1
            else:
                self.ref_counts[block] += 1
            shared.append(block)
        return shared

    def name_full_blocks(self, block_table: list[int], tokens: list[int], num_cached: int, salt: str = "") -> None:
        """Make the sequence's full, computed blocks findable by later prompts."""
        full = min(num_cached // self.block_size, len(block_table))
        if full == 0 or block_table[full - 1] in self._name_of:
            return  # nothing new became full since the last call
        # Resume the chain after the last named block (named by this prompt's chain, or matched on
        # it): a long sequence hashes only its new blocks, not its whole prefix again.
        start = full - 1
        while start > 0 and block_table[start - 1] not in self._name_of:
            start -= 1
        parent = self._name_of[block_table[start - 1]] if start else b""
        # the block named by the previous chain name (a twin computed at the same time may hold it)
        previous = self._block_named[parent] if start else None
        for block, (name, piece) in zip(block_table[start:full], self._chain(tokens, start, full, salt, parent)):
            if block not in self._name_of and name not in self._block_named:
                self._name_of[block] = name
                self._block_named[name] = block
                self._record[block] = BlockRecord(piece, salt, self._parent(previous))
            previous = self._block_named.get(name, block)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a step's keys and values: k, v (T, G, Dh) at slots slot_mapping (T,) of `layer`."""
        self.k[layer][slot_mapping] = k
        self.v[layer][slot_mapping] = v

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of token positions [start, end) of a sequence. -> (end - start,) int64"""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size
