"""Bring up the expert-parallel cluster: Ray, the expert workers, the collective group, the router.

The router (attention, KV cache, gate, dispatch/combine, sampling) runs in this process as rank 0;
expert workers are Ray actors, one per placement-group bundle (one GPU each when the cluster has
GPUs, one CPU otherwise), ranks 1..W.
"""

from __future__ import annotations

import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster import wire
from cluster.checkpoint import Checkpoint
from cluster.placement import PlacementPlan
from router.dispatcher import ExpertDispatcher
from router.engine import Engine
from router.kv_cache import KVCache
from router.model import RouterModel
from workers.expert_worker import RemoteExpertWorker

log = logging.getLogger("expertmesh")


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
                 dtype: torch.dtype = torch.float32, pingpong: str = "auto", pingpong_min_tokens: int = 256,
                 collective_timeout_s: float = 30.0, kv_blocks: int = 512, block_size: int = 16,
                 placement_timeout_s: float = 60.0, device: str = "auto"):
        self.owns_ray = ensure_ray(address)
        self.checkpoint = Checkpoint(model_dir)
        config = self.checkpoint.config
        plan = plan or PlacementPlan.spread(num_workers, config.num_layers, config.num_experts)
        if replicas:
            plan = plan.with_replicas(replicas)
        if (plan.num_workers, plan.num_layers, plan.num_experts) != (num_workers, config.num_layers,
                                                                     config.num_experts):
            raise ValueError(f"placement plan is for {plan.num_workers} workers, {plan.num_layers} "
                             f"layers, {plan.num_experts} experts; the run has {num_workers} workers "
                             f"and the model {config.num_layers} layers, {config.num_experts} experts")
        plan.validate()
        self.plan = plan
        # "auto": GPU workers (and NCCL) when this router process has a GPU, else CPU and gloo. GPU
        # bundles that the cluster lacks make Ray's autoscaler add GPU nodes (KubeRay: GPU pods).
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        gpus = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        self.placement_group = placement_group([bundle] * num_workers, strategy="SPREAD")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=placement_timeout_s)
        if not ready:
            remove_placement_group(self.placement_group)
            raise RuntimeError(f"waited {placement_timeout_s:.0f}s for {num_workers} bundles of {bundle}; "
                               f"the cluster has {ray.available_resources()} free: add nodes or "
                               "lower --workers")
        dtype_name = str(dtype).removeprefix("torch.")
        self.workers = [
            RemoteExpertWorker.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
                # Ray starts workers at niceness 15, behind its own daemons; a worker is on the
                # data path of every layer, so a daemon's wake-up would stall the whole step.
                runtime_env={"env_vars": {"RAY_worker_niceness": "0"}},
            ).remote(i, str(model_dir), plan.worker_pairs(i), dtype_name)
            for i in range(num_workers)]
        self.serve_refs = []
        try:
            self.worker_bytes = ray.get([w.load.remote() for w in self.workers])
            here = ray.get_runtime_context().get_node_id()
            local = sum(w["node_id"] == here for w in ray.get([w.where.remote() for w in self.workers]))
            self._join(gpus, collective_timeout_s)
        except BaseException:
            self._kill_workers()
            raise
        device = torch.device("cuda" if gpus else "cpu")
        model = RouterModel.from_checkpoint(self.checkpoint, dtype, device)  # attention on the GPU too
        self.dispatcher = ExpertDispatcher(config, plan, device,
                                           keepalive_s=max(collective_timeout_s / 4, 0.5))
        cache = KVCache(config, kv_blocks, block_size, dtype, device)
        # CPU workers on this node share its cores with the router (see Engine.layer_threads).
        self.engine = Engine(model, self.dispatcher, cache, pingpong=pingpong, pingpong_min_tokens=pingpong_min_tokens,
                             layer_threads=1 if local and not gpus else None)

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
