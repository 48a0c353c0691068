"""Bring up the engine: in this process (--workers 0), or the expert-parallel cluster: Ray, the
expert workers, the collective group, the router.

The router (attention, KV cache, gate, dispatch/combine, sampling) runs in this process as rank 0;
expert workers are Ray actors, one per placement-group bundle (one GPU each when the cluster has
GPUs, one CPU otherwise), ranks 1..W. `start_engine` is the one factory that `run` and `serve` use.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from expertmesh.cluster.placement import PlacementError, PlacementPlan
from expertmesh.core import wire
from expertmesh.core.checkpoint import Checkpoint
from expertmesh.core.settings import DEFAULTS, ServingConfig
from expertmesh.router.dispatcher import ExpertDispatcher
from expertmesh.router.engine import DTYPES, Engine
from expertmesh.router.kv_cache import KVCache
from expertmesh.router.model import RouterModel
from expertmesh.workers.expert_worker import RemoteExpertWorker

log = logging.getLogger("expertmesh")


def progress(message: str) -> None:
    """Bring-up progress for the operator, on stderr (stdout carries results)."""
    print(f"[expertmesh] {message}", file=sys.stderr, flush=True)


class UsageError(ValueError):
    """Options that do not go together; the message says which."""


class PlacementTimeout(RuntimeError):
    """Ray could not place the workers within --placement-timeout."""


def use_gpus(device: str) -> bool:
    """--device: cuda, cpu, or auto = a GPU when this process sees one."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


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
                              device="cuda" if use_gpus(settings.device) else "cpu")
        cluster = None
    else:
        progress(f"starting {workers} expert workers on Ray "
                 f"({'joining ' + address if address else 'embedded local cluster'})")
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


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join `address`, or start an embedded local Ray. Returns True when we started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # Keep the embedded cluster on loopback; workers' CPU bundles are logical, not cores.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # else Ray swaps in the NIC address
    ray.init(address="local", num_cpus=num_cpus or max(8, os.cpu_count() or 1),
             include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


class ExpertCluster:
    """Workers placed, weights loaded, group joined, serve loops running; `engine` generates."""

    def __init__(self, model_dir, num_workers: int, plan: PlacementPlan | None = None,
                 replicas: str | None = None, address: str | None = None,
                 settings: ServingConfig = DEFAULTS, kv_blocks: int = 512):
        self.owns_ray = ensure_ray(address)
        dtype = DTYPES[settings.dtype]
        self.checkpoint = Checkpoint(model_dir)
        config = self.checkpoint.config
        plan = plan or PlacementPlan.spread(num_workers, config.num_layers, config.num_experts)
        if replicas:
            plan = plan.with_replicas(replicas)
        if (plan.num_workers, plan.num_layers, plan.num_experts) != (num_workers, config.num_layers,
                                                                     config.num_experts):
            raise PlacementError(f"placement plan is for {plan.num_workers} workers, {plan.num_layers} "
                             f"layers, {plan.num_experts} experts; the run has {num_workers} workers "
                             f"and the model {config.num_layers} layers, {config.num_experts} experts")
        plan.validate()
        self.plan = plan
        # "auto": GPU workers (and NCCL) when this router process has a GPU, else CPU and gloo. GPU
        # bundles that the cluster lacks make Ray's autoscaler add GPU nodes (KubeRay: GPU pods).
        gpus = use_gpus(settings.device)
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        self.placement_group = placement_group([bundle] * num_workers, strategy="SPREAD")
        self._wait_for_placement(num_workers, bundle, settings.placement_timeout_s)
        self.workers = [
            RemoteExpertWorker.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
                # Ray starts workers at niceness 15, behind its own daemons; a worker is on the
                # data path of every layer, so a daemon's wake-up would stall the whole step.
                runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
            ).remote(i, str(model_dir), plan.worker_pairs(i), settings.dtype, settings.worker_threads)
            for i in range(num_workers)]
        self.serve_refs = []
        try:
            self.worker_bytes = ray.get([w.load.remote() for w in self.workers])
            here = ray.get_runtime_context().get_node_id()
            local = sum(w["node_id"] == here for w in ray.get([w.where.remote() for w in self.workers]))
            self._join(gpus, settings.collective_timeout_s)
        except BaseException:
            self._kill_workers()
            raise
        device = torch.device("cuda" if gpus else "cpu")
        model = RouterModel.from_checkpoint(self.checkpoint, dtype, device)  # attention on the GPU too
        self.dispatcher = ExpertDispatcher(config, plan.holders, plan.num_workers, device,
                                           keepalive_s=max(settings.collective_timeout_s / 4, 0.5))
        cache = KVCache(config, kv_blocks, settings.block_size, dtype, device)
        # CPU workers on this node share its cores with the router (see Engine.layer_threads).
        self.engine = Engine(model, self.dispatcher, cache, pingpong=settings.pingpong,
                             pingpong_min_tokens=settings.pingpong_min_tokens,
                             layer_threads=1 if local and not gpus else None)

    def _wait_for_placement(self, num_workers: int, bundle: dict, timeout_s: float) -> None:
        """Wait for Ray (and its autoscaler) to place the workers' bundles, saying what we wait for:
        after a second, then every 10 s."""
        deadline = time.monotonic() + timeout_s
        wait = 1.0
        while True:
            left = deadline - time.monotonic()
            ready, _ = ray.wait([self.placement_group.ready()], timeout=max(min(left, wait), 0))
            if ready:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                remove_placement_group(self.placement_group)
                raise PlacementTimeout(f"waited {timeout_s:.0f}s for {num_workers} bundles of {bundle}; the cluster "
                                       f"has {ray.available_resources()} free: add nodes or lower --workers")
            progress(f"waiting for {num_workers} bundles of {bundle} ({left:.0f}s left of --placement-timeout); "
                     "`ray status` shows why")
            wait = 10.0

    def _join(self, gpus: bool, timeout_s: float) -> None:
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{_free_port(host)}"
        world = len(self.workers) + 1
        backend = "nccl" if gpus else "gloo"
        joins = [w.join_group.remote(init_method, world, backend, timeout_s) for w in self.workers]
        with ThreadPoolExecutor(1) as pool:  # rank 0 joins while the workers do
            mine = pool.submit(wire.init_process_group, init_method, wire.ROUTER_RANK, world, backend,
                               timeout_s)
            ray.get(joins, timeout=timeout_s + 30)
            mine.result(timeout=timeout_s + 30)
        self.serve_refs = [w.serve.remote() for w in self.workers]

    def stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers], timeout=30)

    def _kill_workers(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.placement_group)

    def shutdown(self) -> None:
        """Stop the serve loops, leave the group, free the workers and (if ours) Ray itself."""
        import torch.distributed as dist

        try:
            self.dispatcher.shutdown_workers()
            ray.get(self.serve_refs, timeout=30)
        except Exception as exc:  # noqa: BLE001 - a broken group is expected after a worker died
            log.warning("workers did not leave cleanly: %s", exc)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            self._kill_workers()
            if self.owns_ray:
                ray.shutdown()

    def __enter__(self) -> "ExpertCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
