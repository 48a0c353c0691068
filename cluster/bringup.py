"""Bring up the engine: in this process (--workers 0), or the expert-parallel cluster
(cluster/elastic.py). `start_engine` is the one factory that `run` and `serve` use.
"""

from __future__ import annotations

import time
from pathlib import Path

from expertmesh.cluster.elastic import ExpertCluster
from expertmesh.cluster.kv_size import KVSize, KVSizeError, kv_size
from expertmesh.cluster.progress import progress
from expertmesh.cluster.worker_pool import use_gpus
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.router.engine import DTYPES, Engine


class UsageError(ValueError):
    """Options that do not go together; the message says which."""


def router_kv_cache(config, settings: ServingConfig, workers: int = 0, local_ray: bool = True) -> KVSize:
    """The KV cache of a router (cluster/kv_size.py), counting the experts this machine will load:
    all of them in-process (workers=0), the workers' copies on an embedded Ray."""
    experts = config.num_layers * config.num_experts
    here = experts if workers == 0 else experts * min(settings.redundancy, workers) if local_ray else 0
    try:
        return kv_size(config, settings, here, "cuda" if use_gpus(settings.device) else "cpu")
    except KVSizeError as exc:
        raise UsageError(str(exc)) from None


def start_engine(model_dir: str | Path, settings: ServingConfig = DEFAULTS, workers: int = 0,
                 replicas: str | None = None, placement: str | None = None,
                 address: str | None = None) -> tuple[Engine, "ExpertCluster | None"]:
    """The engine for `run` and `serve`: every weight in this process with workers=0, else expert
    workers on Ray. Returns (engine, cluster or None); the caller shuts the cluster down."""
    if workers < 0:
        raise UsageError("--workers must be >= 0")
    config = Checkpoint(model_dir).config
    kv = router_kv_cache(config, settings, workers, local_ray=address is None)
    blocks = kv.blocks
    progress(kv.describe())
    resident_before = resident_bytes()
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
             f"{config.num_experts} experts; this process holds {engine.weight_bytes / 2**20:.1f} MiB of weights "
             f"and a {kv.nbytes / 2**20:.1f} MiB KV cache, resident {resident_bytes() / 2**20:.1f} MiB "
             f"({resident_before / 2**20:.1f} MiB before the weights: code and tokenizer)")
    return engine, cluster


def resident_bytes() -> int:
    """This process's resident memory (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
