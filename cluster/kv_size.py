"""How big a router's KV cache is: what --kv-cache-memory says, or by default what --max-seqs
sequences of the model's whole context need, capped by a share of the memory left free once this
machine's weights are loaded (the cache is allocated before them). Printed at start-up in bytes and
tokens, so an operator sees what a default chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expertmesh.cluster.memory_budget import expert_bytes
from expertmesh.core.config import MixtralConfig
from expertmesh.core.settings import ServingConfig
from expertmesh.router.engine import DTYPES
from expertmesh.router.kv_cache import KVCache

# Of the memory free after the weights: the rest is for activations, the allocator's slack, the
# tokenizer, Ray, and whatever else shares the machine.
KV_SHARE_OF_FREE = 0.5


class KVSizeError(ValueError):
    """A KV cache that holds no block of this model; the message says why."""


@dataclass(frozen=True)
class KVSize:
    blocks: int
    block_size: int  # tokens per block
    bytes_per_block: int
    why: str  # how the size was chosen, for the start-up line

    @property
    def nbytes(self) -> int:
        return self.blocks * self.bytes_per_block

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    def describe(self) -> str:
        return (f"KV cache {self.nbytes / 2**20:.1f} MiB: {self.tokens} tokens in {self.blocks} blocks of "
                f"{self.block_size} ({self.why})")


def kv_size(config: MixtralConfig, settings: ServingConfig, experts_here: int, device: str = "cpu",
            free_bytes: int | None = None) -> KVSize:
    """The KV cache of one router. experts_here: the (layer, expert) weights this machine will load
    besides the router's own (all of them in-process or on an embedded Ray's local workers);
    free_bytes: the memory free now (default: read from the machine)."""
    per_block = KVCache.bytes_per_block(config, settings.block_size, DTYPES[settings.dtype])
    if settings.kv_cache_memory is not None:
        blocks = settings.kv_cache_bytes // per_block
        if blocks < 1:
            raise KVSizeError(f"--kv-cache-memory {settings.kv_cache_memory} holds no KV block of this model "
                              f"({per_block} bytes each)")
        return KVSize(blocks, settings.block_size, per_block, f"--kv-cache-memory {settings.kv_cache_memory}")
    context = config.max_position_embeddings
    wanted = settings.max_seqs * math.ceil(context / settings.block_size)
    weights = router_bytes(config, settings) + experts_here * expert_bytes(config, settings, device == "cuda")
    free = free_memory(device) if free_bytes is None else free_bytes
    room = int(KV_SHARE_OF_FREE * (free - weights)) // per_block
    if room >= wanted:
        return KVSize(wanted, settings.block_size, per_block, f"--max-seqs {settings.max_seqs} x {context}-token "
                      "context")
    if room < 1:
        raise KVSizeError(f"no memory left for a KV cache: {free / 2**30:.1f} GiB free, the weights need "
                          f"{weights / 2**30:.1f} GiB (set --kv-cache-memory, or use --quantize or more workers)")
    return KVSize(room, settings.block_size, per_block, f"capped at {KV_SHARE_OF_FREE:.0%} of the "
                  f"{(free - weights) / 2**30:.1f} GiB free after weights; --max-seqs {settings.max_seqs} x "
                  f"{context}-token context would take {wanted * per_block / 2**30:.1f} GiB")


def router_bytes(config: MixtralConfig, settings: ServingConfig) -> int:
    """A router's own weights at the compute dtype (embeddings, lm_head, attention, gates; an upper
    bound where --quantize shrinks some)."""
    c = config
    attention = c.hidden_size * (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim)
    params = 2 * c.vocab_size * c.hidden_size + c.num_layers * (attention + c.num_experts * c.hidden_size)
    return params * torch.empty((), dtype=DTYPES[settings.dtype]).element_size()


def free_memory(device: str) -> int:
    """Bytes this process may still take: the GPU's free memory, or the machine's available memory
    within this container's cgroup limit."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    available = _meminfo("MemAvailable")
    try:  # cgroup v2: a pod's limit, less what the pod already uses
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            available = min(available, int(limit) - used)
    except OSError:
        pass
    return available


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/meminfo has no {field}")
