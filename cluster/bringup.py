"""Bring up the engine: in this process (--workers 0), or the expert-parallel cluster
(cluster/elastic.py). `start_engine` is the one factory that `run` and `serve` use.
"""

from __future__ import annotations

import time
from pathlib import Path

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.worker_pool import progress, use_gpus
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache


class UsageError(ValueError):
    """Options that do not go together; the message says which."""


def kv_blocks_for(config, settings: ServingConfig) -> int:
    """KV blocks that settings.kv_cache_memory holds for this model."""
    per_block = KVCache.bytes_per_block(config, settings.block_size, DTYPES[settings.dtype])
    blocks = settings.kv_cache_bytes // per_block
    if blocks < 1:
        raise UsageError(f"--kv-cache-memory {settings.kv_cache_memory} holds no KV block of this model "
                         f"({per_block} bytes each)")
    return blocks


def start_engine(model_dir: str | Path, settings: ServingConfig = DEFAULTS, workers: int = 0,
                 replicas: str | None = None, placement: str | None = None,
                 address: str | None = None) -> tuple[Engine, "ExpertCluster | None"]:
    """The engine for `run` and `serve`: every weight in this process with workers=0, else expert
    workers on Ray. Returns (engine, cluster or None); the caller shuts the cluster down."""
    if workers < 0:
        raise UsageError("--workers must be >= 0")
    config = Checkpoint(model_dir).config
    blocks = kv_blocks_for(config, settings)
    start = time.monotonic()
    if workers == 0:
        if replicas or placement or address:
            raise UsageError("--replicas, --placement and --address need --workers N (N >= 1)")
        progress(f"loading {model_dir} in this process")
        engine = Engine.local(model_dir, DTYPES[settings.dtype], kv_blocks=blocks, block_size=settings.block_size,
                              device="cuda" if use_gpus(settings.device) else "cpu",
                              graphs=None if settings.cuda_graphs else False, quantize=settings.quantize)
        cluster = None
    else:
        progress(f"starting {workers} expert workers on Ray "
                 f"({'joining ' + address if address else 'embedded local cluster'})")
        from expertmesh.cluster.placement import PlacementPlan

        plan = PlacementPlan.from_file(placement) if placement else None
        cluster = ExpertCluster(model_dir, workers, plan=plan, replicas=replicas, address=address,
                                settings=settings, kv_blocks=blocks)
        engine = cluster.engine
        for worker, nbytes in enumerate(cluster.worker_bytes):
            progress(f"worker {worker}: {len(cluster.plan.worker_pairs(worker))} experts, "
                     f"{nbytes / 2**20:.1f} MiB")
    progress(f"model ready in {time.monotonic() - start:.1f}s: {config.num_layers} layers, "
             f"{config.num_experts} experts, KV cache {blocks} blocks of {settings.block_size} tokens")
    return engine, cluster
